"""The one pipeline: a complete, lossless, serialisable result per (sample, method, budget)."""


import numpy as np
import torch
import pytest

from workbench import pipeline
from workbench.models.loading import load
from workbench.pruning.registry import create_method
from workbench.samples import read_dataset


@pytest.fixture(scope="module")
def ready():
    adapter = load()
    sample = read_dataset("data/eval/samples.jsonl", limit=1)[0]
    methods = [create_method("fastv"), create_method("hired")]
    return adapter, pipeline.prepare_sample(adapter, sample, methods)


def test_unpruned_result_is_complete(ready):
    adapter, prepared = ready
    result = pipeline.run(adapter, prepared, None)
    n = prepared.n_visual
    row = result.row()
    assert (row["method"], row["budget"], row["kept_count"], row["budget_gap"]) == ("unpruned", "100%", n, 0)
    assert row["effective_tokens"] == n and row["flops_ratio"] == pytest.approx(1.0)
    assert row["stopped"] is True and row["score"] == 1.0 and row["correct"] is True
    assert row["extracted_answer"] == row["predicted_answer"].strip()
    assert row["prefill_time_s"] > 0 and row["wall_time_s"] >= row["prefill_time_s"]


def test_the_stored_plan_is_lossless(ready):
    adapter, prepared = ready
    result = pipeline.run(adapter, prepared, create_method("fastv"), 0.25)
    restored = pipeline.plan_from_row(result.row())
    assert restored.stages[0].kept == result.plan.stages[0].kept
    scores, again = result.plan.stages[0].score_array, restored.stages[0].score_array
    assert np.array_equal(np.isnan(scores), np.isnan(again)) and np.allclose(scores[~np.isnan(scores)],
                                                                            again[~np.isnan(again)])
    assert restored.stages[0].where == result.plan.stages[0].where
    # running the stored plan again gives the same answer: a replay needs no selection
    replay = pipeline.run(adapter, prepared, None, plan=restored)
    assert replay.generation == result.generation
    assert replay.plan.stages[0].kept == result.plan.stages[0].kept and replay.method == "fastv"


def test_a_method_that_keeps_other_than_the_budget_says_so(ready):
    adapter, prepared = ready
    # HiRED's code keeps int(N * rate): 0.22 of 144 is 31 tokens where the budget rounds to 32
    row = pipeline.run(adapter, prepared, create_method("hired"), 0.22).row()
    assert (row["budget_tokens"], row["kept_count"], row["budget_gap"]) == (32, 31, -1)
    in_llm = pipeline.run(adapter, prepared, create_method("fastv"), 0.22).row()
    layers = in_llm["visual_tokens_per_layer"]
    assert layers[0] == prepared.n_visual and in_llm["effective_tokens"] == pytest.approx(np.mean(layers))
    assert in_llm["effective_tokens"] > in_llm["kept_count"]  # the first layers still see every token


def test_loyalty_compares_with_the_unpruned_answer(ready):
    adapter, prepared = ready
    unpruned = pipeline.run(adapter, prepared, None)
    pruned = pipeline.run(adapter, prepared, create_method("random"), 0.11)
    assert pipeline.loyal(unpruned, unpruned) is True
    assert pipeline.loyal(pruned, unpruned) == (pruned.extracted.lower() == unpruned.extracted.lower())
    not_run = pipeline.Result("s", "m", {}, "10%", 1, 2, "not_applicable", "no")
    assert pipeline.loyal(not_run, unpruned) is None


def test_the_data_set_names_its_scorer(ready, tmp_path):
    import json

    from workbench import scoring
    from workbench.samples import DatasetError

    adapter, prepared = ready
    row = {"id": "s", "image": str(prepared.sample.image_path.resolve()), "question": prepared.sample.question,
           "answer": prepared.sample.answer, "scorer": "half"}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match="unknown scorer 'half'; available: box_iou, exact"):
        read_dataset(tmp_path / "d.jsonl")
    scoring.register(scoring.Scorer("half", "every answer half right", lambda g, o: g, lambda e, refs: 0.5))
    try:
        sample = read_dataset(tmp_path / "d.jsonl")[0]
        assert sample.scorer == "half"
        result = pipeline.run(adapter, pipeline.prepare_sample(adapter, sample), None).row()
        assert result["score"] == 0.5 and result["correct"] is False
    finally:
        del scoring.SCORERS["half"]


def test_a_blank_control_is_the_sample_on_the_blank_image_without_reading_the_sample_again(ready, monkeypatch):
    """``on_image``: the sample's question on another image of its size (processed once, for
    another question), its layout and evidence tokens taken over (the sample's evidence is not read
    again), with the inputs and run of the sample prepared on that image."""
    from workbench.images import blank_image
    from workbench.samples import Sample

    adapter, prepared = ready
    blank = blank_image(prepared.prepared.image_size)
    fresh = pipeline.prepare_sample(adapter, prepared.sample, image=blank)
    other = adapter.prepare(blank, "what colour is it , and how large ?")
    monkeypatch.setattr(Sample, "evidence_mask", lambda self: pytest.fail("the evidence was read again"))
    monkeypatch.setattr(type(adapter), "processor_inputs", lambda *_: pytest.fail("the processor ran again"))
    control = pipeline.on_image(adapter, prepared, other)
    assert sorted(control.prepared.inputs) == sorted(fresh.prepared.inputs)
    for name, tensor in fresh.prepared.inputs.items():
        assert torch.equal(control.prepared.inputs[name], tensor), name
    assert control.evidence is prepared.evidence and control.recording is None
    assert np.array_equal(control.prepared.layout.positions, prepared.prepared.layout.positions)
    assert control.prepared.layout.sequence_length == prepared.prepared.layout.sequence_length
    ours, theirs = pipeline.run(adapter, control, None), pipeline.run(adapter, fresh, None)
    assert ours.generation == theirs.generation and ours.row()["evidence_recall"] == theirs.row()["evidence_recall"]
    assert not np.array_equal(control.prepared.inputs["pixel_values"], prepared.prepared.inputs["pixel_values"])
