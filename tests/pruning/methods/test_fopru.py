"""FoPru: the significance is the attention each patch receives in the tower; rank keeps the best
tokens anywhere, row keeps the best whole grid rows; both by hand on a 4 x 4 grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import SignalNeed
from workbench.pruning.methods.fopru import FoPru, row_keep
from workbench.pruning.plan import PRE_LLM

FEED = LLAVA_FACTS.projector_feed_tower_layer
RECEIVED = SignalNeed("attention", "tower", FEED, "mean")

# Row means: row 0 .25, row 1 .40, row 2 .10, row 3 .30; the single best tokens sit in rows 0 and 2.
SIGNIFICANCE = np.array([[.90, .05, .03, .02,
                          .40, .40, .40, .40,
                          .01, .01, .01, .37,
                          .30, .30, .30, .30]])


def context(budget, facts=LLAVA_FACTS):
    return handmade_context(grid_layout((4, 4)), budget, {RECEIVED: SIGNIFICANCE}, facts)


def test_reads_the_attention_each_patch_receives_at_the_feed_layer():
    assert FoPru().needs(LLAVA_FACTS) == (RECEIVED,)
    assert FoPru().needs(NO_CLS_FACTS) == (SignalNeed("attention", "tower", 31, "mean"),)  # no [CLS] needed
    assert FoPru().applicability(NO_CLS_FACTS) is None


def test_rank_keeps_the_most_significant_tokens_anywhere():
    (stage,) = FoPru().select(context(5)).stages
    # .90 (0), then the .40s of row 1 (4..7; ties to the lower index)
    assert stage.where == PRE_LLM and stage.kept == (0, 4, 5, 6, 7)
    assert stage.position == "reindex" and stage.scores[0] == pytest.approx(.90)
    assert FoPru().select(context(7)).final_kept == (0, 4, 5, 6, 7, 11, 12)  # .37 beats the .30s


def test_row_keeps_whole_rows_by_their_mean():
    row = FoPru(strategy="row")
    # budget 8: rows 1 (.40) and 3 (.30) whole; row 0 (.25, holding the best token .90) is not kept
    assert row.select(context(8)).final_kept == (4, 5, 6, 7, 12, 13, 14, 15)
    # budget 10: two whole rows, then the 2 best tokens of the next row by mean (row 0): 0 and 1
    assert row.select(context(10)).final_kept == (0, 1, 4, 5, 6, 7, 12, 13, 14, 15)
    # budget 3: no whole row fits; the best 3 of the best row (ties: lower index)
    assert row.select(context(3)).final_kept == (4, 5, 6)


def test_row_ranking_spans_every_grid_of_the_layout():
    layout = grid_layout((2, 2), (2, 3))  # group 0: tokens 0..3, group 1: tokens 4..9
    significance = np.array([.1, .1, .5, .5, .2, .2, .2, .6, .6, .6])
    # rows by mean: group 1 row 1 (.6), group 0 row 1 (.5), group 1 row 0 (.2), group 0 row 0 (.1)
    assert row_keep(layout, significance, 5).tolist() == [2, 3, 7, 8, 9]
    assert row_keep(layout, significance, 6).tolist() == [2, 3, 4, 7, 8, 9]


def test_positions_stay_original_on_mrope_models_and_parameters_are_checked():
    mrope = dataclasses.replace(LLAVA_FACTS, mrope=True)
    assert FoPru().select(context(4, mrope)).stages[0].position == "original"
    assert FoPru(position="original").select(context(4)).stages[0].position == "original"
    with pytest.raises(ValueError, match="strategy must be one of"):
        FoPru(strategy="column")
    with pytest.raises(ValueError, match="position must be one of"):
        FoPru(position="shifted")


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_runs_on_the_shipped_model(strategy):
    execution, context_ = check_on_shipped(FoPru(strategy=strategy))
    assert [s.where for s in execution.plan.stages] == [PRE_LLM]
    assert len(execution.final_kept) == context_.n_keep


def test_runs_on_a_tiny_qwen2_vl_without_cls():
    adapter, prepared = tiny_input("qwen2_vl")
    execution, context_ = run_checked(adapter, prepared, FoPru(strategy="row"), 0.5, max_new_tokens=2)
    assert len(execution.final_kept) == context_.n_keep
    assert execution.plan.stages[0].position == "original"  # M-RoPE
