"""HiPrune: anchors, buffers and registers worked out by hand, the shipped model, a [CLS]-free tower."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.methods.test_cls_attention import SHALLOW
from tests.pruning.shipped import check_on_shipped, folded, run_checked, tiny_input
from workbench.pruning.method import SignalNeed
from workbench.pruning.methods.hiprune import HiPrune


def mean(layer: int) -> SignalNeed:
    return SignalNeed("attention", "tower", layer, "mean")


def test_layers_follow_the_reference_configurations():
    assert HiPrune().layers(LLAVA_FACTS) == (8, 22)  # object layer 9 (1-based), deep = attentions[-2]
    assert HiPrune().layers(NO_CLS_FACTS) == (15, 31)  # Qwen2.5-VL: object layer 16 of 32, deep = last
    assert HiPrune().layers(SHALLOW) == (1, 2)
    assert HiPrune().needs(LLAVA_FACTS) == (mean(8), mean(22))
    assert HiPrune().applicability(NO_CLS_FACTS) is None


def scores(high: dict[int, float]) -> list[list[float]]:
    row = np.full(16, 0.01)
    for i, v in high.items():
        row[i] = v
    return [row]


def test_anchor_buffers_then_deep_registers():
    layout = grid_layout((4, 4))
    # budget 6, alpha 0.625: round(6 * 0.625 / 5) = 1 anchor: token 5 (cell 1,1) at the object layer;
    # buffers: its grid neighbours 1, 4, 6, 9; one register: the deep top among the rest (6 is taken -> 15)
    entries = {mean(8): scores({5: 0.9, 0: 0.5}), mean(22): scores({6: 0.9, 15: 0.8, 14: 0.7})}
    plan = HiPrune(alpha=0.625).select(handmade_context(layout, 6, entries))
    assert plan.final_kept == (1, 4, 5, 6, 9, 15)
    assert plan.stages[0].scores[15] == pytest.approx(0.8)


def test_grid_buffers_are_grid_neighbours_not_flat_index_neighbours():
    layout = grid_layout((4, 4))
    # anchor 4 = cell (1, 0): neighbours 0, 8, 5 (the reference's flat -1 would add 3 = cell (0, 3));
    # 6 - 4 = 2 registers by deep attention: 15 and 14 (3 is the deep third)
    entries = {mean(8): scores({4: 0.9}), mean(22): scores({15: 0.9, 14: 0.8, 3: 0.7})}
    plan = HiPrune(alpha=0.625, neighbours="grid").select(handmade_context(layout, 6, entries))
    assert plan.final_kept == (0, 4, 5, 8, 14, 15)


def test_default_flat_buffers_wrap_across_rows_and_clamp_like_the_reference():
    layout = grid_layout((4, 4))
    # anchor 4: flat 3, 5, 0, 8 (3 = the previous row's last token); one register: 15
    entries = {mean(8): scores({4: 0.9}), mean(22): scores({15: 0.9, 14: 0.8, 3: 0.7})}
    assert HiPrune(alpha=0.625).select(handmade_context(layout, 6, entries)).final_kept == (0, 3, 4, 5, 8, 15)
    # anchor 1: flat 0, 2, clamp(1 - 4) = 0, 5; two registers: 15, 14
    entries = {mean(8): scores({1: 0.9}), mean(22): scores({15: 0.9, 14: 0.8, 3: 0.7})}
    assert HiPrune(alpha=0.625).select(handmade_context(layout, 6, entries)).final_kept == (0, 1, 2, 5, 14, 15)


def test_default_alpha_rounds_like_the_reference():
    layout = grid_layout((4, 4))
    entries = {mean(8): scores({5: 0.9}), mean(22): scores({6: 0.9, 15: 0.8, 14: 0.7})}
    # round(6 * 0.1 / 5) = 0 anchors: the deep top-6 only
    plan = HiPrune().select(handmade_context(layout, 6, entries))
    assert plan.final_kept == (0, 1, 2, 6, 14, 15)


def test_tiny_budget_keeps_anchors_before_buffers():
    layout = grid_layout((4, 4))
    entries = {mean(8): scores({5: 0.9, 9: 0.5, 1: 0.4}), mean(22): scores({15: 0.9})}
    # k = 3, alpha = 1: round(0.6) = 1 anchor (5) with 4 neighbours; only 2 fit: 9 and 1 by object attention
    plan = HiPrune(alpha=1.0).select(handmade_context(layout, 3, entries))
    assert plan.final_kept == (1, 5, 9)


def test_runs_without_cls_on_handmade_qwen_facts():
    layout = grid_layout((4, 4))
    entries = {mean(15): scores({5: 0.9}), mean(31): scores({15: 0.9, 14: 0.8})}
    plan = HiPrune(alpha=0.625).select(handmade_context(layout, 6, entries, model=NO_CLS_FACTS))
    assert plan.final_kept == (1, 4, 5, 6, 9, 15)


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="alpha must be"):
        HiPrune(alpha=-0.1)
    with pytest.raises(ValueError, match="object_layer must be a 1-based layer"):
        HiPrune(object_layer=0)
    with pytest.raises(ValueError, match="neighbours must be one of"):
        HiPrune(neighbours="diagonal")


def test_runs_on_tiny_llava():
    adapter, prepared = tiny_input("llava")
    execution, _ = run_checked(adapter, prepared, HiPrune(), 0.5, max_new_tokens=2)
    assert len(execution.plan.final_kept) == (prepared.layout.n_tokens + 1) // 2


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_runs_on_tiny_multi_crop_and_merging_towers_through_the_tower_map(family):
    # LLaVA-NeXT: every crop of the tower folded onto the layout; Qwen2-VL: each token is the mean
    # of its 2x2 merged patches.
    adapter, prepared = tiny_input(family)
    layout = prepared.layout
    execution, context = run_checked(adapter, prepared, HiPrune(), 0.5, max_new_tokens=2)
    recording = context.recording
    assert len(execution.plan.final_kept) == context.n_keep
    deep = HiPrune().layers(context.model)[1]
    expected = folded(recording, layout, "attention", deep, "mean")
    np.testing.assert_allclose(execution.plan.stages[0].scores, expected)
    if family == "qwen2_vl":
        patches = recording.get("attention", deep, "mean", "tower")[0].double().numpy()
        assert len(patches) == 4 * layout.n_tokens
        np.testing.assert_allclose(expected, patches.reshape(-1, 4).mean(1))  # Qwen2-VL: blocks in token order


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(HiPrune())
    assert [len(st.kept) for st in execution.plan.stages] == [32]
