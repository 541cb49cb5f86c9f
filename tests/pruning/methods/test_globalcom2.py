"""GlobalCom²: thumbnail-commanded crop budgets and crop scores worked out by hand on a hand-made
AnyRes layout, the tiny LLaVA-NeXT, applicability, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout
from tests.pruning.shipped import check_on_shipped, folded, run_checked, tiny_input
from workbench.layout import TokenGroup, VisualLayout, grid_boxes, grid_cells
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.globalcom2 import GlobalCom2, bilinear, crop_scales
from workbench.recording import CaptureRequest, EntryKey, Identity, Recording

NEXT_FACTS = ModelFacts("llava_next", decoder_layers=32, vision_layers=24, has_cls_token=True, multi_view=True,
                        projector_feed_layer=23)
CLS23 = SignalNeed("attention", "tower", 23, "cls")  # the LAST tower layer (attn_maps[-1])
LOGITS23 = SignalNeed("attention_logits", "tower", 23, "cls")  # the default: the code's pre-softmax scores
# the handmade recordings hold probabilities; "budget" keeps exactly n_keep
PROBS = dict(scores="probabilities", count="budget")


def anyres_layout() -> VisualLayout:
    """A 40x20 image: a 2x2 thumbnail (tokens 0-3) and two 2x2 crops side by side stitched into a 2x4
    grid (tokens 4-11: row 0 = 4 5 | 6 7, row 1 = 8 9 | 10 11), crop 0 on the left half."""
    tiles = np.array([[4, 5, 8, 9], [6, 7, 10, 11]])
    return VisualLayout(
        positions=np.arange(1, 13), group=np.repeat([0, 1], [4, 8]),
        cell=np.concatenate([grid_cells(2, 2), grid_cells(2, 4)]),
        boxes=np.concatenate([grid_boxes(2, 2, 0, 0, 40, 20), grid_boxes(2, 4, 0, 0, 40, 20)]),
        groups=(TokenGroup("image 0 / base", 0, 2, 2), TokenGroup("image 0 / tiles", 0, 2, 4)),
        image_sizes=((40, 20),), sequence_length=20, tower_owner=(np.arange(4), tiles[0], tiles[1]))


def anyres_context(budget, crop1=(0.3, 0.35, 0.2, 0.15), facts=NEXT_FACTS) -> SelectionContext:
    # thumbnail [CLS]: top-left .4, top-right .1, bottom-left .3, bottom-right .2; crop 0 flat
    views = [[0.4, 0.1, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25], list(crop1)]
    tensors = {EntryKey("attention", "tower", 23, "cls", v): torch.tensor([row], dtype=torch.float32)
               for v, row in enumerate(views)}
    layout = anyres_layout()
    recording = Recording(Identity("handmade", "0", "q", "p"), CaptureRequest(signals=("attention",), rows=("cls",)),
                          layout, tensors)
    return SelectionContext(layout, budget, recording, facts)


def test_crop_scales_follow_the_reference_formula():
    # s = .7 (left) and .3 (right): softmax((s - .7) / 10) = .510, .490 -> .5 * (1 + p - .5)
    np.testing.assert_allclose(crop_scales([0.7, 0.3], 0.5, 10.0), [0.505, 0.495], atol=1e-3)
    np.testing.assert_allclose(crop_scales([0.7, 0.3], 0.5, 0.1), [0.741, 0.259], atol=1e-3)
    assert crop_scales([5.0, 0.0], 0.9, 0.1)[0] == 1.0  # clipped at 1


def test_bilinear_matches_half_pixel_interpolation():
    # 2 -> 4 columns: centres at -.25 (clamped), .25, .75, 1.25 (clamped)
    np.testing.assert_allclose(bilinear(np.array([[0.4, 0.1], [0.3, 0.2]]), 2, 4),
                               [[0.4, 0.325, 0.175, 0.1], [0.3, 0.275, 0.225, 0.2]])


def test_thumbnail_commands_the_crop_budgets_and_scores():
    # 6 of 12 tokens: R = .5, thumbnail keeps int(4 * .5) = 2 by [CLS]: 0 and 2. Thumbnail regions: crop 0
    # (left) .4 + .3 = .7, crop 1 .1 + .2 = .3. Temperature .1: scales .741, .259 -> weights 2.96, 1.04 of the
    # 4 left -> crop 0 keeps 3, crop 1 keeps 1. Crop 0 (flat own scores): by the resized thumbnail .4, .325,
    # .3, .275 at tokens 4, 5, 8, 9 -> 4, 5, 8. Crop 1: l2norm(own .3 .35 .2 .15) + l2norm(thumbnail .175 .1
    # .225 .2) = 1.055, .943, 1.002, .838 at tokens 6, 7, 10, 11 -> 6 (own alone: 7; thumbnail alone: 10).
    plan = GlobalCom2(temperature=0.1, **PROBS).select(anyres_context(6))
    assert plan.final_kept == (0, 2, 4, 5, 6, 8)
    assert plan.stages[0].scores[6] == pytest.approx(1.055, abs=1e-3)
    # the code's temperature 10: scales .505, .495 -> 2 + 2; crop 1 keeps 6 and 10
    assert GlobalCom2(**PROBS).select(anyres_context(6)).final_kept == (0, 2, 4, 5, 6, 10)


def test_count_budget_keeps_every_budget_exactly():
    for budget in range(1, 13):
        assert len(GlobalCom2(**PROBS).select(anyres_context(budget)).final_kept) == budget


def test_reference_count_floors_each_view_as_the_code():
    # 6 of 12: R = .5, thumbnail int(4 * .5) = 2; temperature .1 scales .741, .259 -> int(4 * .741) = 2 and
    # int(4 * .259) = 1: 5 tokens, reported by kept_counts. Crop 0 keeps 4, 5; crop 1 keeps 6.
    method = GlobalCom2(temperature=0.1, scores="probabilities")
    assert method.select(anyres_context(6)).final_kept == (0, 2, 4, 5, 6)
    assert method.kept_counts(anyres_context(6)) == (5,)


def test_applicability_and_single_view_layouts():
    assert GlobalCom2().applicability(NEXT_FACTS) is None
    assert "no [CLS]" in GlobalCom2().applicability(NO_CLS_FACTS)
    assert "no thumbnail" in GlobalCom2().applicability(LLAVA_FACTS)
    assert GlobalCom2().needs(LLAVA_FACTS) == ()
    assert GlobalCom2().needs(NEXT_FACTS) == (LOGITS23,)
    assert GlobalCom2(scores="probabilities").needs(NEXT_FACTS) == (CLS23,)
    with pytest.raises(MethodNotApplicable, match="globalcom2 does not apply to llava: .*no thumbnail"):
        GlobalCom2().select(SelectionContext(grid_layout((2, 2)), 1, None, LLAVA_FACTS))
    with pytest.raises(MethodNotApplicable, match="globalcom2: this sample's layout has no base view plus crops"):
        GlobalCom2().select(SelectionContext(grid_layout((2, 2)), 1, None, NEXT_FACTS))


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="globalcom2: temperature must be a finite number > 0, got 0"):
        GlobalCom2(temperature=0)
    with pytest.raises(ValueError, match="globalcom2: reference_layer must be an int in 0..23"):
        GlobalCom2(reference_layer=-1)
    for name in ("scores", "regions", "count"):
        with pytest.raises(ValueError, match=f"globalcom2: {name} must be one of"):
            GlobalCom2(**{name: "nope"})


def test_runs_on_tiny_llava_next_and_is_refused_on_the_shipped_model():
    adapter, prepared = tiny_input("llava_next")
    execution, context = run_checked(adapter, prepared, GlobalCom2(), 0.25, max_new_tokens=2)
    assert (len(execution.plan.final_kept),) == GlobalCom2().kept_counts(context)
    assert 0 < len(execution.plan.final_kept) <= context.n_keep
    layer = GlobalCom2().layer(context.model)
    assert layer == context.model.vision_layers - 1
    base = prepared.layout.group == 0
    np.testing.assert_allclose(np.asarray(execution.plan.stages[0].scores)[base],
                               folded(context.recording, prepared.layout, "attention_logits", layer, "cls")[base])
    execution, context = run_checked(adapter, prepared, GlobalCom2(**PROBS), 0.25, max_new_tokens=2)
    assert len(execution.plan.final_kept) == context.n_keep
    with pytest.raises(MethodNotApplicable, match="globalcom2 does not apply"):
        check_on_shipped(GlobalCom2())
