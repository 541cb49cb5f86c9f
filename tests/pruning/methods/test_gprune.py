"""G-Prune / P-Sigmoid: one ranking at layer start-1, thinned layer by layer along the schedule; the
schedule by hand on a 4-layer decoder, where the sigmoid's mid-point falls on a layer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.gprune import GPrune, p_sigmoid_rates

FOUR = ModelFacts("X", decoder_layers=4, vision_layers=3, has_cls_token=True, projector_feed_layer=3)
TEXT0 = SignalNeed("attention", "llm", 0, "text")

# Mean over the two text rows: token t scores (16 - t) / 100 except 15 -> .20 and 3 -> .01.
ROWS = np.tile((16 - np.arange(16)) / 100, (2, 1))
ROWS[:, 15] = [.30, .10]
ROWS[:, 3] = [.02, .00]


def test_p_sigmoid_runs_from_everything_to_the_budget():
    # 4 layers: reference depth x = 8 l; s(l) = 1 / (1 + exp(0.5 (8 l - 16))): s(1) = sig(4), s(2) = 1/2,
    # s(3) = sig(-4); rescaled to 1 at layer 1 and .25 at layer 3, layer 2 sits half way: .625
    rates = p_sigmoid_rates([1, 2, 3], 1, 4, 0.5, 16.0, 0.25)
    assert rates == pytest.approx([1.0, 0.625, 0.25])
    s = [1 / (1 + math.exp(0.5 * (8 * k - 16))) for k in (1, 2, 3)]
    assert p_sigmoid_rates([2], 1, 4, 0.5, 16.0, 0.0) == pytest.approx([(s[1] - s[2]) / (s[0] - s[2])])


def test_one_ranking_thinned_along_the_schedule_by_hand():
    method = GPrune()
    assert method.prune_layer(FOUR) == 1 and method.needs(FOUR) == (TEXT0,)
    context = handmade_context(grid_layout((4, 4)), 4, {TEXT0: ROWS}, FOUR)
    # 16 tokens, budget 4: layer 1 keeps all (no stage), layer 2 round(16 * .625) = 10, layer 3 keeps 4
    assert method.schedule(context) == ((2, 10), (3, 4))
    assert method.kept_counts(context) == (10, 4)
    first, second = method.select(context).stages
    # ranking: 0 (.16), 1 (.15), 2, 15 (.20 mean) ... token 3 is last
    assert first.where == 2 and first.kept == (0, 1, 2, 4, 5, 6, 7, 8, 9, 15)
    assert second.where == 3 and second.kept == (0, 1, 2, 15)
    assert first.position == second.position == "original"
    assert second.scores[15] == pytest.approx(.20)


def test_a_searched_schedule_replaces_the_sigmoid_and_the_budget():
    rates = tuple([1.0] * 8 + [0.75] * 8 + [0.5] * 8 + [0.25] * 8)
    context = handmade_context(grid_layout((4, 4)), 2, {TEXT0: ROWS}, FOUR)
    # decoder layer l takes reference layer round(8 l): 8 -> .75, 16 -> .5, 24 -> .25 of 16 tokens
    assert GPrune(rates=rates).schedule(context) == ((1, 12), (2, 8), (3, 4))
    with pytest.raises(ValueError, match="must not increase"):
        GPrune(rates=tuple([0.5] * 16 + [1.0] * 16))
    with pytest.raises(ValueError, match="32 keep rates"):
        GPrune(rates=(1.0, 0.5))


def test_on_the_reference_decoder_the_ranking_is_layer_ones_and_counts_fall_to_the_budget():
    method = GPrune(rows="last")
    assert method.needs(LLAVA_FACTS) == (SignalNeed("attention", "llm", 1, "last"),)
    context = SelectionContext(grid_layout((24, 24)), 64, None, LLAVA_FACTS)
    schedule = method.schedule(context)
    counts = [c for _, c in schedule]
    assert schedule[0][0] >= 2 and counts == sorted(counts, reverse=True) and counts[-1] == 64
    assert len(set(counts)) == len(counts)  # a stage only where the count drops


def test_parameters_are_checked():
    for bad, message in [(dict(start=0), "start"), (dict(start=40), "below 32"), (dict(slope=0), "slope"),
                         (dict(rows="mean"), "rows must be"), (dict(center=float("nan")), "center")]:
        with pytest.raises(ValueError, match=message):
            GPrune(**bad)


def test_runs_on_the_shipped_model():
    execution, context = check_on_shipped(GPrune())
    assert [s.where for s in execution.plan.stages] == [2, 3]
    assert len(execution.final_kept) == context.n_keep


def test_runs_on_a_tiny_qwen2_vl():
    adapter, prepared = tiny_input("qwen2_vl")
    execution, _ = run_checked(adapter, prepared, GPrune(), 0.25, max_new_tokens=2)
    assert execution.plan.stages
