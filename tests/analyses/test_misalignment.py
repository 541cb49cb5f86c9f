"""Misalignment metrics on hand-built recordings whose answers are known."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from analyses.misalignment import (dominance_metrics, evidence_alignment, modality_dominance, positional_bias,
                                   positional_profile, recall_at_k, roc_auc, rope_difference, saliency_agreement,
                                   sink_capture)
from tests.pruning.handmade import grid_layout, handmade_recording
from workbench.pruning.method import SignalNeed
from workbench.recording import EntryKey

LAYOUT = grid_layout((6, 6), prefix=3, suffix=5)  # visual at 3..38, 5 text tokens after
N = LAYOUT.n_tokens


def _value(frame, metric, layer=0, signal=None):
    part = frame.filter((pl.col("metric") == metric) & (pl.col("layer") == layer))
    if signal is not None:
        part = part.filter(pl.col("signal") == signal)
    assert part.height == 1, part
    return part["value"][0]


def test_attention_on_the_bottom_rows_shows_a_positive_positional_bias_that_norope_lacks():
    bottom = np.where(LAYOUT.cell[:, 0] >= 4, 1.0, 0.01)
    flat = np.full(N, 1.0)
    recording = handmade_recording(LAYOUT, {SignalNeed("attention", "llm", 0, "last"): (bottom / bottom.sum())[None],
                                            SignalNeed("attention_norope", "llm", 0, "last"): (flat / N)[None]})
    bias = positional_bias(recording)
    assert _value(bias, "seq_spearman", signal="attention") > 0.8
    assert _value(bias, "row_spearman", signal="attention") > 0.8
    assert _value(bias, "row_centroid", signal="attention") > 0.8
    assert _value(bias, "col_spearman", signal="attention") is None or abs(_value(bias, "col_spearman", signal="attention")) < 1e-9
    assert _value(bias, "col_centroid", signal="attention") == pytest.approx(0.5)
    assert _value(bias, "seq_spearman", signal="attention_norope") is None  # flat: undefined
    assert _value(bias, "row_centroid", signal="attention_norope") == pytest.approx(0.5)
    diff = rope_difference(bias).filter(pl.col("metric") == "row_centroid")
    assert diff["difference"][0] > 0.3
    profile = positional_profile(recording).filter(pl.col("axis") == "row")
    shares = profile.sort("index")["share"].to_numpy()
    assert shares.sum() == pytest.approx(1.0) and shares[4:].sum() > 0.9
    assert len(shares) == 6


def test_attention_exactly_on_the_evidence_gives_auc_one_and_full_recall():
    evidence = np.zeros(N, dtype=bool)
    evidence[[7, 8, 13, 14]] = True
    exact = np.where(evidence, 0.25, 0.0)
    inverse = np.where(evidence, 0.0, 1.0 / (N - 4))
    recording = handmade_recording(LAYOUT, {SignalNeed("attention", "llm", 1, "text"): np.vstack([exact, exact]),
                                            SignalNeed("attention", "llm", 2, "text"): inverse[None]})
    frame = evidence_alignment(recording, evidence, ks=(2, 4, 10))
    assert _value(frame, "auc", 1) == pytest.approx(1.0)
    assert _value(frame, "recall@E", 1) == pytest.approx(1.0)
    assert _value(frame, "recall@4", 1) == _value(frame, "recall@10", 1) == pytest.approx(1.0)
    assert _value(frame, "recall@2", 1) == pytest.approx(0.5)
    assert _value(frame, "evidence_mass", 1) == pytest.approx(1.0)
    assert _value(frame, "auc", 2) == pytest.approx(0.0) and _value(frame, "recall@E", 2) == 0.0
    # ties count one half: a constant score is a coin flip
    assert roc_auc(np.ones(N), evidence) == pytest.approx(0.5)
    assert roc_auc(np.ones(N), np.zeros(N, bool)) is None
    assert recall_at_k(np.arange(N), np.arange(N) >= N - 3, 3) == 1.0


def test_roc_auc_by_hand():
    # positive-negative pairs: 0.9 > 0.5, 0.9 > 0.1, 0.5 = 0.5 (counts 1/2), 0.5 > 0.1 -> 3.5 / 4
    assert roc_auc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False])) == pytest.approx(0.875)
    assert roc_auc(np.array([0.1, 0.2, 0.3]), np.array([True, False, True])) == pytest.approx(0.5)
    assert roc_auc(np.array([0.1, np.nan, 0.3]), np.array([True, False, True])) is None


def test_evidence_mass_of_a_signed_saliency_counts_its_positive_scores_only():
    evidence = np.zeros(N, dtype=bool)
    evidence[[7, 8]] = True
    signed = np.zeros(N)
    signed[[7, 8, 20]] = [3.0, -5.0, 1.0]  # the evidence holds 3 of the 4 positive units
    recording = handmade_recording(LAYOUT, {SignalNeed("attention", "llm", 0, "text"): np.full(N, 1.0 / N)[None]})
    saliency = {EntryKey("occlusion", "llm", -1, "k1"): torch.as_tensor(signed[None], dtype=torch.float32),
                EntryKey("grad_x_input", "llm", -1, "answer"): torch.as_tensor(-np.abs(signed)[None], dtype=torch.float32)}
    recording = dataclasses.replace(recording, tensors=dict(recording.tensors) | saliency)
    mass = evidence_alignment(recording, evidence, signal="occlusion", rows="k1")
    assert _value(mass, "evidence_mass", -1) == pytest.approx(0.75)
    negative = evidence_alignment(recording, evidence, signal="grad_x_input", rows="answer")
    assert _value(negative, "evidence_mass", -1) is None  # nothing supports the answer


def test_saliency_agreement_is_the_rank_correlation():
    rng = np.random.default_rng(0)
    saliency = rng.normal(size=N)
    same = np.exp(saliency) / np.exp(saliency).sum()  # monotone in the saliency
    recording = handmade_recording(LAYOUT, {SignalNeed("attention", "llm", 0, "text"): same[None],
                                            SignalNeed("attention", "llm", 1, "text"): (1 / N - same / 100)[None]})
    occlusion = {EntryKey("occlusion", "llm", -1, "k1"): torch.as_tensor(saliency[None], dtype=torch.float32)}
    recording = dataclasses.replace(recording, tensors=dict(recording.tensors) | occlusion)
    frame = saliency_agreement(recording, k=5)
    assert _value(frame, "spearman", 0) == pytest.approx(1.0)
    assert _value(frame, "top5_jaccard", 0) == pytest.approx(1.0)
    assert _value(frame, "spearman", 1) == pytest.approx(-1.0)
    assert set(frame["signal"]) == {"attention~occlusion"}


def test_sink_capture_shares():
    attention = np.full(N, 0.2 / (N - 2))
    attention[[0, 1]] = 0.4  # sinks take 0.8 of 1.0 visual attention
    score = np.ones(N)
    score[[0, 1]] = 50.0
    mass = np.array([[1.0, 0.5, 0.1, 0.6]])  # visual, text, system, sink
    recording = handmade_recording(LAYOUT, {SignalNeed("attention", "llm", 0, "text"): attention[None],
                                            SignalNeed("visual_sink_score", "llm", 0, "tokens"): score[None],
                                            SignalNeed("attention_mass", "llm", 0, "text"): mass})
    table = pl.DataFrame({"stack": ["llm", "llm", "llm"], "layer": [0, 0, 1], "view": [0, 0, 0],
                          "position": [int(LAYOUT.positions[1]), 0, int(LAYOUT.positions[5])], "dim": [3, 3, 3],
                          "value": [99.0, 99.0, 99.0], "median": [0.1] * 3, "role": ["visual", "system", "visual"]})
    recording = dataclasses.replace(recording, tables={"massive_activations": table})
    frame = sink_capture(recording, var_tau=20.0)
    assert _value(frame, "var_sinks") == 2 and _value(frame, "var_token_share") == pytest.approx(2 / N)
    assert _value(frame, "var_attention_share") == pytest.approx(0.8)
    assert _value(frame, "massive_sinks") == 1 and _value(frame, "massive_attention_share") == pytest.approx(0.4)
    assert _value(frame, "sink_mass") == pytest.approx(0.6) and _value(frame, "visual_mass") == pytest.approx(1.0)


def test_modality_dominance_by_hand():
    # visual 0.2 over 36 tokens, text 0.6 over the 5 text tokens, system 0.15 over the 3 prefix tokens
    mass = np.array([[0.2, 0.6, 0.15, 0.05]])
    recording = handmade_recording(LAYOUT, {SignalNeed("attention_mass", "llm", 4, "last"): mass})
    frame = modality_dominance(recording)
    assert _value(frame, "mdi", 4) == pytest.approx((0.6 / 5) / (0.2 / 36))
    assert _value(frame, "aei_text", 4) == pytest.approx((0.6 / 0.8) / (5 / 41))
    assert _value(frame, "aei_visual", 4) == pytest.approx((0.2 / 0.8) / (36 / 41))
    assert _value(frame, "n_text", 4) == 5 and _value(frame, "n_visual", 4) == 36
    with_system = modality_dominance(recording, include_system=True)
    assert _value(with_system, "mdi", 4) == pytest.approx((0.75 / 8) / (0.2 / 36))
    # balanced attention per token gives MDI 1 and AEI 1
    balanced = dominance_metrics(np.array([5.0]), np.array([36.0]), np.array([5.0]), 36)
    assert balanced == pytest.approx({"mdi": 1.0, "aei_text": 1.0, "aei_visual": 1.0})


def test_text_rows_count_only_the_text_they_can_see():
    mass = np.array([[0.5, 0.1, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    recording = handmade_recording(LAYOUT, {SignalNeed("attention_mass", "llm", 0, "text"): mass})
    last_visual = int(LAYOUT.positions.max())
    recording = dataclasses.replace(recording, row_positions={"llm/text/0": torch.tensor([last_visual + 1, last_visual + 5])})
    frame = modality_dominance(recording, rows="text")
    per_text = (0.1 / 1 + 0.5 / 5) / 2
    assert _value(frame, "mdi") == pytest.approx(per_text / (0.5 / 36))
    assert _value(frame, "n_text") == pytest.approx(3.0)
