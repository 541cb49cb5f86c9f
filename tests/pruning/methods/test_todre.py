"""ToDRE: greedy k-center before the LLM, then text->visual attention inside the LLM (layer 2, scaled)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SignalNeed
from workbench.pruning.methods.todre import ToDRE, diverse_count
from workbench.pruning.plan import PRE_LLM, KeepPlan
from workbench.pruning.run import run_method


def unit(degrees):
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


FEED = LLAVA_FACTS.projector_feed_tower_layer  # 22: the tower layer whose output the projector sees
ENTRIES = {
    # tower features of the 6 tokens at 0, 10, 20, 90, 100, 180 degrees (distance 1 - cos)
    SignalNeed("visual_states_out", "tower", FEED): [unit(a) for a in (0, 10, 20, 90, 100, 180)],
    # [CLS] attention: token 4 is the most attended
    SignalNeed("attention", "tower", FEED, "cls"): [[0.1, 0.2, 0.1, 0.2, 0.3, 0.1]],
    # decoy: projected features where every token is alike but 1 (features='llm' would differ)
    SignalNeed("visual_states", "llm", 0): [unit(a) for a in (0, 90, 1, 2, 3, 4)],
}


def context(budget, model=LLAVA_FACTS):
    return handmade_context(grid_layout((2, 3)), budget, ENTRIES, model)


def test_stage_one_is_greedy_k_center_on_the_tower_features():
    method = ToDRE()
    ctx = context(2)
    assert method.kept_counts(ctx) == (4, 2)  # ceil(2 / 0.5) diverse tokens, then the budget
    plan = method.select(ctx)
    # first centre: token 5 (180 deg), whose nearest other token (100 deg) is 80 deg away, all
    # others have a neighbour 10 deg away. Angles to the set {5}: 0:180, 1:170, 2:160, 3:90, 4:80
    # -> 0. To {5, 0}: 1:10, 2:20, 3:90, 4:80 -> 3. To {5, 0, 3}: 1:10, 2:20, 4:10 -> 2.
    assert len(plan.stages) == 1
    stage = plan.stages[0]
    assert stage.where == PRE_LLM and stage.kept == (0, 2, 3, 5)
    # (top-4 by isolation, a plausible wrong rule, would keep 5 and three of the 10-degree-close tokens;
    # keeping the tokens nearest the seed would keep 5, 4, 3, 2)
    scores = stage.score_array
    assert scores[0] == pytest.approx(2.0) and scores[3] == pytest.approx(1.0)
    assert scores[2] == pytest.approx(1 - np.cos(np.radians(20)))
    assert np.isnan(scores[[1, 4]]).all()


def test_first_centre_by_cls_attention():
    # first centre 4 (most [CLS]-attended, 100 deg). To {4}: 0:100, 1:90, 2:80, 3:10, 5:80 -> 0.
    # To {4, 0}: 1:10, 2:20, 3:10, 5:80 -> 5. To {4, 0, 5}: 1:10, 2:20, 3:10 -> 2.
    plan = ToDRE(first="cls").select(context(2))
    assert plan.stages[0].kept == (0, 2, 4, 5)
    assert np.isnan(plan.stages[0].score_array[4])  # the seed is given, not scored
    # features='llm' on the decoy (0, 90, 1, 2, 3, 4 deg): seed 1 (its nearest other is 86 deg away);
    # to {1}: 0 is farthest (90) -> 0; to {1, 0}: 2:1, 3:2, 4:3, 5:4 deg -> 5; to {1, 0, 5}: 2:1, 3:2, 4:1 -> 3.
    assert ToDRE(features="llm").select(context(2)).stages[0].kept == (0, 1, 3, 5)


def fake_state(layer):
    """The sequence entering ``layer`` after stage 1 kept (0, 2, 3, 5): visual rows 3..6, text rows 7, 8."""
    # attention [H=2, R=2 (text rows 7, 8), S=9]; visual key columns 3, 4, 5, 6 = tokens 0, 2, 3, 5
    probs = torch.zeros(2, 2, 9)
    probs[0, 0, 3:7] = torch.tensor([0.1, 0.0, 0.5, 0.1])
    probs[0, 1, 3:7] = torch.tensor([0.3, 0.0, 0.0, 0.2])
    probs[1, 0, 3:7] = torch.tensor([0.1, 0.2, 0.4, 0.1])
    probs[1, 1, 3:7] = torch.tensor([0.3, 0.0, 0.0, 0.2])
    asked = []

    def attention(rows):
        asked.append(rows.tolist())
        return probs[:, : len(rows)]

    state = SimpleNamespace(layer=layer, visual_indices=np.array([0, 2, 3, 5]), visual_rows=torch.arange(3, 7),
                            text_rows=torch.tensor([7, 8]), attention=attention)
    return state, asked


def test_stage_two_keeps_the_tokens_the_text_attends_most():
    method = ToDRE()
    ctx = context(2)
    callback = method.layer_callback(ctx)
    assert method.prune_layer(LLAVA_FACTS) == 2
    assert callback(1, fake_state(1)[0]) is None and callback(3, fake_state(3)[0]) is None
    state, asked = fake_state(2)
    stage = callback(2, state)
    assert asked == [[7, 8]]  # every text row after the image
    # mean over heads and text rows: token 0: (.1+.3+.1+.3)/4 = .2, 2: .2/4 = .05, 3: .9/4 = .225,
    # 5: .6/4 = .15 -> keep 3 and 0. (The last text row alone, FastV-style, would keep 0 and 5.)
    assert stage.where == 2 and stage.kept == (0, 3) and stage.position == "original"
    np.testing.assert_allclose(stage.score_array, [0.2, np.nan, 0.05, 0.225, np.nan, 0.15])
    plan = KeepPlan("todre", 2, 6, (method.select(ctx).stages[0], stage))  # the two stages chain
    assert [len(s.kept) for s in plan.stages] == list(method.kept_counts(ctx))


def test_defaults_schedule_and_validation():
    method = ToDRE()
    assert (method.layer, method.relevance_keep, method.features, method.first) == (2, 0.5, "tower", "isolated")
    assert method.needs(LLAVA_FACTS) == (SignalNeed("visual_states_out", "tower", 22),)
    assert SignalNeed("attention", "tower", 22, "cls") in ToDRE(first="cls").needs(LLAVA_FACTS)
    assert ToDRE(features="llm").needs(LLAVA_FACTS) == (SignalNeed("visual_states", "llm", 0),)
    assert method.prune_layer(ModelFacts("llava", 3, 3, True, 3)) == 1
    assert diverse_count(64, 576, 0.5) == 128 and diverse_count(400, 576, 0.5) == 576
    assert diverse_count(5, 576, 1.0) == 5 and diverse_count(0, 576, 0.5) == 0
    assert ToDRE(relevance_keep=1).kept_counts(context(3)) == (3, 3)
    with pytest.raises(MethodNotApplicable, match="no \\[CLS\\]"):
        ToDRE(first="cls").check_applies(NO_CLS_FACTS)
    assert ToDRE().applicability(NO_CLS_FACTS) is None
    with pytest.raises(MethodNotApplicable, match="at least 2 decoder layers"):
        method.check_applies(ModelFacts("llava", 1, 3, True, 3))
    for bad, message in [(dict(layer=0), "layer"), (dict(relevance_keep=0), "relevance_keep"),
                         (dict(relevance_keep=1.5), "relevance_keep"), (dict(features="x"), "features"),
                         (dict(first="x"), "first")]:
        with pytest.raises(ValueError, match=message):
            ToDRE(**bad)


@pytest.mark.parametrize("first", ["isolated", "cls"])
def test_runs_on_the_shipped_model(first):
    execution, context = check_on_shipped(ToDRE(first=first))
    stages = execution.plan.stages
    assert [st.where for st in stages] == [PRE_LLM, 1]  # layer 2 of 32 on a 4-layer decoder
    assert stages[-1].kept == tuple(sorted(stages[-1].kept)) and set(stages[-1].kept) <= set(stages[0].kept)
    assert len(stages[-1].kept) == context.n_keep


def test_runs_on_a_tiny_qwen2_vl():
    adapter, prepared = tiny_input("qwen2_vl")
    # Qwen2-VL merges 2x2 tower patches into one LLM token: the tower map folds them (mean features)
    execution, context = run_checked(adapter, prepared, ToDRE(), 0.25)
    assert len(execution.plan.final_kept) == context.n_keep
    with pytest.raises(MethodNotApplicable, match="no \\[CLS\\]"):
        run_method(adapter, prepared, ToDRE(first="cls", features="llm"), 0.5)
    execution, context = run_checked(adapter, prepared, ToDRE(features="llm"), 0.25)
    assert execution.plan.stages[-1].kept and len(execution.plan.final_kept) == context.n_keep


@pytest.mark.parametrize("first", ["isolated", "cls"])
def test_runs_on_a_tiny_llava_next_through_the_tower_map(first):
    adapter, prepared = tiny_input("llava_next")
    assert len(prepared.layout.tower_owner) > 1  # several tiles
    execution, context = run_checked(adapter, prepared, ToDRE(first=first), 0.25)
    assert len(execution.plan.final_kept) == context.n_keep


def test_tower_features_without_a_map_are_refused_clearly():
    # 16 tower rows for 20 visual tokens and no tower map: no guess, a clear error.
    layout = grid_layout((2, 2), (4, 4))
    entries = {SignalNeed("visual_states_out", "tower", 22): np.eye(16)}
    with pytest.raises(ValueError, match="no map from tower patches.*features='llm'"):
        ToDRE().select(handmade_context(layout, 4, entries, LLAVA_FACTS))
