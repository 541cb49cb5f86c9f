"""Method comparison on a hand-made sweep table whose values are computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from analyses.comparison import (accuracy_curves, coverage, evidence_recall_by_budget, final_kept, jaccard,
                                 kept_overlap, kept_sets, spatial_coverage, spatial_coverage_per_sample,
                                 wilson_interval)
from tests.pruning.handmade import grid_layout
from workbench.sweep import frame

N = 16  # a 4 x 4 grid


def _stages(*kept_lists):
    return json.dumps([{"where": w, "kept": list(k), "position": "original", "merges": []}
                       for w, k in zip(["pre_llm", 2, 4], kept_lists)])


def _row(sample, method, budget, kept, correct, recall=None, status="ok", stages=None):
    return {"sample_id": sample, "method": method, "budget": budget, "budget_tokens": 4 if budget == "25%" else 8,
            "n_visual": N, "status": status, "stages": stages if stages is not None else _stages(kept),
            "correct": correct, "evidence_recall": recall, "params": "{}", "question_type": "all"}


def table() -> pl.DataFrame:
    rows = [
        _row("s1", "unpruned", "100%", range(N), True, 1.0, stages=json.dumps([])),
        _row("s2", "unpruned", "100%", range(N), True, 1.0, stages=json.dumps([])),
        _row("s1", "a", "25%", [0, 1, 2, 3], True, 0.5),
        _row("s2", "a", "25%", [0, 1, 2, 3], False, 0.0),
        _row("s1", "b", "25%", [2, 3, 4, 5], True, 1.0),
        _row("s2", "b", "25%", [0, 5, 10, 15], True, None),
        _row("s1", "a", "50%", range(8), True, 1.0),
        _row("s2", "a", "50%", range(8), True, 1.0),
        _row("s1", "b", "50%", range(8, 16), False, 0.0),
        _row("s2", "b", "50%", [], None, None, status="failed", stages=""),
        # a two-stage plan: the final stage counts
        _row("s1", "c", "25%", None, False, 0.25, stages=_stages(range(8), [0, 5, 10, 15])),
    ]
    return frame(rows)


def test_final_kept_reads_the_last_stage():
    assert final_kept(_stages(range(8), [3, 1]), N).tolist() == [1, 3]
    assert final_kept(json.dumps([]), 5).tolist() == [0, 1, 2, 3, 4]
    assert jaccard([0, 1, 2, 3], [2, 3, 4, 5]) == pytest.approx(2 / 6) and jaccard([], []) == 1.0
    sets = kept_sets(table())
    assert sets.height == 8 and "unpruned" not in sets["method"].to_list()


def test_jaccard_between_methods_by_hand():
    overlap = kept_overlap(table())

    def value(budget, a, b, column="jaccard"):
        part = overlap.filter((pl.col("budget") == budget) & (pl.col("method_a") == a) & (pl.col("method_b") == b))
        return part[column][0]

    # 25%: s1 {0,1,2,3} vs {2,3,4,5} = 2/6; s2 {0,1,2,3} vs {0,5,10,15} = 1/7
    assert value("25%", "a", "b") == pytest.approx((2 / 6 + 1 / 7) / 2)
    assert value("25%", "b", "a") == value("25%", "a", "b")
    assert value("25%", "a", "b", "n_samples") == 2
    assert value("25%", "a", "a") == 1.0
    # c ran on s1 only: {0,5,10,15} vs a's {0,1,2,3} = 1/7
    assert value("25%", "a", "c") == pytest.approx(1 / 7) and value("25%", "a", "c", "n_samples") == 1
    # 50%: b failed on s2, so only s1: disjoint halves
    assert value("50%", "a", "b") == 0.0 and value("50%", "a", "b", "n_samples") == 1
    assert overlap["budget_tokens"].to_list()[0] == 8.0  # largest budget first


def test_evidence_recall_by_hand():
    recall = evidence_recall_by_budget(table())
    row = recall.filter((pl.col("method") == "a") & (pl.col("budget") == "25%"))
    assert row["recall"][0] == pytest.approx(0.25) and row["n_samples"][0] == 2
    assert row["recall_std"][0] == pytest.approx(0.25) and row["recall_sem"][0] == pytest.approx(0.25 / math.sqrt(2))
    row = recall.filter((pl.col("method") == "b") & (pl.col("budget") == "25%"))
    assert row["recall"][0] == 1.0 and row["n_samples"][0] == 1  # the null recall is left out


def test_spatial_coverage_by_hand():
    cells = np.array([[r, c] for r in range(4) for c in range(4)])
    groups, shapes = np.zeros(N, dtype=int), [(4, 4)]
    # 4 x 4 into 3 x 3 regions: index r * 3 // 4 maps rows / cols 0, 1, 2, 3 to regions 0, 0, 1, 2,
    # so the first row of tokens covers regions (0, 0), (0, 1), (0, 2)
    first_row = coverage([0, 1, 2, 3], cells, groups, shapes, distances=(0, 1))
    assert first_row["region_coverage"] == pytest.approx(3 / 9)
    assert first_row["cell_coverage@0"] == pytest.approx(4 / 16)
    assert first_row["cell_coverage@1"] == pytest.approx(8 / 16)  # rows 0 and 1
    corners = coverage([0, 3, 12, 15], cells, groups, shapes, distances=(1,))
    assert corners["region_coverage"] == pytest.approx(4 / 9)
    assert corners["cell_coverage@1"] == pytest.approx(16 / 16)
    assert coverage([], cells, groups, shapes, distances=(1,)) == {"region_coverage": 0.0, "cell_coverage@1": 0.0}
    per = spatial_coverage_per_sample(table(), grid=(4, 4), distances=(1,))
    layouts = {"s1": grid_layout((4, 4)), "s2": grid_layout((4, 4))}
    assert per.equals(spatial_coverage_per_sample(table(), layouts=layouts, distances=(1,)))
    mean = spatial_coverage(table(), grid=(4, 4), distances=(1,))
    row = mean.filter((pl.col("method") == "b") & (pl.col("budget") == "25%") & (pl.col("metric") == "region_coverage"))
    # s1 {2,3,4,5}: cells (0,2),(0,3),(1,0),(1,1) -> regions (0,1),(0,2),(0,0) = 3; s2 corners+diagonal (0,0),(1,1),(2,2),(3,3) -> 3
    assert row["value"][0] == pytest.approx(3 / 9) and row["n_samples"][0] == 2
    with pytest.raises(ValueError):
        spatial_coverage(table(), grid=(3, 3))


def test_accuracy_with_wilson_intervals_by_hand():
    acc = accuracy_curves(table())
    row = acc.filter((pl.col("method") == "a") & (pl.col("budget") == "25%"))
    assert (row["n"][0], row["correct"][0], row["accuracy"][0]) == (2, 1, 0.5)
    # Wilson, p = 1/2, n = 2, z = 1.96: centre 1/2, half = z * sqrt(1/8 + z^2/16) / (1 + z^2/2)
    z = 1.96
    half = z * math.sqrt(0.25 / 2 + z * z / 16) / (1 + z * z / 2)
    assert row["ci_low"][0] == pytest.approx(0.5 - half) and row["ci_high"][0] == pytest.approx(0.5 + half)
    full = acc.filter(pl.col("method") == "unpruned")
    assert full["accuracy"][0] == 1.0 and full["ci_high"][0] == pytest.approx(1.0)
    # p = 1, n = 2: lower bound n / (n + z^2)
    assert full["ci_low"][0] == pytest.approx(2 / (2 + z * z))
    b50 = acc.filter((pl.col("method") == "b") & (pl.col("budget") == "50%"))
    assert b50["n"][0] == 1 and b50["accuracy"][0] == 0.0  # the failed row is not counted
    assert wilson_interval(0, 0) == (None, None)
    lo, hi = wilson_interval(30, 100)
    assert (lo, hi) == pytest.approx((0.2189, 0.3958), abs=1e-4)  # the textbook 95% interval of 30/100


def test_kept_position_reads_rows_and_columns_of_the_kept_tokens():
    import json as _json

    import polars as _pl

    from analyses.comparison import kept_position

    def row(sample, method, kept):
        return {"sample_id": sample, "method": method, "budget": "25%", "budget_tokens": len(kept), "n_visual": 9,
                "status": "ok", "stages": _json.dumps([{"where": "pre_llm", "kept": kept, "merges": []}])}

    # A 3x3 grid: tokens 6, 7, 8 are the bottom row; 0 and 8 the two opposite corners.
    table = _pl.DataFrame([row("a", "bottom", [6, 7, 8]), row("b", "bottom", [6, 7]),
                           row("a", "corners", [0, 8])])
    out = {r["method"]: r for r in kept_position(table, grid=(3, 3)).iter_rows(named=True)}
    assert out["bottom"]["row_centroid"] == 1.0 and out["bottom"]["n_samples"] == 2
    assert out["bottom"]["col_centroid"] == (0.5 + 0.25) / 2
    assert out["corners"]["row_centroid"] == 0.5 == out["corners"]["col_centroid"]


def test_pareto_front_by_hand():
    from analyses.comparison import pareto_front

    # (cost, accuracy): b beats a (cheaper, as good); c is dearer but better; d is beaten by c; e ties c
    cost = [0.5, 0.4, 0.8, 0.9, 0.8]
    accuracy = [0.7, 0.7, 0.9, 0.85, 0.9]
    assert pareto_front(cost, accuracy).tolist() == [False, True, True, False, True]


def test_accuracy_vs_cost_marks_the_front():
    from analyses.comparison import accuracy_vs_cost

    rows = []
    for sample in ("s0", "s1"):
        for method, budget, correct, flops, time, layers in (
                ("unpruned", "100%", True, 1.0, 2.0, [4, 4]), ("cheap", "25%", False, 0.2, 0.5, [1, 1]),
                ("good", "25%", True, 0.5, 1.0, [4, 1]), ("waste", "25%", False, 0.6, 1.5, [4, 2])):
            rows.append({"sample_id": sample, "method": method, "budget": budget, "status": "ok", "correct": correct,
                         "flops_ratio": flops, "prefill_time_s": time, "kept_count": layers[-1],
                         "visual_tokens_per_layer": layers, "budget_tokens": 1, "n_visual": 4, "stages": "[]"})
    points = accuracy_vs_cost(pl.DataFrame(rows))
    by = {r["method"]: r for r in points.iter_rows(named=True)}
    assert by["good"]["time_ratio"] == 0.5 and by["good"]["effective_tokens"] == 2.5
    # "good" is as accurate as the unpruned model for half its FLOPs: the unpruned point is beaten
    assert {m for m, r in by.items() if r["pareto_flops"]} == {"cheap", "good"}
    assert not by["waste"]["pareto_time"]
