"""VScan: the local and global scans and the merge worked out by hand, the middle-layer stage, the
shipped model."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, SelectionContext, SignalNeed
from workbench.pruning.methods.vscan import VScan, local_scan, window_size_on
from workbench.pruning.plan import PRE_LLM, Merge

DEEP = LLAVA_FACTS.projector_feed_tower_layer  # 22 (the code's -2)


def entries():
    shallow = np.full(16, 0.01)
    shallow[[5, 2, 12, 15]] = [0.5, 0.4, 0.3, 0.2]  # the best of each 2x2 window
    shallow[4] = 0.45  # second in its window: a global top-4 by the shallow scores would take it
    deep = np.full(16, 0.01)
    deep[[5, 0, 1, 3, 9, 10]] = [0.9, 0.5, 0.4, 0.3, 0.2, 0.1]
    features = np.radians([0, 10, 20, 30, 41, 50, 62, 73, 80, 90, 100, 110, 120, 130, 140, 150])
    return {SignalNeed("attention", "tower", 5, "cls"): shallow[None],
            SignalNeed("attention", "tower", DEEP, "cls"): deep[None],
            SignalNeed("visual_states", "llm", 0): np.stack([np.cos(features), np.sin(features)], 1)}


def test_window_size_keeps_its_relative_size():
    assert window_size_on(24, 24, 6) == 6 and window_size_on(12, 12, 6) == 3 and window_size_on(2, 2, 6) == 1


def test_local_scan_by_hand():
    layout = grid_layout((4, 4))
    shallow = entries()[SignalNeed("attention", "tower", 5, "cls")][0]
    # window 12 of 24 -> 2 on this 4x4 grid: four 2x2 windows, 4 // 4 = 1 token each
    assert tuple(local_scan(layout, shallow, 4, 12)) == (2, 5, 12, 15)
    assert tuple(local_scan(layout, shallow, 3, 12)) == ()  # 3 // 4 windows = 0 per window (the code floors)


def test_tower_side_by_hand():
    # T = 8: 4 local (the window maxima 2, 5, 12, 15), then the deep top 4 among the rest: 0, 1, 3, 9
    # (5 is already local). The rest merge into the nearest kept by angle: 41 and 62 deg -> 50 (token 5),
    # 73, 80, 100 -> 90 (9), 110, 130 -> 120 (12), 140 -> 150 (15).
    method = VScan(tower_tokens=8, reference_budget=8, llm_layers=(), llm_tokens=(), window_size=12)
    context = handmade_context(grid_layout((4, 4)), 8, entries())
    (stage,) = method.select(context).stages
    assert stage.where == PRE_LLM and stage.kept == (0, 1, 2, 3, 5, 9, 12, 15) and stage.position == "reindex"
    assert set(stage.merges) == {Merge.mean(5, (4, 6)), Merge.mean(9, (7, 8, 10)), Merge.mean(12, (11, 13)),
                                 Merge.mean(15, (14,))}
    assert method.kept_counts(context) == (8,)


def test_counts_scale_the_reference():
    context = SelectionContext(grid_layout((24, 24)), 64, None, LLAVA_FACTS)
    assert VScan().counts(context) == (96, ((16, 32),))
    half = SelectionContext(grid_layout((24, 24)), 32, None, LLAVA_FACTS)
    assert VScan().counts(half) == (48, ((16, 16),))


def test_middle_layer_ranks_by_the_last_instruction_token():
    # rows: 0 system, 1-4 visual (ids 1, 4, 6, 9), 5-6 text; the LAST text row ranks: ids 6 and 1
    # (a mean over both text rows would keep 4 and 6).
    probs = torch.zeros(2, 1, 7)
    probs[:, 0, 1:5] = torch.tensor([0.3, 0.1, 0.4, 0.05])
    other = torch.zeros(2, 1, 7)
    other[:, 0, 1:5] = torch.tensor([0.0, 0.9, 0.1, 0.0])
    state = SimpleNamespace(text_rows=torch.tensor([5, 6]), visual_rows=torch.tensor([1, 2, 3, 4]),
                            visual_indices=np.array([1, 4, 6, 9]), position_ids=torch.arange(7)[None], shared=None,
                            attention=lambda rows: probs if rows.tolist() == [6] else torch.cat([other, probs], 1))
    method = VScan(tower_tokens=4, reference_budget=4, llm_layers=(16,), llm_tokens=(2,))
    callback = method.layer_callback(SelectionContext(grid_layout((4, 4)), 4, None, LLAVA_FACTS))
    assert callback(15, state) is None
    stage = callback(16, state)
    assert stage.where == 16 and stage.kept == (1, 6) and stage.position == "reindex"


def test_parameters_and_applicability():
    for bad, message in [(dict(tower_tokens=0), "tower_tokens"), (dict(llm_layers=(16, 8), llm_tokens=(1, 1)),
                         "strictly increasing"), (dict(llm_tokens=(1, 2)), "one count per llm layer"),
                         (dict(global_ratio=1.5), "global_ratio"), (dict(shallow_layer=24), "shallow_layer"),
                         (dict(position="keep"), "position"), (dict(llm_layers=(40,)), "below 32")]:
        with pytest.raises(ValueError, match=f"vscan: .*{message}"):
            VScan(**bad)
    with pytest.raises(MethodNotApplicable, match="no \\[CLS\\]"):
        VScan().check_applies(NO_CLS_FACTS)


def test_shipped_model_and_tiles():
    execution, _ = check_on_shipped(VScan())
    # 0.22 of 144 = 32 -> T = 48: 24 local over sixteen 3x3 windows (1 each: 16) + 24 global; 16 from layer 2
    assert [(s.where, len(s.kept)) for s in execution.plan.stages] == [(PRE_LLM, 40), (2, 16)]
    assert execution.plan.stages[0].merges
    adapter, prepared = tiny_input("llava_next")
    assert len(prepared.layout.tower_owner) > 1
    run_checked(adapter, prepared, VScan(), 0.5, max_new_tokens=2)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_vl", "idefics3"])
def test_towers_without_cls_are_refused(family):
    adapter, prepared = tiny_input(family)
    from workbench.pruning.method import ModelFacts
    with pytest.raises(MethodNotApplicable, match="vscan"):
        VScan().check_applies(ModelFacts.of(adapter))
