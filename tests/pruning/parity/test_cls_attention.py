"""FasterVLM, VTC-CLS and HiRED parity: the official [CLS]-attention rules against ``select``.

The references read the eager copy's CLIP tower (``output_attentions=True``); layers are the ones the
methods report using (``cls_layers``: the reference's 24-layer indices placed on this tower, the
reference's projector-feed layer 22 = ``attentions[-2]`` on this tower's feed layer).
FasterVLM's ``visual_token_num`` and VTC-CLS's ``token_num`` are counts (the budget's ``n_keep``);
HiRED's is ``int(N * token_budget_rate)``, which its default ``count="floor"`` keeps (0.22 of 144 is 31).

Single-image layouts only (LLaVA-1.5 code paths): the shipped model and the tiny LLaVA. The multi-crop
(LLaVA-NeXT) rules are in ``test_fastervlm_anyres.py``, ``test_hired_anyres.py`` (HiRED's own AnyRes
code) and ``test_vtc_cls_anyres.py`` (VTC-CLS's single-image rule applied to every view).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, eager_tower, facts, jaccard, labels, n_keep, torch_topk, workbench_plan
from workbench.pruning.methods.cls_attention import FasterVLM, HiRED, VtcCls

BUDGETS = (0.125, 0.25, 0.5)
LABELS = labels(("llava",))


def cls_rows(adapter, prepared) -> list[torch.Tensor]:
    """Per tower layer, the [heads, patches] attention of the [CLS] query on the patch keys."""
    attentions = eager_tower(adapter, prepared).attentions
    return [a[0, :, 0, 1:].double() for a in attentions]  # [:, :, 0, 1:] as in every reference


def official_fastervlm(adapter, prepared, k: int, layer: int) -> np.ndarray:
    # Theia-4869/FasterVLM llava/model/multimodal_encoder/clip_encoder.py lines 38-41:
    #   image_attentions = attentions[select_layer][:, :, 0, 1:]
    # llava/model/llava_arch.py lines 148-149: .mean(dim=1), torch.topk(k=visual_token_num)
    return torch_topk(cls_rows(adapter, prepared)[layer].mean(dim=0), k)


def official_vtc_cls(adapter, prepared, k: int, start: int, end: int) -> np.ndarray:
    # THU-MIG/VTC-CLS llava/model/multimodal_encoder/clip_encoder.py lines 324-325:
    #   sum over attentions[start_layer:-1] of attn.mean(dim=0)[0, 1:]   (-1 excluded: the range ends
    #   at attentions[-2], LLaVA's projector-feed layer, here ``end``)
    # llava/model/llava_arch.py line 169: torch.topk(cls_attn, token_num)
    rows = cls_rows(adapter, prepared)
    return torch_topk(torch.stack([rows[l].mean(dim=0) for l in range(start, end + 1)]).sum(dim=0), k)


def official_hired_single(adapter, prepared, rate: float, layer: int) -> np.ndarray:
    # hasanar1f/HiRED transformers/src/transformers/models/llava/modeling_llava.py lines 347-353:
    #   attn = bottom_layer_attn[0, :, 0, -N:].sum(dim=0); num_topk = min(N, int(N * rate)); topk
    # (bottom layer 22 = the feed layer, line 511; q/k softmax of that layer, lines 60-75)
    attn = cls_rows(adapter, prepared)[layer].sum(dim=0)
    n = attn.shape[0]
    return torch_topk(attn, min(n, int(n * rate)))


@pytest.mark.parametrize("label", LABELS)
def test_fastervlm_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    method = FasterVLM()
    (layer,) = method.cls_layers(facts(adapter))
    assert layer == facts(adapter).projector_feed_tower_layer  # attentions[select_layer]
    for budget in BUDGETS:
        (stage,) = workbench_plan(method, adapter, prepared, budget).stages
        assert jaccard(stage.kept, official_fastervlm(adapter, prepared, n_keep(prepared, budget), layer)) == 1.0


@pytest.mark.parametrize("label", LABELS)
def test_vtc_cls_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    layers = VtcCls().cls_layers(facts(adapter))
    assert layers[-1] == facts(adapter).projector_feed_tower_layer
    for method in (VtcCls(), VtcCls(start_layer=0)):  # the default and a range of several layers
        layers = method.cls_layers(facts(adapter))
        for budget in BUDGETS:
            (stage,) = workbench_plan(method, adapter, prepared, budget).stages
            kept = official_vtc_cls(adapter, prepared, n_keep(prepared, budget), layers[0], layers[-1])
            assert jaccard(stage.kept, kept) == 1.0, (label, method, budget)


@pytest.mark.parametrize("label", LABELS)
def test_hired_default_equals_the_official_single_image_rule(label):
    adapter, prepared = case(label)
    deep = max(HiRED().cls_layers(facts(adapter)))
    assert deep == facts(adapter).projector_feed_tower_layer
    for budget in BUDGETS + (0.22, 0.3):  # 0.22 and 0.3: int(N * rate) is not the half-up n_keep
        (stage,) = workbench_plan(HiRED(), adapter, prepared, budget).stages
        kept = official_hired_single(adapter, prepared, budget, deep)
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)
