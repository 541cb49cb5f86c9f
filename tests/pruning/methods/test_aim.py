"""AIM: bipartite merging before the LLM, PageRank ranking inside it, worked out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.aim import (AIM, aim_schedule, code_steps, merge_before_llm, merge_steps,
                                          pagerank_importance)
from workbench.pruning.plan import PRE_LLM, Merge


def angles(*degrees):
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def test_merge_steps_follow_the_code():
    assert merge_steps(144, 36) == [72, 36]  # the code's r = n // 2, n // 4: 25 % kept
    assert merge_steps(144, 32) == [72, 36, 4]
    assert merge_steps(5, 2) == [2, 1]
    assert merge_steps(4, 4) == []
    assert code_steps(144, 2) == [72, 36] and code_steps(576, 2) == [288, 144]


def test_bipartite_merging_by_hand():
    # 5 tokens at 0, 5, 90, 80, 45 degrees. Step 1 (r=2): sources 0, 2, 4 (even places), destinations
    # 1, 3; best matches 0->1 (cos 5), 2->3 (cos 10), 4->3 (cos 35): 0 and 2 merge; order [4, 1', 3'].
    # Step 2 (r=1) on that order: sources 4, 3', destination 1' (at 2.5 deg): 4 (cos 42.5) merges
    # into 1'. Kept in layout order without the code's re-ordering, 4 would pair with 3' instead.
    kept, merges, order = merge_before_llm(angles(0, 5, 90, 80, 45), merge_steps(5, 2))
    assert kept == (1, 3) and list(order) == [3, 1]
    assert set(merges) == {Merge(1, (0, 4), (0.25, 0.25, 0.5)), Merge(3, (2,), (0.5, 0.5))}


def test_pagerank_by_hand():
    p = np.array([[[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]])
    # one step from uniform: the column means
    assert pagerank_importance(p, temperature=1.0, iterations=1) == pytest.approx(np.array([1.7, 0.8, 0.5]) / 3)
    # temperature 0.5 squares and renormalises each row: row 2 -> (.04, .09, .25) / .38
    expected = (np.array([1, 0, 0]) + [0.5, 0.5, 0] + np.array([0.04, 0.09, 0.25]) / 0.38) / 3
    assert pagerank_importance(p, temperature=0.5, iterations=1) == pytest.approx(expected)
    # two heads: root mean square over the heads
    two = np.concatenate([p, np.tile(np.eye(3)[None, 0], (1, 3, 1))])
    rms = np.sqrt(((np.array([1.7, 0.8, 0.5]) / 3) ** 2 + np.array([1.0, 0, 0]) ** 2) / 2)
    assert pagerank_importance(two, temperature=1.0, iterations=1) == pytest.approx(rms)


def test_schedule():
    # 28-layer code: 12.5 % of the LLM's visual input dropped per layer from layer 14; here from 16 of 32
    assert aim_schedule(LLAVA_FACTS, 576, 16, 0.125) == tuple(
        (16 + j, 17 + j, int(576 * (1 - (j + 1) * 0.125))) for j in range(8))
    shallow = ModelFacts("llava", 4, 3, True, 3)
    assert aim_schedule(shallow, 32, 16, 0.125) == ((2, 3, 0),)  # every reference layer folds onto layer 2
    context = SelectionContext(grid_layout((12, 12)), 32, None, shallow)
    assert AIM().kept_counts(context) == (32, 0)


P = torch.tensor([[1, 0, 0, 0, 0, 0], [.5, .5, 0, 0, 0, 0], [.5, .2, .3, 0, 0, 0], [.4, .1, .1, .4, 0, 0],
                  [.4, .1, .1, .1, .3, 0], [.2, .05, .3, .05, .1, .3]], dtype=torch.float64)[None]


def state(visual_rows, ids, probs):
    return SimpleNamespace(visual_rows=torch.tensor(visual_rows), visual_indices=np.array(ids),
                           n_rows=probs.shape[-1], attention=lambda rows: probs[:, rows, :])


def test_callback_ranks_by_pagerank_on_the_live_sequence():
    # 4 visual tokens (rows 1-4), text rows 0 and 5. One PageRank step (temperature 1): the column
    # means over ALL query rows rank ids 0 (.95) > 1 (.8) > 2 (.55) > 3 (.4); the last row alone
    # would keep ids 1 and 3. ``dropped="removed"``: the dropped tokens leave the sequence.
    method = AIM(first_layer=16, rate_step=0.5, temperature=1.0, iterations=1, dropped="removed")
    context = SelectionContext(grid_layout((2, 2)), 4, None, LLAVA_FACTS)
    assert method.kept_counts(context) == (4, 2, 0)
    callback = method.layer_callback(context)
    assert callback(15, state([1, 2, 3, 4], [0, 1, 2, 3], P)) is None
    assert callback(16, state([1, 2, 3, 4], [0, 1, 2, 3], P)) is None  # scores layer 16 only
    stage = callback(17, state([1, 2, 3, 4], [0, 1, 2, 3], P))
    assert stage.where == 17 and stage.kept == (0, 1) and stage.position == "original"
    assert stage.score_array == pytest.approx(np.array([.95, .8, .55, .4]) / 6)
    # layer 17 scored the sequence after that stage: rows/keys 0, 1, 2, 5 renormalised
    # (row 5: (.2, .05, .3, .3) / .85), so id 0 gets (.5 + .2 + .05/.85) / 4.
    final = callback(18, state([1, 2], [0, 1], P[:, [0, 1, 2, 5]][:, :, [0, 1, 2, 5]]))
    assert final.kept == ()
    assert final.score_array[0] == pytest.approx((.5 + .2 + .05 / .85) / 4)
    assert final.score_array[1] == pytest.approx((.3 + .3 / .85) / 4)


def test_masked_tokens_stay_queries_of_the_pagerank():
    # The default (the code): ids 2, 3 dropped before layer 17 stay rows 3, 4 with hidden keys. Layer 17
    # scores all 6 rows with keys 3, 4 hidden (rows renormalised: row 3 (.4, .1, .1) / .6, row 4 the
    # same, row 5 (.2, .05, .3, .3) / .85), from 1/6 each: id 0 gets (.5 + .2 + 2 * .1/.6 + .05/.85) / 6.
    method = AIM(first_layer=16, rate_step=0.5, temperature=1.0, iterations=1)
    callback = method.layer_callback(SelectionContext(grid_layout((2, 2)), 4, None, LLAVA_FACTS))
    callback(16, state([1, 2, 3, 4], [0, 1, 2, 3], P))
    stage = callback(17, state([1, 2, 3, 4], [0, 1, 2, 3], P))
    assert stage.kept == (0, 1) and stage.dropped == "masked" and stage.position == "original"
    hidden = P.clone()
    hidden[:, :, [3, 4]] = 0
    hidden /= hidden.sum(-1, keepdim=True)  # what the layer's masked attention gives at layer 18
    final = callback(18, state([1, 2], [0, 1], hidden))
    assert final.kept == () and final.dropped == "masked"
    assert final.score_array[0] == pytest.approx((.5 + .2 + 2 * .1 / .6 + .05 / .85) / 6)
    assert final.score_array[1] == pytest.approx((.3 + 2 * .1 / .6 + .3 / .85) / 6)
    assert np.isnan(final.score_array[2:]).all()


def test_select_merges_the_llm_input():
    x = angles(0, 5, 90, 80, 45, 44)
    context = handmade_context(grid_layout((2, 3)), 3, {SignalNeed("visual_states", "llm", 0): x})
    (stage,) = AIM().select(context).stages
    assert stage.where == PRE_LLM and stage.position == "reindex" and len(stage.kept) == 3
    assert sum(len(m.sources) for m in stage.folds) == 3
    # the code's own two steps ignore the budget: 6 -> 3 -> 2 (r = 6 // 2, then min(6 // 4, 3 // 2))
    (fixed,) = AIM(reference_steps=2).select(context).stages
    assert len(fixed.kept) == 2 and AIM(reference_steps=2).kept_counts(context)[0] == 2


def test_parameters_are_checked():
    for bad, message in [(dict(first_layer=0), "first_layer"), (dict(first_layer=40), "below 32"),
                         (dict(rate_step=0.0), "rate_step"), (dict(temperature=-1), "temperature"),
                         (dict(iterations=0), "iterations"), (dict(damping=1.0), "damping"),
                         (dict(position="keep"), "position"), (dict(reference_steps=-1), "reference_steps"),
                         (dict(dropped="hidden"), "dropped"), (dict(order="random"), "order")]:
        with pytest.raises(ValueError, match=f"aim: .*{message}"):
            AIM(**bad)


def test_shipped_model_and_families():
    execution, _ = check_on_shipped(AIM())
    stages = execution.plan.stages
    assert [(s.where, len(s.kept)) for s in stages] == [(PRE_LLM, 32), (3, 0)]
    assert stages[0].folds and stages[1].position == "original" and stages[1].dropped == "masked"
    execution, _ = run_checked(*tiny_input("qwen2_vl"), AIM(), 0.25, max_new_tokens=2)
    assert execution.plan.stages[0].position == "original"  # M-RoPE: no re-indexing


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "idefics3"])
def test_every_family(family):
    execution, _ = run_checked(*tiny_input(family), AIM(), 0.25, max_new_tokens=2)
    assert len(execution.final_kept) == 0  # like the reference default, the deepest layers see no visual token
