"""CDPruner: conditional DPP worked out by hand, the relevance sign, the shipped model, validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, SignalNeed
from workbench.pruning.methods.cdpruner import PROJECTED, TEXT, CDPruner, greedy_dpp, relevance_scores


def unit(degrees):
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


def test_greedy_map_by_hand():
    # diag 1, 1, .5 -> pick 0; conditional gains 0, 1 - .81 = .19, .5 -> pick 2 (the quality top-2 is 0, 1);
    # then 1 with gain .19
    kernel = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 0.5]])
    picks, gains = greedy_dpp(kernel, 2)
    assert picks.tolist() == [0, 2]
    assert gains[0] == pytest.approx(1.0) and gains[2] == pytest.approx(0.5) and np.isnan(gains[1])
    picks, gains = greedy_dpp(kernel, 3)
    assert picks.tolist() == [0, 2, 1] and gains[1] == pytest.approx(0.19)


def test_beyond_the_kernel_rank_the_rest_go_by_quality():
    v = np.array([1.0, 0.5, 0.8])
    picks, gains = greedy_dpp(np.outer(v, v), 3)  # rank 1: after token 0 every gain is 0
    assert picks.tolist() == [0, 2, 1]
    assert gains[0] == pytest.approx(1.0) and gains[1] == pytest.approx(0.0, abs=1e-12)


def test_relevance_is_min_max_normalised_cosine():
    visual = np.array([unit(0), unit(60), unit(90)])
    r = relevance_scores(visual, np.array([unit(0)]))
    np.testing.assert_allclose(r, [1 + 1e-6, 0.5 + 1e-6, 1e-6], atol=1e-12)
    r = relevance_scores(visual, np.array([unit(0)]), negate=True)  # the code's sign
    np.testing.assert_allclose(r, [1e-6, 0.5 + 1e-6, 1 + 1e-6], atol=1e-12)
    assert relevance_scores(visual, np.array([unit(0)]), theta=0.5)[0] == pytest.approx(np.exp(0.5 * (1 + 1e-6)))
    np.testing.assert_allclose(relevance_scores(visual[:1], np.array([unit(0)])), [1.0])  # one token: no spread


def test_select_conditions_on_the_instruction():
    # visual tokens at 0, 10, 90 degrees; the instruction at 0 degrees. Relevance (paper sign): ~1, .985, ~0;
    # kernel diagonal r^2 -> pick 0, then 1 (gain .97 * (1 - .97) = .029 beats token 2's ~1e-12).
    layout = grid_layout((1, 3))
    entries = {PROJECTED: [unit(0), unit(10), unit(90)], TEXT: [unit(0)]}
    assert CDPruner(negate_relevance=False).select(handmade_context(layout, 2, entries)).final_kept == (0, 1)
    # the code's negated relevance (the default): ~0, .015, ~1 -> pick 2, then 1 (gain ~2.2e-4 beats ~1e-12)
    assert CDPruner().select(handmade_context(layout, 2, entries)).final_kept == (1, 2)


def test_diversity_beats_a_duplicate():
    # four tokens; 0 and 1 are duplicates, the instruction sits between them and token 2. Relevance: cosines
    # .966, .966, .707, -.966 -> normalised 1, 1, .866, 0. Pick 0 (tie with 1: lower index); gains then
    # 1: 1 - 1 = 0, 2: .75 - (.5 * .866)^2 = .5625, 3: 0 -> 2. Top-2 by relevance would be the duplicates.
    layout = grid_layout((1, 4))
    entries = {PROJECTED: [unit(0), unit(0), unit(60), unit(180)], TEXT: [unit(15)]}
    plan = CDPruner(negate_relevance=False).select(handmade_context(layout, 2, entries))
    assert plan.final_kept == (0, 2)
    assert np.isnan(plan.stages[0].score_array[[1, 3]]).all()


def test_needs_validation_and_missing_text():
    assert set(CDPruner().needs(LLAVA_FACTS)) == {PROJECTED, TEXT}
    # a multi-view model: every tower patch's projected feature too (the code's multi-crop path), at the feed layer
    next_facts = dataclasses.replace(LLAVA_FACTS, multi_view=True)
    patches = SignalNeed("projected_patches", "tower", 22)
    assert set(CDPruner().needs(next_facts)) == {PROJECTED, TEXT, patches}
    assert set(CDPruner(crops="budget").needs(next_facts)) == {PROJECTED, TEXT}
    assert CDPruner().crops == "reference" and CDPruner().clip is None
    assert CDPruner().applicability(NO_CLS_FACTS) is None  # no [CLS] needed
    assert (CDPruner().negate_relevance, CDPruner().theta) == (True, None)  # the code's sign
    with pytest.raises(ValueError, match="cdpruner: theta must be None or a number in \\[0, 1\\), got 1.0"):
        CDPruner(theta=1.0)
    with pytest.raises(ValueError, match="cdpruner: negate_relevance must be True or False, got 1"):
        CDPruner(negate_relevance=1)
    layout = grid_layout((1, 2))
    with pytest.raises(MethodNotApplicable, match="cdpruner: no text token"):
        CDPruner().select(handmade_context(layout, 1, {PROJECTED: [unit(0), unit(9)], TEXT: np.zeros((0, 2))}))


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_runs_on_tiny_families(family):
    adapter, prepared = tiny_input(family)
    execution, context = run_checked(adapter, prepared, CDPruner(), 0.5, max_new_tokens=2)
    # the code's multi-crop rule keeps T in every view (more than the budget on LLaVA-NeXT), and says so
    assert (len(execution.plan.final_kept),) == CDPruner().kept_counts(context)
    assert (len(execution.plan.final_kept) > context.n_keep) == (family == "llava_next")
    budget, _ = run_checked(adapter, prepared, CDPruner(crops="budget"), 0.5, max_new_tokens=2)
    assert len(budget.plan.final_kept) == context.n_keep


def test_runs_on_the_shipped_model():
    execution, context = check_on_shipped(CDPruner())
    assert [len(st.kept) for st in execution.plan.stages] == [32]
    # one view: the crop rule changes nothing there (the shipped model's kept sets stay the code's)
    assert CDPruner(crops="budget").select(context).to_dict() == CDPruner().select(context).to_dict()


def test_a_multi_view_layout_without_the_stitched_grid_takes_the_budget_rule():
    adapter, prepared = tiny_input("llava_onevision")  # pooled crops: no padded stitched grid to follow
    execution, context = run_checked(adapter, prepared, CDPruner(), 0.5, max_new_tokens=1)
    assert execution.plan.final_kept == CDPruner(crops="budget").select(context).final_kept
    assert len(execution.plan.final_kept) == context.n_keep
