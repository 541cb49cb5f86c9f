"""TopV: the transport plan's row sums rank the tokens; the cost's central, spatial and feature
terms each decide a hand-built case; a share of the budget is recovered evenly."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import SignalNeed
from workbench.pruning.methods.topv import TopV, contributions, even_pick, visual_cost

SOURCE = SignalNeed("visual_states_normed", "llm", 1)
TARGET = SignalNeed("visual_states_normed", "llm", 2)
SAME = np.ones((16, 3))  # identical features: the feature term is 0 everywhere


def test_reads_the_layer_input_and_output_and_acts_before_layer_k():
    assert TopV().needs(LLAVA_FACTS) == (SOURCE, TARGET)
    plan = TopV().select(handmade_context(grid_layout((4, 4)), 4, {SOURCE: SAME, TARGET: SAME}))
    assert [(s.where, s.position) for s in plan.stages] == [(2, "original")]


def test_one_sinkhorn_step_is_a_softmax_over_sources_per_target():
    # iterations=1: every target receives exactly 1/N, shared among sources by exp(-C / eps)
    cost = np.array([[0.0, 1.0], [1.0, 0.2], [0.5, 0.9]])
    plan = contributions(cost, 1.0, 1)
    e = np.exp(-cost)
    assert plan == pytest.approx(e / e.sum(axis=0) / 2)
    assert plan.sum(axis=0) == pytest.approx([0.5, 0.5])
    # more rounds pull the row sums towards the uniform source mass 1/3
    spread = [np.ptp(contributions(cost, 1.0, k).sum(axis=1)) for k in (1, 3, 50)]
    assert spread[0] > spread[1] > spread[2] and spread[2] < 1e-6


def test_the_central_term_keeps_the_middle_of_the_image():
    # identical features, spatial 0: importance = softmax(-central * d_i / eps), d_i the distance of
    # token i's centre from the image centre: middle 4 (5, 6, 9, 10) < edges < corners
    method = TopV(spatial=0.0, central=1.0, recover=0.0)
    context = handmade_context(grid_layout((4, 4)), 6, {SOURCE: SAME, TARGET: SAME})
    assert method.select(context).final_kept == (1, 2, 5, 6, 9, 10)  # + the first two edge tokens
    scores = np.asarray(method.select(context).stages[0].scores)
    d = np.array([np.hypot(c % 4 * 10 + 5 - 20, c // 4 * 10 + 5 - 20) for c in range(16)]) / np.hypot(40, 40)
    expected = np.exp(-d / 0.1) / np.exp(-d / 0.1).sum()
    assert scores == pytest.approx(expected)


def test_a_hub_token_supplies_the_most_output():
    # 1 x 4 grid, no spatial terms: three orthogonal tokens and one similar to all three
    features = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=float)
    context = handmade_context(grid_layout((1, 4)), 1, {SOURCE: features, TARGET: features})
    method = TopV(spatial=0.0, central=0.0, recover=0.0, epsilon=0.5)
    assert method.select(context).final_kept == (3,)
    cost = visual_cost(features, features, context.layout, 0.0, 0.0)
    assert cost[3, 0] == pytest.approx(1 - 1 / np.sqrt(3)) and cost[0, 1] == pytest.approx(1.0)


def test_recovered_tokens_are_spread_evenly_over_the_pruned():
    assert even_pick(np.arange(100, 112), 2).tolist() == [103, 109]
    # budget 6, recover round(0.34 * 6) = 2: the middle 4 by importance, then 2 of the 12 pruned
    # (0 1 2 3 4 7 8 11 12 13 14 15) at positions 3 and 9: tokens 3 and 13
    method = TopV(spatial=0.0, central=1.0, recover=0.34)
    context = handmade_context(grid_layout((4, 4)), 6, {SOURCE: SAME, TARGET: SAME})
    assert method.select(context).final_kept == (3, 5, 6, 9, 10, 13)


def test_the_spatial_term_favours_tokens_close_to_all_others():
    method = TopV(spatial=1.0, central=0.0, recover=0.0)
    context = handmade_context(grid_layout((3, 3)), 1, {SOURCE: SAME[:9], TARGET: SAME[:9]})
    assert method.select(context).final_kept == (4,)  # the centre of a 3 x 3 grid


def test_parameters_are_checked():
    for bad, message in [(dict(layer=0), "layer"), (dict(epsilon=0), "epsilon"), (dict(iterations=0), "iterations"),
                         (dict(recover=1.0), "recover"), (dict(spatial=-1), "spatial")]:
        with pytest.raises(ValueError, match=message):
            TopV(**bad)


def test_runs_on_the_shipped_model():
    execution, context = check_on_shipped(TopV())
    assert [s.where for s in execution.plan.stages] == [1]
    assert len(execution.final_kept) == context.n_keep


def test_runs_on_a_tiny_llava_next_with_tiles():
    adapter, prepared = tiny_input("llava_next")
    execution, context = run_checked(adapter, prepared, TopV(), 0.25, max_new_tokens=2)
    assert len(execution.final_kept) == context.n_keep
