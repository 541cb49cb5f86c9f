import numpy as np
import pytest

from workbench.scenes import POSITIONS, QUESTION_TYPES, ask, make_scene, sample_objects


def test_scenes_are_deterministic_by_seed():
    a = make_scene(np.random.default_rng(7), 3)
    b = make_scene(np.random.default_rng(7), 3)
    c = make_scene(np.random.default_rng(8), 3)
    assert a.objects == b.objects
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_objects_are_distinct_and_inside_their_cells():
    for seed in range(50):
        objs = sample_objects(np.random.default_rng(seed), 4)
        assert len({o.cell for o in objs}) == 4
        assert len({(o.colour, o.shape) for o in objs}) == 4  # "the red circle" names one object
        for o in objs:
            x0, y0, x1, y1 = o.box
            row, col = o.cell
            assert col * 32 <= x0 < x1 <= (col + 1) * 32 and row * 32 <= y0 < y1 <= (row + 1) * 32


def test_label_mask_matches_boxes():
    scene = make_scene(np.random.default_rng(3), 4)
    for k, obj in enumerate(scene.objects, start=1):
        ys, xs = np.nonzero(scene.labels == k)
        x0, y0, x1, y1 = obj.box
        assert len(xs) > 0 and xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_answers_follow_from_the_scene(qtype):
    """Recompute every answer from the object list, independently of the templates."""
    rng = np.random.default_rng(11)
    asked = 0
    for _ in range(200):
        objs = sample_objects(rng, int(rng.integers(2, 5)))
        q = ask(objs, qtype, rng)
        if q is None:
            continue
        asked += 1
        words = q.question.split()
        named = [o for o in objs if o.name in q.question]
        if qtype == "position":
            (o,) = named
            assert q.answer == POSITIONS[o.cell[0]][o.cell[1]] and q.evidence == (objs.index(o),)
        elif qtype == "existence":
            colour, shape = words[3], words[4]
            assert q.answer == ("yes" if any(o.colour == colour and o.shape == shape for o in objs) else "no")
        elif qtype == "counting":
            target = words[2]
            count = sum(target in (o.colour, o.shape) for o in objs)
            assert q.answer == ["zero", "one", "two", "three", "four"][count] and len(q.evidence) == count
        elif qtype == "relation":
            a, b = (next(o for o in objs if o.name == f"{words[2]} {words[3]}"),
                    next(o for o in objs if o.name == f"{words[-3]} {words[-2]}"))
            axis = 1 if "left" in words else 0
            assert q.answer == ("yes" if a.cell[axis] < b.cell[axis] else "no")
            assert set(q.evidence) == {objs.index(a), objs.index(b)}
        elif qtype == "object":
            colour = words[4]
            (o,) = [o for o in objs if o.colour == colour]
            assert q.answer == o.shape
        elif qtype == "attribute":
            (i,) = q.evidence
            assert q.answer in (objs[i].colour, objs[i].size)
    assert asked > 60  # every template is exercised on many scenes


def test_counting_answers_are_not_dominated_by_one():
    rng = np.random.default_rng(0)
    answers = [ask(sample_objects(rng, int(rng.integers(2, 5))), "counting", rng).answer for _ in range(600)]
    shares = {a: answers.count(a) / len(answers) for a in set(answers)}
    assert shares["one"] < 0.6 and shares.get("three", 0) > 0.08
