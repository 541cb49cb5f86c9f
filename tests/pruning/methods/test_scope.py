"""SCOPE: saliency x coverage gain worked out by hand, the shipped model, validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.methods.test_vispruner import feed_tensors, workbench_kept
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, SelectionContext, SignalNeed
from workbench.pruning.methods.scope import Scope, saliency_coverage

CLS22 = SignalNeed("attention", "tower", 22, "cls")
STATES22 = SignalNeed("visual_states_out", "tower", 22)


def unit(degrees):
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


def context(budget=2, model=LLAVA_FACTS):
    # tokens A, B, C, D at 0, 10, 90, 100 degrees; head-mean [CLS] attention 0.1, 0.2, 0.3, 0.4
    entries = {CLS22: [[0.1, 0.2, 0.3, 0.4]], STATES22: [unit(a) for a in (0, 10, 90, 100)]}
    return handmade_context(grid_layout((1, 4)), budget, entries, model=model)


def test_gain_times_saliency_by_hand():
    # cosines (negative ones cover nothing): A 1, .985, 0, -.174 / B .985, 1, .174, 0 / C 0, .174, 1, .985 /
    # D -.174, 0, .985, 1. Step 1 gains 1.985, 2.159, 2.159, 1.985 x saliency -> D (.794). Covered
    # 0, 0, .985, 1. Step 2 gains A 1.985, B 1.985, C .189 x saliency -> B (.397). Top-2 [CLS] would be C, D.
    plan = Scope().select(context())
    assert plan.final_kept == (1, 3)
    scores = plan.stages[0].score_array
    assert scores[3] == pytest.approx(0.4 * (1 + np.cos(np.radians(10))), abs=1e-6)
    assert scores[1] == pytest.approx(0.2 * (1 + np.cos(np.radians(10))), abs=1e-6)
    assert np.isnan(scores[[0, 2]]).all()


def test_additive_variant_and_the_head_sum():
    # "add", one head: step 1 scores A 2.085, B 2.359, C 2.459, D 2.385 -> C; covered 0, .174, 1, .985;
    # step 2 A 1.811 + .1, B 1.811 + .2, D .015 + .4 -> B.
    assert Scope(combine="add").select(context()).final_kept == (1, 2)
    # the reference sums the [CLS] row over heads: with 4 heads the saliencies are 0.4 .. 1.6, step 1 picks
    # D (1.985 + 1.6), step 2 B (1.985 + .8)
    four_heads = dataclasses.replace(LLAVA_FACTS, vision_heads=4)
    assert Scope(combine="add").select(context(model=four_heads)).final_kept == (1, 3)


def test_alpha_powers_the_saliency():
    s = np.array([[1.0, 0.0], [0.0, 1.0]])
    picks, _ = saliency_coverage(s, [0.5, 0.25], 1, alpha=2.0)
    assert picks.tolist() == [0]
    picks, scores = saliency_coverage(s, [0.5, 0.25], 2, alpha=2.0)
    assert picks.tolist() == [0, 1] and scores.tolist() == [0.25, 0.0625]


def test_defaults_needs_and_validation():
    assert (Scope().alpha, Scope().combine) == (1.0, "multi")
    assert Scope().needs(LLAVA_FACTS) == (CLS22, STATES22)
    assert Scope().needs(NO_CLS_FACTS) == ()
    with pytest.raises(ValueError, match="scope: combine must be one of \\('multi', 'add'\\), got 'max'"):
        Scope(combine="max")
    with pytest.raises(ValueError, match="scope: alpha must be a finite number >= 0, got -1"):
        Scope(alpha=-1)
    with pytest.raises(MethodNotApplicable, match="scope does not apply to qwen2_vl"):
        Scope().select(SelectionContext(grid_layout((2, 2)), 1, None, NO_CLS_FACTS))


def test_runs_on_tiny_llava_next():
    adapter, prepared = tiny_input("llava_next")
    execution, context = run_checked(adapter, prepared, Scope(), 0.5, max_new_tokens=2)
    assert len(execution.plan.final_kept) == context.n_keep


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(Scope())
    assert [len(st.kept) for st in execution.plan.stages] == [32]


def official_scope(k: int, alpha: float = 1.0, combined: str = "multi") -> set[int]:
    # kinredon/SCOPE scope/clip_encoder.py CLIPVisionTower_SCOPE.forward + SCOPE(), transliterated for one
    # image: [CLS] row of attentions[-2] summed over heads, hidden_states[-2] patch features
    features, attention = feed_tensors()
    saliency = attention.sum(dim=0) ** alpha
    unit = features / features.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.T
    n = len(unit)
    selected = torch.zeros(n, dtype=torch.bool)
    covered = torch.zeros(n, dtype=similarity.dtype)
    for _ in range(k):
        gains = torch.clamp(similarity.masked_fill(selected[None, :], 0) - covered[:, None], min=0).sum(dim=0)
        gains = gains * saliency if combined == "multi" else gains + saliency
        best = int(gains.masked_fill(selected, float("-inf")).argmax())
        selected[best] = True
        covered = torch.maximum(covered, similarity[best])
    return {int(i) for i in torch.nonzero(selected).flatten()}


@pytest.mark.parametrize("k", [16, 32, 48])
def test_parity_with_the_official_rule_on_the_shipped_model(k):
    assert set(workbench_kept(Scope(), k)) == official_scope(k)
    assert set(workbench_kept(Scope(combine="add", alpha=2.0), k)) == official_scope(k, 2.0, "add")
