"""FastV: last-token ranking at layer K-1, a stage before layer K, original positions."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.fastv import FastV

LAST = SignalNeed("attention", "llm", 1, "last")
TEXT = SignalNeed("attention", "llm", 1, "text")


def entries():
    last = np.full((1, 16), 0.01)
    last[0, [5, 6, 9, 10]] = [0.30, 0.20, 0.25, 0.15]   # the last token looks at the centre
    last[0, [0, 3, 12, 15]] = 0.10
    text = np.full((3, 16), 0.01)
    text[:, [0, 3, 12, 15]] = [[0.4, 0.3, 0.2, 0.5], [0.3, 0.3, 0.3, 0.3], [0.2, 0.3, 0.4, 0.1]]
    text[:, 5] = [0.0, 0.0, 0.6]  # mean 0.2: below the corners' means 0.3
    return {LAST: last, TEXT: text}


def test_last_token_row_decides_before_layer_two():
    context = handmade_context(grid_layout((4, 4)), 4, entries())
    method = FastV()
    assert method.needs(LLAVA_FACTS) == (LAST,)  # layer K-1 = 1 ranks, K = 2 prunes
    plan = method.select(context)
    (stage,) = plan.stages
    assert stage.where == 2 and stage.position == "original"
    assert stage.kept == (5, 6, 9, 10)
    assert stage.scores[5] == pytest.approx(0.30)
    assert method.kept_counts(context) == (4,)


def test_text_rows_variant_averages_every_text_row():
    context = handmade_context(grid_layout((4, 4)), 4, entries())
    method = FastV(rows="text")
    assert method.needs(LLAVA_FACTS) == (TEXT,)
    assert method.select(context).final_kept == (0, 3, 12, 15)  # not the last row's centre


def test_layer_scales_to_the_decoder_and_parameters_are_checked():
    assert FastV().needs(NO_CLS_FACTS)[0].layer == 1  # K = round(2 * 28 / 32) = 2 -> layer 1 ranks
    shallow = ModelFacts("X", 3, 3, True, 3)
    assert FastV().prune_layer(shallow) == 1 and FastV().needs(shallow)[0].layer == 0
    for bad, message in [(dict(layer=0), "layer K"), (dict(rows="mean"), "rows must be")]:
        with pytest.raises(ValueError, match=message):
            FastV(**bad)


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(FastV())
    assert execution.plan.stages[0].where == 1


def test_runs_on_a_tiny_qwen2_vl():
    adapter, prepared = tiny_input("qwen2_vl")
    execution, _ = run_checked(adapter, prepared, FastV(), 0.5, max_new_tokens=2)
    assert len(execution.final_kept) == SelectionContext(prepared.layout, 0.5).n_keep
    assert execution.plan.stages[0].where == 1
