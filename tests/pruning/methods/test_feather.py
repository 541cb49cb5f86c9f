"""FEATHER: RoPE-free last-token attention united with a stride-3 grid, then a deeper second cut."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, shipped_sample, tiny_input
from workbench.pruning.executor import execute
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SignalNeed
from workbench.pruning.methods.feather import Feather, norope_last_attention, stride_grid
from workbench.pruning.plan import KeepPlan
from workbench.pruning.run import record_needs, run_method

NOROPE = SignalNeed("attention_norope_visual", "llm", 7, "last")


def bottom_rows_entries():
    scores = np.full((1, 36), 0.001)
    scores[0, 24:36] = np.linspace(0.1, 0.2, 12)  # the last two rows of a 6x6 grid lead
    scores[0, 0] = 0.0  # grid tokens may score lowest: the grid keeps them anyway
    return {NOROPE: scores}


def test_first_cut_is_attention_top_k_united_with_the_grid():
    # final matching, n_keep = 4 of 36: keep fraction sqrt(4/36) = 1/3 -> top 12, grid [::3, ::3] = 0, 3, 18, 21
    context = handmade_context(grid_layout((6, 6)), 4, bottom_rows_entries())
    method = Feather(budget_mode="final")
    assert method.needs(LLAVA_FACTS) == (NOROPE,)  # layer 7's RoPE-free attention cuts before layer 8
    (stage,) = method.select(context).stages
    assert stage.where == 8 and stage.position == "original"
    assert stage.kept == (0, 3, 18, 21) + tuple(range(24, 36))
    assert method.kept_counts(context) == (16, 4)  # then 4 before layer 16


def test_default_fixed_reference_ratio_keeps_thirty_percent_plus_grid():
    # r = 0.7 on 36 tokens: int(36 * 0.3) = 10 by attention (tokens 26..35) + 4 grid = 14 survivors,
    # then int(14 * 0.09) = 1 (the code's second cut counts the survivors, not N); the budget is ignored
    context = handmade_context(grid_layout((6, 6)), 4, bottom_rows_entries())
    method = Feather()
    assert method.budget_mode == "fixed"
    assert method.select(context).final_kept == (0, 3, 18, 21) + tuple(range(26, 36))
    assert method.kept_counts(context) == (14, 1)


def test_grid_is_per_group():
    layout = grid_layout((4, 4), (2, 5))  # 0..15, then 16..25
    assert tuple(stride_grid(layout, 3)) == (0, 3, 12, 15, 16, 19)


def test_parameters_and_shallow_decoders():
    for bad, message in [(dict(layers=(8,)), "two increasing"), (dict(ratio=1.0), "ratio"),
                         (dict(stride=0), "stride"), (dict(budget_mode="mean"), "budget_mode")]:
        with pytest.raises(ValueError, match=message):
            Feather(**bad)
    assert Feather().applicability(LLAVA_FACTS) is None
    # 8 and 16 on 2 layers both land on layer 1
    assert "distinct layers" in Feather().applicability(ModelFacts("X", 2, 3, True, 3))


def test_not_applicable_on_a_two_layer_tiny_qwen2_vl():
    adapter, prepared = tiny_input("qwen2_vl")
    with pytest.raises(MethodNotApplicable, match="feather does not apply to qwen2_vl: its two cuts"):
        run_method(adapter, prepared, Feather(), 0.25)


def test_runs_on_the_shipped_model():
    execution, context = check_on_shipped(Feather())
    stages = execution.plan.stages
    assert [s.where for s in stages] == [1, 2] and len(stages[1].kept) == int(len(stages[0].kept) * 0.09)
    assert set(stride_grid(context.layout, 3)) <= set(stages[0].kept)
    final, context = check_on_shipped(Feather(budget_mode="final"))
    assert len(final.plan.stages[1].kept) == context.n_keep


def test_first_cut_reads_what_the_second_cut_computes_live():
    # both cuts rank by the reference's per-head softmax over the image keys: the recording's
    # value on the unpruned forward equals the live computation on the unpruned state
    adapter, prepared, _ = shipped_sample()
    method = Feather()
    (need,) = method.needs(ModelFacts.of(adapter))
    recorded = record_needs(adapter, prepared, [method]).get(need.signal, need.layer, need.rows)[0]
    live = {}

    def grab(layer, state):
        if layer == need.layer:
            live["scores"] = norope_last_attention(state)

    execute(adapter, prepared, KeepPlan.keep_all(prepared.layout.n_tokens, where=None), max_new_tokens=0,
            callback=grab)
    np.testing.assert_allclose(recorded.double().numpy(), live["scores"], atol=1e-6, rtol=1e-5)
    assert abs(live["scores"].sum() - 1) < 1e-9
