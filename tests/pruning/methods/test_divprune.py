"""DivPrune: greedy max-min diversity on the projected visual tokens (vbdi/divprune llava_arch.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.budget import resolve_budget
from workbench.pruning.method import SignalNeed
from workbench.pruning.methods.divprune import DivPrune, greedy_max_min
from workbench.pruning.registry import create_method

STATES = SignalNeed("visual_states", "llm", 0)


def unit(degrees, scale=1.0):
    return [scale * np.cos(np.radians(degrees)), scale * np.sin(np.radians(degrees))]


# Six tokens on the unit circle at 0, 10, 90, 100, 180 and 45 degrees (token 0 scaled x5: cosine
# ignores norms). Nearest-other angles: 10, 10, 10, 10, 80 (token 4 -> token 3), 45 (token 5).
SIX = [unit(0, 5.0), unit(10), unit(90), unit(100), unit(180), unit(45)]


def context(budget, features=SIX, model=LLAVA_FACTS):
    return handmade_context(grid_layout((2, 3)), budget, {STATES: features}, model)


def test_first_pick_is_the_token_farthest_from_its_nearest_neighbour():
    # reference: argmax over columns of the second-smallest distance -> token 4 (80 degrees);
    # "first index" would give 0, "largest norm" would give 0 too.
    assert DivPrune().select(context(1)).final_kept == (4,)


def test_greedy_max_min_by_hand():
    # after 4: distance to {4}: 0:180, 1:170, 2:90, 3:80, 5:135 degrees -> 0;
    # min distance to {4, 0}: 1:10, 2:90, 3:80, 5:45 -> 2.  Kept {0, 2, 4}.
    # (Top-3 by nearest-neighbour distance, a plausible wrong reading, would keep {0, 4, 5}.)
    plan = DivPrune().select(context(3))
    assert plan.final_kept == (0, 2, 4)
    stage = plan.stages[0]
    assert stage.where == "pre_llm"
    scores = stage.score_array
    assert np.isnan(scores[[1, 3, 5]]).all()
    assert scores[4] == pytest.approx(1 - np.cos(np.radians(80)))
    assert scores[0] == pytest.approx(2.0)  # 1 - cos(180)
    assert scores[2] == pytest.approx(1.0)  # 1 - cos(90)


def test_ties_go_to_the_lower_index():
    square = [unit(0), unit(90), unit(180), unit(270)]  # every nearest neighbour at 90 degrees
    picks, _ = greedy_max_min(1 - np.asarray(square) @ np.asarray(square).T, 3)
    assert picks.tolist() == [0, 2, 1]  # 0 by tie, 2 opposite, then 1 and 3 tie -> 1


def test_count_rounds_half_to_even_like_the_code():
    # 0.75 of 6 tokens = 4.5: the code's int(round(4.5)) = 4; the workbench's half-up n_keep is 5
    assert DivPrune().kept_count(context(0.75)) == 4 == len(DivPrune().select(context(0.75)).final_kept)
    assert DivPrune().kept_counts(context(0.75)) == (4,)
    assert DivPrune(count="budget").kept_count(context(0.75)) == 5 == resolve_budget(0.75, 6)
    assert DivPrune().kept_count(context(5)) == 5  # a count is kept as given
    with pytest.raises(ValueError, match="count must be one of"):
        DivPrune(count="floor")


def test_budget_edges_and_registry():
    assert DivPrune().select(context(0)).final_kept == ()
    assert DivPrune().select(context(6)).final_kept == tuple(range(6))
    assert create_method("divprune") == DivPrune()
    assert "2503.02175" in DivPrune.reference
    with pytest.raises(ValueError, match="cannot pick"):
        greedy_max_min(np.zeros((3, 3)), 4)


def test_needs_no_cls():
    assert DivPrune().applicability(NO_CLS_FACTS) is None
    assert DivPrune().needs(NO_CLS_FACTS) == (STATES,)


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(DivPrune())
    assert execution.plan.stages[0].where == "pre_llm"


def test_runs_on_a_tiny_qwen2_vl():
    adapter, prepared = tiny_input("qwen2_vl")
    execution, _ = run_checked(adapter, prepared, DivPrune(), 0.5)
    assert len(execution.final_kept) == resolve_budget(0.5, prepared.layout.n_tokens)
