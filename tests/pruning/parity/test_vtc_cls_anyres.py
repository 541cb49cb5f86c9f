"""VTC-CLS on multi-crop (AnyRes) layouts: its code's rule applied to every view, against ``select`` on
the tiny LLaVA-NeXT at three image shapes.

Official code: THU-MIG/VTC-CLS (HEAD) is single-image only. llava/model/multimodal_encoder/clip_encoder.py
lines 318-326 (``cls_token_only``): ``attentions[l].squeeze(0).mean(dim=0)[0, 1:]`` summed over
``attentions[start_layer:-1]``; llava/model/llava_arch.py lines 164-172 (``encode_images``):
``torch.topk(cls_attn, token_num)`` against a hard-coded ``arange(0, 576)``. With the AnyRes views
batched, ``squeeze(0)`` keeps the view axis and ``mean(dim=0)`` averages the views, not the heads, and
the merge's ``height * width == base`` check (line 213) fails, so the code has no multi-view path.

The reference is that rule called on each view's own [CLS] rows (head mean, summed over the layers
from ``start_layer`` to the feed layer ``attentions[-2]``), top ``token_num`` per view with the same
count T for every view (T the budget's share of a view, as the per-crop codes count), then the LLaVA
merge (llava_arch.py lines 206-237: stitch, ``unpad_image``, newline column): a crop patch chosen in
the padding is lost.
"""

from __future__ import annotations

import pytest
import torch

from tests.pruning.parity.anyres import (SIZES, assert_budget_variant_keeps_the_budget, assert_per_view_parity,
                                         llava_next_case, stitching, to_layout, view_attentions)
from tests.pruning.parity.common import facts, torch_topk
from workbench.pruning.methods.cls_attention import VtcCls

BUDGETS = (0.125, 0.25, 0.5)


def official_vtc_cls_per_view(layers):
    def official(adapter, prepared, token_num: int):
        cls_attn = torch.stack([view_attentions(adapter, prepared, layer).mean(dim=1) for layer in layers]).sum(dim=0)
        kept = {v: torch_topk(cls_attn[v], token_num) for v in range(cls_attn.shape[0])}
        return to_layout(prepared, stitching(adapter, prepared, cls_attn.shape[1]), kept)
    return official


@pytest.mark.parametrize("size", SIZES)
def test_default_applies_the_codes_rule_to_every_view(size):
    adapter, _ = llava_next_case(size)
    f = facts(adapter)
    for method in (VtcCls(), VtcCls(start_layer=0)):
        layers = method.cls_layers(f)
        assert layers[-1] == f.projector_feed_tower_layer  # attentions[start_layer:-1] ends at attentions[-2]
        assert_per_view_parity(method, official_vtc_cls_per_view(layers), size, BUDGETS)


@pytest.mark.parametrize("size", SIZES)
def test_budget_variant_keeps_exactly_the_budget_by_group_shares(size):
    assert_budget_variant_keeps_the_budget(VtcCls(crops="budget"), size, BUDGETS)
