"""Recordings round-trip through disk bit for bit; damaged or foreign folders fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.recorder import record
from workbench.recording import CaptureRequest, Recording, RecordingError

SIGNALS = ("attention", "attention_mass", "rollout", "kobayashi", "contribution", "contribution_residual",
           "flowcut", "massive_activations", "hidden_norm")


@pytest.fixture(scope="module")
def recording(shipped):
    adapter, prepared = shipped
    request = CaptureRequest(signals=SIGNALS, rows=("last", "cls", "mean"), layers=(0, -1), tower_layers=(1,),
                             per_head=True, sink_ratio=2.0, sink_floor=0.5)  # low thresholds: a non-empty table
    return record(adapter, prepared, request, sample_id="s-1", question="what ?")


def test_round_trip_is_bit_exact(recording, shipped, tmp_path):
    folder = recording.save(tmp_path / "rec")
    loaded = Recording.load(folder)
    assert loaded.identity == recording.identity and loaded.request == recording.request
    assert recording.identity.weights == shipped[0].fingerprint  # which weights the signals came from
    assert loaded.per_head == recording.per_head and loaded.notes == recording.notes
    assert set(loaded.tensors) == set(recording.tensors)
    for key, value in recording.tensors.items():
        assert loaded.tensors[key].dtype == value.dtype
        assert torch.equal(loaded.tensors[key].view(torch.int32), value.view(torch.int32)), key
    for name, positions in recording.row_positions.items():
        assert torch.equal(loaded.row_positions[name], positions)
    assert recording.table("massive_activations").height > 0
    assert loaded.table("massive_activations").equals(recording.table("massive_activations"))
    for field in ("positions", "group", "cell", "boxes", "separators"):
        assert (getattr(loaded.layout, field) == getattr(recording.layout, field)).all()
    assert loaded.layout.groups == recording.layout.groups
    last = len(shipped[0].decoder_layers()) - 1
    assert loaded.layers("attention") == [0, last] and loaded.layers("attention", "tower") == [1]


def test_saving_over_an_existing_recording_replaces_it(recording, tmp_path):
    folder = tmp_path / "rec"
    recording.save(folder)
    (folder / "stray.txt").write_text("old")
    recording.save(folder)
    assert not (folder / "stray.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["rec"]  # no temporary folders left behind


def test_a_recording_from_before_weight_fingerprints_still_loads(recording, tmp_path):
    folder = recording.save(tmp_path / "rec")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["identity"]["weights"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert Recording.load(folder).identity.weights == ""


def test_truncated_file_is_a_clear_error(recording, tmp_path):
    folder = recording.save(tmp_path / "rec")
    tensors = folder / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-100])
    with pytest.raises(RecordingError, match="truncated"):
        Recording.load(folder)


def test_truncated_manifest_is_a_clear_error(recording, tmp_path):
    folder = recording.save(tmp_path / "rec")
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    with pytest.raises(RecordingError, match="not valid JSON"):
        Recording.load(folder)


def test_foreign_folder_and_wrong_schema_are_clear_errors(recording, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(RecordingError, match="not a workbench recording"):
        Recording.load(foreign)
    (foreign / "manifest.json").write_text(json.dumps({"name": "something else"}))
    with pytest.raises(RecordingError, match="not a workbench recording"):
        Recording.load(foreign)
    folder = recording.save(tmp_path / "rec")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RecordingError, match="schema version 99"):
        Recording.load(folder)
    with pytest.raises(RecordingError, match="no such"):
        Recording.load(tmp_path / "missing")


def test_get_reduces_heads_and_names_what_is_missing(recording):
    per_head = recording.tensors[recording.keys("attention", "llm")[0]]
    key = recording.keys("attention", "llm")[0]
    torch.testing.assert_close(recording.get("attention", key.layer, key.rows), per_head.mean(0))
    torch.testing.assert_close(recording.get("attention", key.layer, key.rows, head=1), per_head[1])
    with pytest.raises(KeyError, match="was not recorded"):
        recording.get("attention", 1, "last")
