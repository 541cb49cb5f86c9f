"""Every analysis runs on a real recording and a real sweep of the trained shipped model and
returns finite values."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from analyses import comparison, misalignment, redundancy
from workbench.models.loading import load
from workbench.recorder import record
from workbench.recording import CaptureRequest
from workbench.samples import read_dataset
from workbench.sweep import MethodSpec, run_sweep

SIGNALS = ("attention", "attention_norope", "attention_mass", "sink_share", "visual_sink_score",
           "massive_activations", "visual_states", "visual_states_out", "occlusion", "grad_x_input")


@pytest.fixture(scope="module")
def model():
    return load("shapes-vlm")


@pytest.fixture(scope="module")
def sample():
    return read_dataset("data/eval/samples.jsonl", limit=2)[0]


@pytest.fixture(scope="module")
def recorded(model, sample):
    prepared = model.prepare(sample.load_image(), sample.question)
    request = CaptureRequest(signals=SIGNALS, rows=("last", "text", "cls", "mean"))
    recording = record(model, prepared, request, sample_id=sample.id, question=sample.question, answer=sample.answer)
    return recording, recording.layout.evidence_tokens(sample.evidence_mask())


def _finite(frame: pl.DataFrame, column: str = "value", allow_null: bool = False) -> None:
    assert frame.height > 0
    values = frame[column]
    if not allow_null:
        assert values.null_count() == 0, frame.filter(pl.col(column).is_null())
    assert all(math.isfinite(v) for v in values.drop_nulls().to_list())


def test_redundancy_on_the_shipped_model(recorded):
    recording, _ = recorded
    table = redundancy.redundancy_by_depth(recording)
    n_layers = len(recording.layers("visual_states_out")), len(recording.layers("visual_states_out", "tower"))
    assert set(table["stack"]) == {"llm", "tower"} and all(n > 1 for n in n_layers)
    _finite(table.filter(pl.col("signal") == "visual_states_out"))
    _finite(table.filter(pl.col("signal") == "attention"), allow_null=True)
    _finite(redundancy.depth_trend(table), "first")
    _finite(redundancy.cosine_histogram(recording), "share")
    clusters = redundancy.duplicate_clusters(recording)
    assert clusters.height == recording.layout.n_tokens * sum(n_layers)


def test_misalignment_on_the_shipped_model(recorded):
    recording, evidence = recorded
    assert evidence.any() and not evidence.all()
    bias = misalignment.positional_bias(recording)
    assert set(bias["signal"]) == {"attention", "attention_norope"}
    _finite(bias)
    _finite(misalignment.rope_difference(bias), "difference")
    _finite(misalignment.positional_profile(recording), "share")
    for signal, rows in (("attention", "text"), ("attention", "last"), ("occlusion", "k1"), ("grad_x_input", "answer")):
        frame = misalignment.evidence_alignment(recording, evidence, signal=signal, rows=rows)
        _finite(frame.filter(pl.col("metric") != "evidence_mass"))
        # Evidence mass is a share of the positive scores; a signed saliency may have none.
        positive = {layer: (scores > 0).any() for layer, scores in redundancy.layer_scores(recording, signal, rows).items()}
        for layer, mass in frame.filter(pl.col("metric") == "evidence_mass").select("layer", "value").iter_rows():
            assert (mass is None) != positive[layer] and (mass is None or 0 <= mass <= 1), (signal, layer)
        auc = frame.filter(pl.col("metric") == "auc")["value"].to_numpy()
        assert ((0 <= auc) & (auc <= 1)).all()
    _finite(misalignment.saliency_agreement(recording))
    _finite(misalignment.saliency_agreement(recording, saliency="grad_x_input", saliency_rows="answer", absolute=True))
    sinks = misalignment.sink_capture(recording)
    assert {"var_sinks", "massive_sinks", "sink_mass", "visual_mass", "sink_share"} <= set(sinks["metric"])
    _finite(sinks, allow_null=True)
    _finite(misalignment.sink_capture(recording, stack="tower", rows="cls"), allow_null=True)
    for rows in ("last", "text"):
        dominance = misalignment.modality_dominance(recording, rows=rows)
        _finite(dominance)
        assert (dominance.filter(pl.col("metric") == "mdi")["value"] > 0).all()


def test_comparison_on_a_real_sweep(model, sample, tmp_path):
    result = run_sweep(model, [sample], "data/eval/samples.jsonl",
                       [MethodSpec("uniform_grid"), MethodSpec("random")], [0.25, 0.5], tmp_path / "sweep",
                       progress=False)
    table = result.table
    overlap = comparison.kept_overlap(table)
    assert overlap.height == 2 * 4
    _finite(overlap, "jaccard")
    _finite(comparison.evidence_recall_by_budget(table), "recall")
    grid = int(np.sqrt(recording_tokens := int(table["n_visual"][0])))
    assert grid * grid == recording_tokens
    _finite(comparison.spatial_coverage(table, grid=(grid, grid)))
    curves = comparison.accuracy_curves(table)
    _finite(curves, "ci_low")
    _finite(curves, "ci_high")
    assert set(curves["method"]) == {"unpruned", "uniform_grid", "random"}
