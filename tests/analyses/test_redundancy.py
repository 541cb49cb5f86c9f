"""Redundancy metrics on hand-built features and attention whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from analyses.redundancy import (attention_concentration, attention_metrics, cluster_labels, cluster_sizes,
                                 cosine_histogram, cosine_summary, depth_trend, duplicate_clusters, effective_rank,
                                 mean_over_samples, participation_ratio, redundancy_by_depth, spearman)
from tests.pruning.handmade import grid_layout, handmade_recording
from workbench.pruning.method import SignalNeed

LAYOUT = grid_layout((4, 4))
N = LAYOUT.n_tokens


def _value(frame, metric, layer=None, stack="llm", rows=None):
    part = frame.filter((frame["metric"] == metric) & (frame["stack"] == stack))
    if layer is not None:
        part = part.filter(part["layer"] == layer)
    if rows is not None:
        part = part.filter(part["rows"] == rows)
    assert part.height == 1, part
    return part["value"][0]


def test_planted_duplicates_form_one_cluster_and_raise_the_mean_cosine():
    rng = np.random.default_rng(0)
    plain = rng.normal(size=(N, 64))
    planted = plain.copy()
    planted[[3, 7, 9, 12]] = plain[2] + 1e-3 * rng.normal(size=(4, 64))
    labels = cluster_labels(planted, 0.95)
    assert len(set(labels[[2, 3, 7, 9, 12]])) == 1
    assert list(cluster_sizes(labels)) == [5]
    recording = handmade_recording(LAYOUT, {SignalNeed("visual_states_out", "llm", 0): plain,
                                            SignalNeed("visual_states_out", "llm", 1): planted})
    summary = cosine_summary(recording, threshold=0.95)
    assert _value(summary, "n_clusters", 0) == 0 and _value(summary, "largest_cluster", 0) == 1
    assert _value(summary, "n_clusters", 1) == 1 and _value(summary, "largest_cluster", 1) == 5
    assert _value(summary, "clustered_share", 1) == pytest.approx(5 / N)
    assert _value(summary, "cos_mean", 1) > _value(summary, "cos_mean", 0) + 0.02
    assert _value(summary, "cos_q95", 1) >= _value(summary, "cos_q50", 1)
    members = duplicate_clusters(recording, threshold=0.95).filter(layer=1)
    assert sorted(members.filter(members["cluster_size"] == 5)["token"].to_list()) == [2, 3, 7, 9, 12]
    # 10 duplicate pairs of cosine ~1 land in the top bin of layer 1; the histogram sums to all pairs
    hist = cosine_histogram(recording, bins=20)
    top = hist.filter((hist["layer"] == 1) & (hist["bin_hi"] == 1.0))
    assert top["count"][0] == 10
    assert hist.filter(layer=1)["count"].sum() == N * (N - 1) // 2
    assert hist.filter(layer=1)["share"].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_features_of_rank_r_have_effective_rank_r(rank):
    rng = np.random.default_rng(rank)
    centred = rng.normal(size=(N, rank))
    u, _ = np.linalg.qr(centred - centred.mean(0))  # orthonormal columns orthogonal to the ones vector
    v, _ = np.linalg.qr(rng.normal(size=(32, rank)))
    equal = 5.0 * u @ v.T  # r equal singular values
    assert effective_rank(equal) == pytest.approx(rank, rel=1e-6)
    assert participation_ratio(equal) == pytest.approx(rank, rel=1e-6)
    generic = rng.normal(size=(N, rank)) @ rng.normal(size=(rank, 32))  # rank r, unequal values
    assert 0.5 * rank <= effective_rank(generic) <= rank + 1e-6
    assert 0.5 * rank <= participation_ratio(generic) <= rank + 1e-6


def test_attention_entropy_and_top_k_share():
    uniform = np.full((1, N), 0.5 / N)  # half the row's attention on the image, spread evenly
    peaked = np.zeros((1, N))
    peaked[0, 5] = 0.3
    m = attention_metrics(uniform, ks=(1, 4))
    assert m["entropy"] == pytest.approx(np.log(N)) and m["normalized_entropy"] == pytest.approx(1.0)
    assert m["top1_share"] == pytest.approx(1 / N) and m["top4_share"] == pytest.approx(4 / N)
    assert m["visual_mass"] == pytest.approx(0.5)
    m = attention_metrics(peaked, ks=(1,))
    assert m["entropy"] == pytest.approx(0.0) and m["top1_share"] == pytest.approx(1.0)
    two_rows = np.vstack([uniform, peaked])
    recording = handmade_recording(LAYOUT, {SignalNeed("attention", "llm", 2, "text"): two_rows})
    frame = attention_concentration(recording, ks=(1,))
    assert _value(frame, "top1_share", 2, rows="text") == pytest.approx((1 / N + 1) / 2)


def test_depth_table_and_trend():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(N, 16))
    entries = {}
    for layer, pull in enumerate((0.0, 1.0, 3.0, 9.0)):  # a growing shared component: cosines grow with depth
        entries[SignalNeed("visual_states", "llm", layer)] = base + pull * np.ones(16)
        attention = np.full((1, N), 1.0 / N)
        attention[0, 0] += layer  # concentration grows with depth
        entries[SignalNeed("attention", "llm", layer, "last")] = attention / attention.sum()
    recording = handmade_recording(LAYOUT, entries)
    table = redundancy_by_depth(recording)  # no visual_states_out: falls back to visual_states
    assert set(table["signal"].unique()) == {"visual_states", "attention"}
    trend = depth_trend(table)
    cos = trend.filter((trend["metric"] == "cos_mean") & (trend["signal"] == "visual_states"))
    assert cos["spearman"][0] == pytest.approx(1.0) and cos["grows"][0] and cos["n_layers"][0] == 4
    top = trend.filter((trend["metric"] == "top1_share") & (trend["rows"] == "last"))
    assert top["spearman"][0] == pytest.approx(1.0)
    n_tokens = trend.filter(trend["metric"] == "n_tokens")
    assert n_tokens["spearman"][0] is None and n_tokens["slope"][0] == pytest.approx(0.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    averaged = mean_over_samples(table)
    assert "sample_id" not in averaged.columns and set(averaged["n_samples"].unique()) == {1}


def test_spearman_and_entropy_by_hand():
    # y's tie shares rank 2.5: Pearson of ranks [1, 2, 3, 4] and [1, 2.5, 2.5, 4] = 4.5 / sqrt(5 * 4.5)
    assert spearman([1, 2, 3, 4], [10, 20, 20, 30]) == pytest.approx(0.9 ** 0.5)
    assert spearman([1, 2, np.nan, 3], [1, 2, 0, 3]) == pytest.approx(1.0)  # the NaN pair is left out
    assert spearman([1, 2, 3], [5, 5, 5]) is None and spearman([1], [2]) is None
    # shares 1/2, 1/4, 1/4, 0: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2 (the zero adds nothing)
    m = attention_metrics(np.array([[0.2, 0.1, 0.1, 0.0]]), ks=(2,))
    assert m["entropy"] == pytest.approx(1.5 * np.log(2)) and m["top2_share"] == pytest.approx(0.75)
    # singular values 3 and 1: p = (3/4, 1/4), effective rank exp(H(p)); participation (9 + 1)^2 / (81 + 1)
    diagonal = np.array([[3.0, 0.0], [0.0, 1.0]])
    h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    assert effective_rank(diagonal, center=False) == pytest.approx(np.exp(h))
    assert participation_ratio(diagonal, center=False) == pytest.approx(100 / 82)
    assert effective_rank(np.zeros((3, 2))) == 0.0
