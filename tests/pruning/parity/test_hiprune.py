"""HiPrune parity: the official anchor / buffer / register rule against ``HiPrune().select``.

Official code: Danielement321/HiPrune, LLaVA/llava/model/llava_arch.py (HEAD), ``encode_images``
lines 140-178:
- deep = ``attentions[mm_vision_select_layer]`` (-2: the projector-feed layer), ``.mean(dim=1)``
  over heads then ``.mean(dim=1)`` over every query row, patch keys ``[:, 1:]`` (lines 146-148);
  shallow the same at ``attentions[OBJECT_LAYER - 1]`` (lines 150-152);
- ``round(k * alpha / 5)`` anchors by ``topk`` of shallow (153, 157); buffers ``i-1, i+1, i-24,
  i+24`` clamped to ``0..575`` and ``unique`` (158-164; 24 = the grid's width, 575 = N - 1);
- the rest ``topk`` of deep after subtracting 1 from the taken tokens (165-171).
The layers are the ones the method reports (``layers``: object layer 9 of 24 and the feed layer,
placed on this tower). Defaults alpha=0.1, and alpha=0.5 to exercise the buffers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, eager_tower, facts, jaccard, labels, n_keep, workbench_plan
from workbench.pruning.methods.hiprune import HiPrune

BUDGETS = (0.125, 0.25, 0.5)


def official_hiprune(adapter, prepared, k: int, alpha: float, object_layer: int, deep_layer: int, width: int):
    attentions = eager_tower(adapter, prepared).attentions
    deep = attentions[deep_layer].double().mean(dim=1).mean(dim=1)[:, 1:]        # lines 146-148
    shallow = attentions[object_layer].double().mean(dim=1).mean(dim=1)[:, 1:]  # lines 150-152
    n = deep.shape[1]
    shallow_token_num = round(k * alpha / 5)                                     # line 153
    idx = torch.topk(shallow[0].unsqueeze(0), k=shallow_token_num, dim=1)[1]     # line 157
    idx = torch.cat([idx, idx - 1, idx + 1, idx - width, idx + width], dim=1)   # lines 158-162
    idx = torch.unique(idx.clamp(0, n - 1), sorted=False).unsqueeze(0)          # lines 163-164
    deep_token_num = k - idx.shape[1]                                            # line 165
    mask = torch.zeros(1, n, dtype=torch.bool).scatter_(1, idx, 1)              # lines 167-168
    deep[0] -= mask.int().squeeze()                                              # line 170
    deep_idx = torch.topk(deep[0].unsqueeze(0), k=deep_token_num, dim=1)[1]      # line 172
    return np.sort(torch.cat([idx, deep_idx], dim=1)[0].numpy())


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    (group,) = prepared.layout.groups
    for method in (HiPrune(), HiPrune(alpha=0.5)):
        object_layer, deep_layer = method.layers(facts(adapter))
        assert deep_layer == facts(adapter).projector_feed_tower_layer
        for budget in BUDGETS:
            (stage,) = workbench_plan(method, adapter, prepared, budget).stages
            kept = official_hiprune(adapter, prepared, n_keep(prepared, budget), method.alpha,
                                    object_layer, deep_layer, group.cols)
            assert jaccard(stage.kept, kept) == 1.0, (label, method.alpha, budget)
