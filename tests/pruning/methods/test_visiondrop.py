"""VisionDrop: the tower stage and an in-LLM stage worked out by hand, the shipped model, families."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.visiondrop import VisionDrop
from workbench.pruning.plan import PRE_LLM, Append, Merge, Stage
from workbench.pruning.run import run_method

FEED = LLAVA_FACTS.projector_feed_tower_layer  # 22


def tower_entries():
    cls = np.full(16, 0.01)
    cls[[5, 10, 15]] = [0.3, 0.25, 0.2]
    keys = np.tile([0.1, 1.0], (16, 1))  # most tokens point to token 7
    keys[[0, 5]] = [1.0, 0.0]  # token 0 and the dominant token 5
    keys[[1, 2, 3, 4, 12, 13]] = [1.0, 0.1]
    keys[7] = [0.0, 1.0]
    return {SignalNeed("attention", "tower", FEED, "cls"): cls[None],
            SignalNeed("visual_keys", "tower", FEED): keys}


def test_tower_stage_by_hand():
    # dominant 4 = [CLS] + 3 patches: 5, 10, 15. Others in layout order (13): step 13 // 2 = 6 -> targets
    # at 0 and 6 = tokens 0, 7. 1, 2, 3, 4, 12, 13 are closest to token 0; 6, 8, 9, 11, 14 to token 7.
    # Target + mean(sources). (Merging into the dominant tokens instead would fold 1-4, 12, 13 into 5.)
    method = VisionDrop(dominant=4, contextual=2, llm_layers=(), llm_tokens=(), reference_budget=5)
    plan = method.select(handmade_context(grid_layout((4, 4)), 5, tower_entries()))
    (stage, reorder) = plan.stages
    assert stage.where == f"tower:{FEED}" and stage.kept == (0, 5, 7, 10, 15)  # inside the tower, after layer 22
    assert stage.position == "reindex"
    merges = {Merge(0, (1, 2, 3, 4, 12, 13), (1.0,) + (1 / 6,) * 6), Merge(7, (6, 8, 9, 11, 14), (1.0,) + (1 / 5,) * 5)}
    assert set(stage.merges) == merges
    # the tower's output order [CLS, dominant..., contextual...]: the [CLS] (reserved index 16) comes in
    # before the first patch, the targets move behind the dominant tokens
    cls = Append(16, (), (1.0,), before=0)
    assert reorder.where == PRE_LLM and reorder.kept == stage.kept + (16,) and reorder.appends == (
        cls, Append(0, (), (1.0,)), Append(7, (), (1.0,)))
    # The deviations as named values: the same selection as a pre_llm stage (merged and moved at once);
    # every token in place; the [CLS] slot left empty (4 patches, no [CLS]) or given to a patch (5).
    simulated = dataclasses.replace(method, progression="simulated")
    (pre,) = simulated.select(handmade_context(grid_layout((4, 4)), 5, tower_entries())).stages
    assert pre.where == PRE_LLM and pre.kept == stage.kept + (16,) and not pre.merges
    assert pre.appends[0] == cls and [(a.token, a.sources, a.weights) for a in pre.appends[1:]] == sorted(
        (m.target, m.sources, m.weights) for m in merges)
    in_place, entry = dataclasses.replace(method, order="layout").select(
        handmade_context(grid_layout((4, 4)), 5, tower_entries())).stages
    assert in_place == stage and entry == Stage(PRE_LLM, stage.kept + (16,), position="reindex", appends=(cls,))
    empty = dataclasses.replace(method, cls_slot="empty").select(handmade_context(grid_layout((4, 4)), 5, tower_entries()))
    assert empty.stages[0] == stage and empty.final_kept == stage.kept
    patch = dataclasses.replace(method, cls_slot="patch")
    assert len(patch.select(handmade_context(grid_layout((4, 4)), 5, tower_entries())).final_kept) == 6


def test_llm_stage_averages_visual_rows():
    # Live state: row 0 system, rows 1-4 visual (ids 2, 5, 7, 9), row 5 text. Visual->visual attention
    # averaged over the 4 visual query rows: 0.325, 0.5, 0.05, 0.125 -> dominant id 5 (the last row
    # alone would pick id 9). Others 2, 7, 9: one target (step 3) = id 2, which absorbs 7 and 9.
    visual = torch.tensor([[1.0, 0, 0, 0], [0.1, 0.9, 0, 0], [0.1, 0.8, 0.1, 0], [0.1, 0.3, 0.1, 0.5]])
    probs = torch.zeros(2, 4, 6)
    probs[:, :, 1:5] = visual
    state = SimpleNamespace(visual_rows=torch.tensor([1, 2, 3, 4]), visual_indices=np.array([2, 5, 7, 9]),
                            attention=lambda rows: probs,
                            keys=lambda: torch.tensor([[[0.0, 0], [1, 0], [0, 1], [1, 1], [1, 2], [0, 0]]]))
    method = VisionDrop(dominant=4, contextual=0, llm_layers=(8,), llm_tokens=((1, 1),), reference_budget=2)
    context = SelectionContext(grid_layout((4, 4)), 2, None, LLAVA_FACTS)
    assert method.kept_counts(context) == (3, 4, 2)  # 3 patches in the tower; + the [CLS] before the LLM
    callback = method.layer_callback(context)
    assert callback(7, state) is None
    stage = callback(8, state)
    assert stage.where == 8 and stage.kept == (2, 5) and stage.position == "reindex"
    # the code's order: id 2, merged with 7 and 9, moves behind the dominant id 5
    assert stage.appends == (Append(2, (7, 9), (1.0, 0.5, 0.5)),) and stage.merges == ()
    assert stage.score_array[5] == pytest.approx(0.5) and np.isnan(stage.score_array[0])
    in_place = dataclasses.replace(method, order="layout").layer_callback(context)(8, state)
    assert in_place.merges == (Merge(2, (7, 9), (1.0, 0.5, 0.5)),) and in_place.appends == ()


def test_schedule_scales_the_reference():
    context = SelectionContext(grid_layout((24, 24)), 32, None, LLAVA_FACTS)
    # the tower stage after the feed layer: 41 patches + the [CLS] (main.py: dominant - 1)
    assert VisionDrop().schedule(context) == [(f"tower:{FEED}", 41, 6), (8, 30, 5), (16, 22, 4), (24, 16, 3)]
    assert VisionDrop(progression="simulated", cls_slot="patch").schedule(context)[0] == (PRE_LLM, 42, 6)
    shallow = SelectionContext(grid_layout((12, 12)), 64, None, ModelFacts("llava", 3, 3, True, 3))
    # x2; 8 -> 1, 16 and 24 -> 2 (the later counts win); the tower's tokens reordered before the LLM,
    # where the [CLS] joins them: 96 = the code's 84 + 12 tokens enter the LLM
    assert VisionDrop().kept_counts(shallow) == (95, 96, 70, 38)
    assert VisionDrop(order="layout").kept_counts(shallow) == (95, 96, 70, 38)
    assert VisionDrop(order="layout", cls_slot="empty").kept_counts(shallow) == (95, 70, 38)
    assert VisionDrop(progression="simulated").kept_counts(shallow) == (96, 70, 38)


def test_validation_and_applicability():
    with pytest.raises(ValueError, match="tower_score"):
        VisionDrop(tower_score="text")
    with pytest.raises(ValueError, match="one \\(dominant, contextual\\) pair"):
        VisionDrop(llm_tokens=((1, 1),))
    with pytest.raises(ValueError, match="progression"):
        VisionDrop(progression="inside")
    with pytest.raises(ValueError, match="cls_slot must be one of"):
        VisionDrop(cls_slot=True)
    with pytest.raises(ValueError, match="order must be one of"):
        VisionDrop(order="sorted")
    with pytest.raises(MethodNotApplicable, match="tower_score='visual'"):
        VisionDrop().check_applies(NO_CLS_FACTS)
    with pytest.raises(MethodNotApplicable, match="inside the vision tower.*progression=simulated"):
        VisionDrop(tower_score="visual").check_applies(NO_CLS_FACTS)
    assert VisionDrop(tower_score="visual", progression="simulated").applicability(NO_CLS_FACTS) is None


def test_shipped_model():
    execution, _ = check_on_shipped(VisionDrop())
    assert [len(st.kept) for st in execution.plan.stages] == [47, 48, 35, 26, 19]  # the [CLS] enters the LLM
    assert [st.where for st in execution.plan.stages] == ["tower:2", PRE_LLM, 1, 2, 3]
    tower, *llm = execution.plan.stages[:1] + execution.plan.stages[2:]
    assert tower.merges and all(any(a.sources for a in st.appends) for st in llm)


def test_visual_fallback_by_hand():
    # Tower visual->visual attention averaged over the 16 query rows: token 3 (0.5) beats token 6
    # ((5 + 15 * 0.01) / 16 = 0.32), which query row 0 alone would pick.
    attention = np.full((16, 16), 0.01)
    attention[:, 3] = 0.5
    attention[0, 6] = 5.0
    entries = {SignalNeed("attention", "tower", 31, "visual"): attention,
               SignalNeed("visual_keys", "tower", 31): np.eye(16)}
    method = VisionDrop(dominant=1, contextual=0, llm_layers=(), llm_tokens=(), reference_budget=1,
                        tower_score="visual", position="original", progression="simulated")
    plan = method.select(handmade_context(grid_layout((4, 4)), 1, entries, NO_CLS_FACTS))
    assert plan.final_kept == (3,) and plan.stages[0].merges == ()


def test_tiny_families():
    run_checked(*tiny_input("llava"), VisionDrop(), 0.5)

    adapter, prepared = tiny_input("qwen2_vl")
    with pytest.raises(MethodNotApplicable, match="no \\[CLS\\]"):
        run_method(adapter, prepared, VisionDrop(), 0.5)
    # Qwen2-VL merges 2x2 tower patches into one LLM token: the tower map folds them (visual fallback).
    run_checked(adapter, prepared, VisionDrop(tower_score="visual", position="original", progression="simulated"), 0.5)

    # LLaVA-NeXT: several tiles, each read in the tower and folded onto the layout by the map; the
    # tower stage cannot run inside a tiled tower, so only the simulated one applies.
    adapter, prepared = tiny_input("llava_next")
    assert len(prepared.layout.tower_owner) > 1
    with pytest.raises(MethodNotApplicable, match="several views"):
        run_method(adapter, prepared, VisionDrop(), 0.5)
    for method in (VisionDrop(progression="simulated"), VisionDrop(tower_score="visual", progression="simulated")):
        run_checked(adapter, prepared, method, 0.5)
