import json

import numpy as np
import pytest

from workbench.samples import DatasetError, read_dataset, write_dataset
from workbench.scene_dataset import make_dataset


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    return out, make_dataset(out, n_samples=24, seed=5, progress=False)


def test_dataset_round_trip_and_balance(small_set):
    out, samples = small_set
    again = read_dataset(out / "samples.jsonl")
    assert again == samples
    types = [s.question_type for s in again]
    assert {t: types.count(t) for t in set(types)} == {t: 4 for t in set(types)}


def test_dataset_is_deterministic(small_set, tmp_path):
    out, samples = small_set
    other = make_dataset(tmp_path, n_samples=24, seed=5, progress=False)
    assert [(s.question, s.answer, s.evidence_boxes) for s in other] == [(s.question, s.answer, s.evidence_boxes) for s in samples]
    assert (tmp_path / "images" / "scene-00000.png").read_bytes() == (out / "images" / "scene-00000.png").read_bytes()


def test_evidence_mask_lies_inside_evidence_boxes(small_set):
    _, samples = small_set
    for s in samples:
        mask = s.evidence_mask()
        assert mask is not None and mask.any()
        inside = np.zeros_like(mask)
        for x0, y0, x1, y1 in s.evidence_boxes:
            inside[int(y0):int(y1), int(x0):int(x1)] = True
        assert not (mask & ~inside).any()


def test_user_dataset_without_optional_fields(tmp_path, small_set):
    out, samples = small_set
    row = {"id": 1, "image": str(samples[0].image_path), "question": "what is here?"}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (s,) = read_dataset(path)
    assert s.answer is None and s.evidence_mask() is None and s.id == "1"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"id": "a", "question": "q"}', "missing field 'image'"),
    ('{"id": "a", "image": "nowhere.png", "question": "q"}', "image file not found"),
    ('{"id": "a", "image": "IMG", "question": "q", "evidence_boxes": [[5, 5, 1, 1]]}', "bad evidence box"),
    ('{"id": "a", "image": "IMG", "question": "q", "references": "red"}', "'references' must be a list of strings"),
    ('{"id": "a", "image": {"row": 1}, "question": "q"}', "a stored-image reference"),
])
def test_bad_rows_name_file_and_line(tmp_path, small_set, line, message):
    _, samples = small_set
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "ok", "image": str(samples[0].image_path), "question": "q"})
    path.write_text(good + "\n" + line.replace("IMG", str(samples[0].image_path)) + "\n")
    with pytest.raises(DatasetError, match=message) as err:
        read_dataset(path)
    assert f"{path}:2" in str(err.value)


def test_write_is_atomic_and_relative(tmp_path, small_set):
    _, samples = small_set
    path = write_dataset(samples[:3], tmp_path / "copy.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(not r["image"].startswith("/") for r in rows)
    assert not list(tmp_path.glob(".*tmp"))


def test_a_row_may_carry_every_reference_its_options_and_its_group(tmp_path, small_set):
    _, samples = small_set
    row = {"id": "v", "image": str(samples[0].image_path), "question": "how many?", "answer": "2",
           "references": ["2", "two", "3", "2"], "scorer": "vqa_soft", "group": "g1", "benchmark": "vqav2"}
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (s,) = read_dataset(path)
    assert s.golds == ("2", "two", "3", "2") and s.group == "g1" and s.benchmark == "vqav2"
    # leave-one-out over 4 references, 3 of which read "2": (3 * 2/3 + 1 * 1) / 4
    assert s.score("2").value == pytest.approx(0.75)
    (again,) = read_dataset(write_dataset([s], tmp_path / "again.jsonl"))
    assert (again.references, again.group, again.benchmark, again.scorer) == (s.references, "g1", "vqav2", "vqa_soft")
    mc = {"id": "m", "image": str(samples[0].image_path), "question": "which?", "answer": "B",
          "options": ["cat", "dog"], "scorer": "multiple_choice"}
    path.write_text(json.dumps(mc) + "\n")
    (m,) = read_dataset(path)
    assert m.score("a dog").value == 1.0 and m.score("a cat").value == 0.0  # read through the options
