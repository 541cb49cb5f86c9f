"""FasterVLM parity on multi-crop (AnyRes) layouts: the official per-crop rule against ``select`` on the
tiny LLaVA-NeXT at three image shapes.

Official code: Theia-4869/FasterVLM (HEAD)
- llava/model/multimodal_encoder/clip_encoder.py lines 36-47: ``attentions[select_layer=-2][:, :, 0, 1:]``
  of every view (the base image, then the crops, one batch);
- llava/model/llava_arch.py lines 141-157 (``encode_images``): head mean, ``topk(visual_token_num)``
  per view, an index mask; lines 168-220: the crops' masks stitched (``view(nph, npw, h, w)``,
  ``permute``), ``unpad_image`` (lines 100-128), a newline column appended and always kept; the base
  view's mask applied as is. A crop patch chosen in the padding is gone with its slot.
``visual_token_num`` T is one count for every view; its README sets it as the reduction ratio of a
576-patch view (576 x (1 - 0.9) = 58), so the reference takes T = round(P x n_keep / N).
"""

from __future__ import annotations

import pytest

from tests.pruning.parity.anyres import (SIZES, assert_budget_variant_keeps_the_budget, assert_per_view_parity, stitching,
                                         to_layout, view_attentions)
from tests.pruning.parity.common import facts, torch_topk
from workbench.pruning.methods.cls_attention import FasterVLM

BUDGETS = (0.125, 0.25, 0.5)


def official_fastervlm_anyres(adapter, prepared, visual_token_num: int):
    attentions = view_attentions(adapter, prepared, facts(adapter).projector_feed_tower_layer).mean(dim=1)
    kept = {v: torch_topk(attentions[v], visual_token_num) for v in range(attentions.shape[0])}
    return to_layout(prepared, stitching(adapter, prepared, attentions.shape[1]), kept)


@pytest.mark.parametrize("size", SIZES)
def test_default_equals_the_official_per_crop_rule(size):
    assert_per_view_parity(FasterVLM(), official_fastervlm_anyres, size, BUDGETS)


@pytest.mark.parametrize("size", SIZES)
def test_budget_variant_keeps_exactly_the_budget_by_group_shares(size):
    assert_budget_variant_keeps_the_budget(FasterVLM(crops="budget"), size, BUDGETS)
