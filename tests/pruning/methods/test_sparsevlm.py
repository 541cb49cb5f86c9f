"""SparseVLM: raters, the per-layer schedule, pruning after the scoring layer, recycling by DPC-kNN."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.sparsevlm import (SparseVLM, dpc_knn, priority_head_count, relation_v2, rope_gravity,
                                                select_raters, sparse_stage)
from workbench.pruning.plan import Append, Merge


def test_raters_softmax_over_the_text_axis():
    # each visual token's softmax over 3 text tokens is (e^2, 1, 1)/(e^2 + 2) = (.787, .106, .106):
    # mean .333, only text token 0 is above it. A softmax over the visual axis would rate none
    # (both visual tokens are equal, every entry 0.5).
    visual, text = [[1.0, 0.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    context = handmade_context(grid_layout((1, 2)), 1, {SignalNeed("visual_states", "llm", 0): visual,
                                                        SignalNeed("text_states", "llm", 0): text})
    assert tuple(SparseVLM().raters(context)) == (0,)
    assert tuple(select_raters(visual, text)) == (0,)


def test_dpc_knn_finds_the_density_peaks():
    # k = 3 nearest (self included): densities peak at token 1 (left group) and token 4 (right);
    # scores density * distance-to-denser: 1 -> 5.45 (densest: the largest distance), 4 -> 5.15,
    # 3 -> 0.3, 5 -> 0.15, 0 -> 0.1, 2 -> 0.05 (times densities near 1): centres 1, 4, 3 in the
    # reference's topk order (score descending), the order its merged tokens are appended in
    x = np.array([0.0, 0.1, 0.15, 5.0, 5.3, 5.45])[:, None]
    centres, labels = dpc_knn(x, 3)
    assert tuple(centres) == (1, 4, 3)
    assert tuple(labels) == (0, 0, 0, 2, 1, 1)


def test_stage_keeps_top_and_recycles_the_best_deleted():
    relation = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.05, 0.25, 0.01, 0.02])
    states = np.arange(10, dtype=float)[:, None]
    stage = sparse_stage(3, np.arange(10), relation, 3, states, 10, "reindex")
    # keep 0, 2, 4; 7 deleted -> int(7 * 0.3) + 1 = 3 recycled (5, 7, 3), int(3 / 10) + 1 = 1 cluster;
    # equal densities (k=1: each token's own distance) -> the lowest index is the centre
    assert stage.kept == (0, 2, 3, 4) and stage.where == 3 and stage.position == "reindex"
    # the cluster's average as cluster_and_merge (each member weighted 1 / (3 + 1e-6)), a new token
    # named by its centre and appended after the kept visual tokens
    weights = (1 / (3 + 1e-6),) * 3
    assert stage.appends == (Append(3, (5, 7), weights, after=None),) and stage.merges == ()
    at_centre = sparse_stage(3, np.arange(10), relation, 3, states, 10, "reindex", recycle_at="centre")
    assert at_centre.kept == stage.kept and at_centre.merges == (Merge(3, (5, 7), weights),)
    assert at_centre.appends == ()
    plain = sparse_stage(3, np.arange(10), relation, 3, None, 10, "original", recycle=False)
    assert plain.kept == (0, 2, 4) and plain.merges == () and plain.appends == ()
    # asking for all 10 keeps M - 1 = 9; the one deleted (8) is recycled as a cluster of itself:
    # appended (scaled by 1 / (1 + 1e-6), as the code), or left in place
    full = sparse_stage(3, np.arange(10), relation, 10, states, 10, "original")
    assert full.kept == tuple(range(10)) and full.appends == (Append(8, (), (1 / (1 + 1e-6),)),)
    full = sparse_stage(3, np.arange(10), relation, 10, states, 10, "original", recycle_at="centre")
    assert full.kept == tuple(range(10)) and full.merges == () and full.appends == ()


def test_reference_schedule_and_kept_counts():
    context = SelectionContext(grid_layout((24, 24)), 128, None, LLAVA_FACTS)
    method = SparseVLM()
    assert method.reference_budget(context) == 128
    assert method.scoring_schedule(context) == ((2, 303), (6, 110), (15, 36))  # stages before 3, 7, 16
    # 576 -> 303 + 9 recycled (273 deleted: 82 recycled, 9 clusters) -> 110 + 7 (202: 61, 7) -> 36 + 3 (81: 25, 3)
    assert method.kept_counts(context) == (312, 117, 39)
    # 3 layers: 2, 6, 15 all score at layer 1 (capped at depth - 2): one stage before layer 2 keeping 36,
    # 540 deleted -> int(162) + 1 = 163 recycled -> int(16.3) + 1 = 17 clusters
    shallow = SelectionContext(grid_layout((24, 24)), 128, None, ModelFacts("X", 3, 3, True, 3))
    assert method.scoring_schedule(shallow) == ((1, 36),)
    assert method.kept_counts(shallow) == (36 + 17,)
    assert SparseVLM().reference_budget(SelectionContext(grid_layout((24, 24)), 200, None, LLAVA_FACTS)) == 192
    with pytest.raises(ValueError, match="three increasing"):
        SparseVLM(layers=(2, 6))


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(SparseVLM())
    stages = execution.plan.stages
    # 2 / 6 / 15 of 32 land on scoring layers 1 / 1 / 2 of 4; stages that score where the previous
    # one cuts fold into one, which acts before layer 3
    assert [s.where for s in stages] == [3] and stages[0].appends and not stages[0].merges
    # the recycled tokens follow the kept ones: the last visual tokens of every later layer
    assert execution.visual_tokens_per_layer[3] == len(stages[0].kept)
    execution, _ = check_on_shipped(SparseVLM(recycle_at="centre"))
    assert execution.plan.stages[0].merges and not execution.plan.stages[0].appends
    with pytest.raises(ValueError, match="recycle_at must be one of"):
        SparseVLM(recycle_at="start")


def test_runs_on_a_tiny_qwen2_vl_with_original_positions():
    execution, _ = run_checked(*tiny_input("qwen2_vl"), SparseVLM(), 0.25, max_new_tokens=2)
    assert [(s.where, s.position) for s in execution.plan.stages] == [(1, "original")]


def test_version_2_gravity_is_the_rope_only_logit():
    # head_dim 2, frequency 1: an all-ones vector rotated at p is (cos p - sin p, cos p + sin p), so
    # the product at (i, j) is 2 cos(i - j), over sqrt(2)
    angles = torch.arange(3, dtype=torch.float64)[:, None].repeat(1, 2)
    gravity = rope_gravity(angles.cos(), angles.sin(), torch.tensor([2]), torch.tensor([0, 1, 2]))
    np.testing.assert_allclose(gravity[0].numpy(), [math.sqrt(2) * math.cos(d) for d in (2, 1, 0)], atol=1e-12)


def test_version_2_keeps_the_priority_heads_after_the_correction():
    # 4 heads keep round(14 * 4 / 32) = 2. Uncorrected head sums .2, .6, .5, 0 -> heads 1, 2 -> (.3, .25);
    # gravity (2, 1) halves the first column: sums .15, .35, .45, 0 -> heads 2, 1 -> (.15, .25): the order flips
    probs = torch.tensor([[[0.1, 0.1]], [[0.5, 0.1]], [[0.1, 0.4]], [[0.0, 0.0]]], dtype=torch.float64)
    assert priority_head_count(4) == 2 and priority_head_count(32) == 14 and priority_head_count(1) == 1
    np.testing.assert_allclose(relation_v2(probs, torch.ones(1, 2)).numpy(), [0.3, 0.25])
    np.testing.assert_allclose(relation_v2(probs, torch.tensor([[2.0, 1.0]])).numpy(), [0.15, 0.25])


def test_version_2_schedule_positions_and_no_recycling():
    context = SelectionContext(grid_layout((24, 24)), 128, None, LLAVA_FACTS)
    v2 = SparseVLM(version="2_0")
    assert v2.scoring_schedule(context) == ((2, 238), (6, 108), (15, 60))
    assert v2.kept_counts(context) == (238, 108, 60)  # no recycled tokens
    assert (v2.recycles, v2.positions) == (False, "original")
    assert (SparseVLM().recycles, SparseVLM().positions) == (True, "reindex")
    assert SparseVLM(version="2_0", recycle=True, position="reindex").positions == "reindex"
    with pytest.raises(ValueError, match="sparsevlm: version must be one of"):
        SparseVLM(version="2")
    assert "M-RoPE" in SparseVLM(version="2_0").applicability(ModelFacts("X", 32, 24, True, 23, mrope=True))


def test_version_2_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(SparseVLM(version="2_0"))
    (stage,) = execution.plan.stages
    assert stage.where == 3 and stage.position == "original" and stage.merges == ()
