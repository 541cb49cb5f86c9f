"""Stages inside the vision tower: later tower layers attend only to the kept tokens, merges act on tower
features, the LLM receives only what the tower passed on, and the plan records what ran."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS
from tests.pruning.shipped import shipped_sample, tiny_input
from workbench.pruning.executor import execute
from workbench.pruning.plan import PRE_LLM, KeepPlan, Merge, PlanError, Stage, describe_where, tower_layer
from workbench.pruning.tower_stages import TowerStageError, in_tower_reason, tower_inputs

KEPT = (0, 3, 4, 9, 17, 30, 31, 50, 70, 71)


def tower_rows_seen(adapter, prepared, plan, callback=None):
    """(rows each tower layer's attention got, the decoder inputs, the tower stages applied)."""
    seen = {}

    def hook(i):
        def pre_hook(module, args, kwargs):
            seen[i] = (args[0] if args else kwargs["hidden_states"]).shape[1]
        return pre_hook

    handles = [adapter.vision_attention(i).register_forward_pre_hook(hook(i), with_kwargs=True)
               for i in range(len(adapter.vision_layers()))]
    try:
        llm, applied = tower_inputs(adapter, prepared, plan, callback)
    finally:
        for handle in handles:
            handle.remove()
    return seen, llm, applied


@torch.no_grad()
def unpruned_tower(adapter, prepared):
    return adapter.vision_tower()(prepared.inputs["pixel_values"], output_hidden_states=True).hidden_states


def test_later_tower_layers_attend_only_to_the_kept_tokens():
    adapter, prepared, _ = shipped_sample()
    n = prepared.layout.n_tokens
    plan = KeepPlan("t", len(KEPT), n, (Stage("tower:1", KEPT, position="reindex"),))
    seen, llm, applied = tower_rows_seen(adapter, prepared, plan)
    assert seen == {0: n + 1, 1: n + 1, 2: len(KEPT) + 1}  # layer 2: [CLS] + the kept patches, no other keys
    assert [s.where for s in applied] == ["tower:1"]

    # Layer 2's output on the kept patches is that of the layer run on [CLS] + kept alone, not the unpruned one.
    hidden = unpruned_tower(adapter, prepared)
    rows = torch.tensor((0,) + tuple(k + 1 for k in KEPT))
    alone = adapter.vision_layers()[2](hidden[2][:, rows], None)
    alone = alone[0] if isinstance(alone, tuple) else alone
    projector = adapter.model.model.multi_modal_projector
    positions = torch.as_tensor(prepared.layout.positions[list(KEPT)])
    torch.testing.assert_close(llm.inputs_embeds[0, positions], projector(alone[0, 1:]), atol=1e-5, rtol=1e-5)
    unpruned = projector(hidden[3][0, rows[1:]])
    assert (llm.inputs_embeds[0, positions] - unpruned).abs().max() > 1e-3


def test_the_executor_passes_only_the_kept_tokens_and_records_the_tower_stage():
    adapter, prepared, _ = shipped_sample()
    n = prepared.layout.n_tokens
    plan = KeepPlan("t", len(KEPT), n, (Stage("tower:1", KEPT, position="reindex"),))
    execution = execute(adapter, prepared, plan, max_new_tokens=1)
    assert execution.plan == plan  # the tower stage ran and nothing else
    assert execution.visual_tokens_per_layer == (len(KEPT),) * len(adapter.decoder_layers())
    assert execution.tokens_per_layer[0] == prepared.layout.sequence_length - (n - len(KEPT))


def test_keep_all_tower_stage_reproduces_the_unpruned_inputs():
    adapter, prepared, _ = shipped_sample()
    n = prepared.layout.n_tokens
    plan = KeepPlan("t", n, n, (Stage("tower:0", tuple(range(n))),))
    _, llm, _ = tower_rows_seen(adapter, prepared, plan)
    torch.testing.assert_close(llm.inputs_embeds, adapter.decoder_inputs(prepared).inputs_embeds, atol=1e-6, rtol=0)


def test_tower_merges_act_on_the_features_that_feed_the_projector():
    adapter, prepared, _ = shipped_sample()
    n = prepared.layout.n_tokens
    merge = Merge(4, (5, 6), (1.0, 0.5, 0.5))
    plan = KeepPlan("t", 2, n, (Stage("tower:2", (4, 9), merges=(merge,)),))
    _, llm, _ = tower_rows_seen(adapter, prepared, plan)
    feature = unpruned_tower(adapter, prepared)[3][0]  # the feed layer's output, [CLS] first
    expected = adapter.model.model.multi_modal_projector(feature[5] + 0.5 * feature[6] + 0.5 * feature[7])
    torch.testing.assert_close(llm.inputs_embeds[0, int(prepared.layout.positions[4])], expected, atol=1e-5, rtol=1e-5)


def test_a_callback_sees_the_live_tower_and_its_stage_is_recorded():
    adapter, prepared, _ = shipped_sample()
    n = prepared.layout.n_tokens
    states = {}

    def callback(layer, state):
        states[layer] = (state.call.n_keys, state.visual_indices.copy(), state.cls_row)
        return Stage("tower:0", KEPT) if layer == 0 else None

    execution = execute(adapter, prepared, KeepPlan("t", len(KEPT), n), max_new_tokens=1, tower_callback=callback)
    assert [s.where for s in execution.plan.stages] == ["tower:0"] and execution.final_kept == KEPT
    assert states[0][0] == n + 1 and states[1][0] == states[2][0] == len(KEPT) + 1
    assert tuple(states[2][1]) == KEPT and states[2][2] == 0

    with pytest.raises(PlanError, match="a layer takes one stage"):
        execute(adapter, prepared, KeepPlan("t", len(KEPT), n, (Stage("tower:0", KEPT),)), max_new_tokens=1,
                tower_callback=callback)


def test_tower_stages_in_plans():
    stage = Stage("tower:3", (1, 2))
    assert stage.in_tower and not stage.in_llm and tower_layer("tower:3") == 3 and tower_layer(PRE_LLM) is None
    assert describe_where("tower:3") == "after vision-tower layer 3"
    plan = KeepPlan("t", 1, 4, (Stage("tower:1", (1, 2, 3)), stage, Stage(PRE_LLM, (2,)), Stage(2, (2,))))
    assert KeepPlan.from_dict(plan.to_dict()) == plan
    assert plan.kept_at(PRE_LLM) == (2,) and plan.kept_at("tower:1") == (1, 2, 3)
    with pytest.raises(PlanError, match="strictly increasing"):
        KeepPlan("t", 1, 4, (Stage(PRE_LLM, (1, 2)), stage))
    with pytest.raises(PlanError, match="tower:<layer>"):
        Stage("tower:x", (1,))


def test_towers_that_cannot_be_pruned_inside_say_why():
    assert in_tower_reason(LLAVA_FACTS) is None
    assert "[CLS] tower" in in_tower_reason(NO_CLS_FACTS)
    assert "several views" in in_tower_reason(dataclasses.replace(LLAVA_FACTS, multi_view=True))
    adapter, prepared = tiny_input("llava_next")
    n = prepared.layout.n_tokens
    with pytest.raises(TowerStageError, match="one to one"):
        execute(adapter, prepared, KeepPlan("t", 1, n, (Stage("tower:0", (0,)),)), max_new_tokens=1)
    adapter, prepared, _ = shipped_sample()
    with pytest.raises(PlanError, match="after tower layers \\[7\\]"):
        execute(adapter, prepared, KeepPlan("t", 1, prepared.layout.n_tokens, (Stage("tower:7", (0,)),)))
    assert np.array_equal(prepared.layout.tower_owner[0], np.arange(prepared.layout.n_tokens))
