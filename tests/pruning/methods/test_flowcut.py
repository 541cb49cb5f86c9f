"""FlowCut: the tower progression worked out by hand (``progression="simulated"``, the same step rule the
in-tower cuts use), the shipped model with the cuts inside the tower, applicability."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.flowcut import FlowCut, adaptive_prune_count, final_cut_layer
from workbench.pruning.plan import PRE_LLM
from workbench.pruning.registry import create_method
from workbench.pruning.run import run_method

# A 6-layer tower feeding the projector from layer 4 (hidden_states[5]): rpl = 3 - idx, so the
# adaptive cut follows layer 1 (rpl 2) and the final cut layer 3 (rpl 0).
SIX = ModelFacts("llava", decoder_layers=32, vision_layers=6, has_cls_token=True, projector_feed_layer=5)
SIMULATED = FlowCut(progression="simulated")


def flowcut_entries(cls_attention_layer1):
    base = np.arange(16, 0, -1, dtype=float)  # token i scores 16 - i in layers 0-2
    last = np.zeros(16)
    last[9] = 20.0
    last[12:] = 30.0  # the best tokens of layer 3 were cut after layer 1
    entries = {SignalNeed("flowcut", "tower", layer): base[None] for layer in range(3)}
    entries[SignalNeed("flowcut", "tower", 3)] = last[None]
    entries[SignalNeed("attention", "tower", 1, "cls")] = np.asarray(cls_attention_layer1)[None]
    return entries


def test_schedule_counts_down_from_the_projector_feed_layer():
    assert final_cut_layer(LLAVA_FACTS) == 21  # select_layer 22 in a 24-layer tower
    cls_layers = [n.layer for n in SIMULATED.needs(LLAVA_FACTS) if n.signal == "attention"]
    assert cls_layers == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert [n.layer for n in SIMULATED.needs(SIX)] == [0, 1, 2, 3, 1]
    assert FlowCut().needs(LLAVA_FACTS) == ()  # inside the tower every score is read live


def test_entropy_sets_the_adaptive_cut():
    # uniform over 4 of 16 patches: H/Hmax = log 4 / log 16 = 0.5 -> 12/sqrt(2) * 0.75 = 6.36 -> 6
    attention = np.full(16, 1e-12)
    attention[:4] = 0.25
    assert adaptive_prune_count(attention, 4, 2) == 6
    assert adaptive_prune_count(np.ones(16), 4, 2) == 0  # flat attention: nothing dropped


def test_progression_by_hand():
    # After layer 1: cumulative = 16 - i, 6 of 16 dropped -> tokens 0..9 survive.
    # Final (after layer 3): 0.5 * (16 - i) + 0.5 * s3  ->  9: 13.5, 0: 8, 1: 7.5, 2: 7 -> keep {0, 1, 2, 9}.
    # A one-shot top-4 of the final average would take 12..15 (0.5*(4..1) + 15), the last layer alone too.
    attention = np.full(16, 1e-12)
    attention[:4] = 0.25
    context = handmade_context(grid_layout((4, 4)), 4, flowcut_entries(attention), SIX)
    plan = SIMULATED.select(context)
    assert len(plan.stages) == 1 and plan.stages[0].where == PRE_LLM and plan.stages[0].position == "reindex"
    assert plan.final_kept == (0, 1, 2, 9)
    scores = plan.stages[0].score_array
    assert scores[9] == pytest.approx(13.5) and np.isnan(scores[12])


def test_flat_attention_drops_nothing_early():
    # Flat [CLS] attention -> no adaptive cut, all 16 reach layer 3: 12..15 (17, 16.5, 16, 15.5) win.
    context = handmade_context(grid_layout((4, 4)), 4, flowcut_entries(np.ones(16)), SIX)
    assert SIMULATED.select(context).final_kept == (12, 13, 14, 15)


def test_tower_tokens_need_a_map_onto_the_layout():
    entries = {SignalNeed("flowcut", "tower", 0): np.arange(16, dtype=float)[None]}
    shallow = ModelFacts("llava", 32, 3, True, 2)  # feeds from layer 1: one cut after layer 0
    assert SIMULATED.select(handmade_context(grid_layout((4, 4)), 3, entries, shallow)).final_kept == (13, 14, 15)
    # A layout without a tower map whose tower patches are not its tokens: a clear error, no guess.
    with pytest.raises(ValueError, match="no map from tower patches to layout tokens"):
        SIMULATED.select(handmade_context(grid_layout((2, 2), (4, 4)), 5, entries, shallow))


def test_validation_and_applicability():
    with pytest.raises(ValueError, match="running_average"):
        FlowCut(running_average=1.5)
    with pytest.raises(ValueError, match="position"):
        FlowCut(position="shifted")
    with pytest.raises(ValueError, match="progression"):
        FlowCut(progression="live")
    with pytest.raises(MethodNotApplicable, match="no \\[CLS\\]"):
        FlowCut().check_applies(NO_CLS_FACTS)
    tiled = dataclasses.replace(LLAVA_FACTS, multi_view=True)
    with pytest.raises(MethodNotApplicable, match="inside the vision tower.*progression=simulated"):
        FlowCut().check_applies(tiled)
    assert SIMULATED.applicability(tiled) is None
    assert create_method("flowcut") == FlowCut() and FlowCut().progression == "tower"


def test_shipped_model():
    # 3-layer tower fed from layer 2: one cut, after layer 1, inside the tower; layer 2 runs on the kept.
    execution, context = check_on_shipped(FlowCut())
    assert [s.where for s in execution.plan.stages] == ["tower:1"]
    assert execution.plan.stages[0].position == "reindex"
    # the simulated progression is the same single cut from the same unpruned layers 0-1 here
    simulated, _ = check_on_shipped(SIMULATED)
    assert simulated.plan.stages[0].where == PRE_LLM and simulated.final_kept == execution.final_kept


def test_tiny_llava_family():
    adapter, prepared = tiny_input("llava")
    execution, _ = run_checked(adapter, prepared, FlowCut(), 0.5)
    assert len(execution.plan.final_kept) == SelectionContext(prepared.layout, 0.5).n_keep
    assert [s.where for s in execution.plan.stages] == ["tower:0"]  # fed from layer 0: the cut follows it


def test_tiny_tiles_run_through_the_tower_map_and_qwen_is_not_applicable():
    adapter, prepared = tiny_input("llava_next")
    assert len(prepared.layout.tower_owner) > 1  # several tiles, folded onto the layout by the map
    with pytest.raises(MethodNotApplicable, match="several views"):
        run_method(adapter, prepared, FlowCut(), 0.5)  # the tiles are not pruned inside the tower
    execution, _ = run_checked(adapter, prepared, SIMULATED, 0.5)
    n_keep = SelectionContext(prepared.layout, 0.5).n_keep
    assert len(execution.plan.final_kept) == n_keep
    assert set(execution.plan.final_kept) <= set(range(prepared.layout.n_tokens))

    adapter, prepared = tiny_input("qwen2_vl")
    with pytest.raises(MethodNotApplicable, match="no \\[CLS\\]"):
        run_method(adapter, prepared, FlowCut(), 0.5)
