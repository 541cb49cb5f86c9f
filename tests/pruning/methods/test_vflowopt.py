"""VFlowOpt: the global-token importance, the pre-LLM drop with recycling and the in-LLM drops by hand."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import SignalNeed
from workbench.pruning.methods.vflowopt import SEARCHED, VFlowOpt, global_attention
from workbench.pruning.plan import PRE_LLM

FEED = LLAVA_FACTS.projector_feed_tower_layer


def test_importance_is_the_global_tokens_rows():
    a = np.array([[0.7, 0.1, 0.1, 0.1], [0.6, 0.1, 0.2, 0.1], [0.6, 0.0, 0.1, 0.3], [0.5, 0.4, 0.0, 0.1]])
    # received (column means) .6, .15, .1, .15; mean .25: with t = 2 only token 0 passes -> its row
    assert global_attention(a, 2.0) == pytest.approx(a[0])
    # t = 0.5: tokens 0, 1 and 3 (> .125) are global -> the mean of their rows (not the column means)
    assert global_attention(a, 0.5) == pytest.approx(a[[0, 1, 3]].mean(0))
    # nobody above 3 x mean: the most attended token stands in
    assert global_attention(a, 3.0) == pytest.approx(a[0])


S = np.array([.16, .15, .14, .13, .12, .11, .10, .09, .08, .07, .06, .05, .04, .085, .02, .01])


def test_drop_recycle_and_llm_stages_by_hand():
    # t = 0: every token is global, so the importance is the column mean = S. m = 13.5 * 4/27 = 2 on this
    # 4x4 grid ("scaled"): int(16 / 4) = 4 extra low tokens, so the 6 + 4 lowest (6..15) are grouped by 2x2
    # cell: {6, 7} -> 6, {8, 9, 12, 13} -> 13 (the best, not the first), {10, 11, 14, 15} -> 10, weights by S.
    # (A single view: the code would take its flat branch; "always" recycles here too.)
    method = VFlowOpt(vit_t=0.0, vit_m=13.5, llm_layers=(8, 16), llm_ratios=(1.0, 0.5), m_grid="scaled",
                      recycling="always")
    attention = {SignalNeed("attention", "tower", FEED, "visual"): np.tile(S, (16, 1))}
    context = handmade_context(grid_layout((4, 4)), 10, attention)
    pre, first, second = method.select(context).stages
    assert pre.where == PRE_LLM and pre.kept == (0, 1, 2, 3, 4, 5, 6, 10, 13) and pre.position == "reindex"
    by_target = {m.target: m for m in pre.merges}
    assert by_target[6].sources == (7,) and by_target[6].weights == pytest.approx((.10 / .19, .09 / .19))
    assert by_target[13].sources == (8, 9, 12)
    assert by_target[13].weights == pytest.approx(np.array([.085, .08, .07, .04]) / .275)
    assert by_target[10].sources == (11, 14, 15)
    # layer 8 keeps all 9 (ratio 1); layer 16 drops round(9 * 0.5) = 4 (half to even) lowest: 10, 13, 6, 5
    assert (first.where, first.kept, first.position) == (8, pre.kept, "original")
    assert (second.where, second.kept) == (16, (0, 1, 2, 3, 4))
    assert method.kept_counts(context) == (9, 9, 5)
    # a searched vit_r replaces the budget: 16 - round(16 * 0.75) = 4 kept, + 4 low = all 16 recycled:
    # one token per 2x2 cell, its best
    fixed = VFlowOpt(vit_t=0.0, vit_m=13.5, vit_r=0.25, llm_layers=(), llm_ratios=(), m_grid="scaled",
                     recycling="always")
    assert fixed.select(context).stages[0].kept == (0, 2, 10, 13)
    # m as the code (13.5 on a 4x4 grid): one cell and int(16 / 182) = 0 extra, so the 6 lowest (9, 10, 11,
    # 12, 14, 15) merge into their best, 9
    literal = VFlowOpt(vit_t=0.0, vit_m=13.5, llm_layers=(), llm_ratios=(), recycling="always")
    (stage,) = literal.select(context).stages
    assert stage.kept == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13)
    assert [(m.target, m.sources) for m in stage.merges] == [(9, (10, 11, 12, 14, 15))]
    # the code's flat branch on a single view: the top 10, nothing merged
    (flat,) = VFlowOpt(vit_t=0.0, vit_m=13.5, llm_layers=(), llm_ratios=()).select(context).stages
    assert flat.kept == (0, 1, 2, 3, 4, 5, 6, 7, 8, 13) and flat.merges == ()


def test_defaults_are_the_searched_10_percent_setting():
    method = VFlowOpt()
    assert (method.vit_t, method.alpha_v, method.vit_m, method.llm_ratios) == \
        (SEARCHED[0.1][0], SEARCHED[0.1][1], SEARCHED[0.1][2], SEARCHED[0.1][4])
    assert method.llm_schedule(LLAVA_FACTS) == ((10, (1.0,)), (21, (0.6011,)))


def test_parameters_are_checked():
    for bad, message in [(dict(alpha_v=0.5), "alpha_v"), (dict(vit_m=0.0), "vit_m"), (dict(vit_r=1.5), "vit_r"),
                         (dict(llm_ratios=(0.5,)), "llm_ratios"), (dict(llm_layers=(21, 10)), "strictly increasing"),
                         (dict(position="keep"), "position"), (dict(vit_t=-1.0), "vit_t"),
                         (dict(m_grid="x"), "m_grid"), (dict(recycling="x"), "recycling"),
                         (dict(newlines="x"), "newlines")]:
        with pytest.raises(ValueError, match=f"vflowopt: .*{message}"):
            VFlowOpt(**bad)


def test_shipped_model_and_families():
    execution, context = check_on_shipped(VFlowOpt())
    stages = execution.plan.stages
    # a single view: the code's flat branch keeps the top n_keep and merges nothing
    assert [s.where for s in stages] == [PRE_LLM, 1, 3] and not stages[0].merges
    assert len(stages[0].kept) == context.n_keep
    assert check_on_shipped(VFlowOpt(recycling="always"))[0].plan.stages[0].merges
    assert len(stages[2].kept) == round(len(stages[1].kept) * 0.6011)
    execution, _ = run_checked(*tiny_input("qwen2_vl"), VFlowOpt(), 0.25, max_new_tokens=2)
    assert execution.plan.stages[0].position == "original"


@pytest.mark.parametrize("family", ["llava", "llava_next", "llava_onevision", "qwen2_5_vl", "idefics3"])
def test_every_family(family):
    run_checked(*tiny_input(family), VFlowOpt(), 0.25, max_new_tokens=2)
