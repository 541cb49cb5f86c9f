"""VisPruner parity: the official important + diverse rule against ``VisPruner().select``.

Official code: Theia-4869/VisPruner (HEAD)
- llava/model/multimodal_encoder/clip_encoder.py lines 36-43 (feature_select): features
  ``hidden_states[select_layer]`` (-2: the projector's feed layer) and the [CLS] row
  ``attentions[select_layer][:, :, 0, 1:]``;
- llava/model/llava_arch.py lines 148-156: ``important_token_num = int(T * important_ratio)`` (0.5),
  head mean, ``argsort(descending=True)``, the first T_imp important, the rest residual in that order;
- lines 159-176: while ``r = min(8, R - T_div) > 0``: A = residual[::2], B = residual[1::2] (unit
  features), each A scored by its max cosine to B, ``argsort(descending=True)[r:]`` of A kept (in that
  order) followed by B.
The code's ``R // 2`` widths fail on an odd residual count (a broadcast error); the reference here,
as the method, lets A hold the ``ceil(R / 2)`` even positions. Ties of ``argsort``: stable (lower
index first), as the method documents. Single-image layouts (the shipped model, tiny LLaVA).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, eager_tower, facts, jaccard, labels, n_keep, workbench_plan
from workbench.pruning.methods.vispruner import VisPruner

BUDGETS = (0.125, 0.25, 0.5)


def descending(values: torch.Tensor) -> torch.Tensor:
    """``argsort(descending=True)`` with ties by the lower index."""
    return torch.sort(-values, stable=True).indices


def official_view(image_features, image_attentions, visual_token_num: int, important_ratio: float = 0.5):
    """The code's rule on one view's patch features and head-mean [CLS] row (kept, in its order)."""
    important_token_num = int(visual_token_num * important_ratio)            # line 150
    diverse_token_num = visual_token_num - important_token_num
    token_indices = descending(image_attentions)                             # line 155
    important_indices = token_indices[:important_token_num]
    residual_indices = token_indices[important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:                                             # lines 161-176
        R = residual_indices.shape[0]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        tokens = image_normalized[residual_indices]
        a, b = tokens[::2], tokens[1::2]
        scores = (a @ b.T).max(dim=-1).values
        distinct = descending(scores)[r:]
        residual_indices = torch.cat([residual_indices[::2][distinct], residual_indices[1::2]])
    selected = torch.cat([important_indices, residual_indices]) if diverse_token_num > 0 else important_indices
    return selected.numpy()


def official_vispruner(adapter, prepared, visual_token_num: int, layer: int, important_ratio: float = 0.5):
    out = eager_tower(adapter, prepared)
    image_features = out.hidden_states[layer + 1][0, 1:].double()            # hidden_states[-2], patches
    image_attentions = out.attentions[layer][0, :, 0, 1:].double().mean(0)   # [:, :, 0, 1:], head mean
    return np.sort(official_view(image_features, image_attentions, visual_token_num, important_ratio))


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    method = VisPruner()
    f = facts(adapter)
    assert method.layer(f) == f.projector_feed_tower_layer  # select_layer -2
    for budget in BUDGETS:
        k = n_keep(prepared, budget)
        (stage,) = workbench_plan(method, adapter, prepared, budget).stages
        kept = official_vispruner(adapter, prepared, k, method.layer(f))
        assert len(kept) == len(stage.kept) == k
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)


@pytest.mark.parametrize("label", labels())
def test_important_ratio_follows_the_same_rule(label):
    adapter, prepared = case(label)
    f = facts(adapter)
    for ratio in (0.25, 1.0):
        method = VisPruner(important_ratio=ratio)
        (stage,) = workbench_plan(method, adapter, prepared, 0.25).stages
        kept = official_vispruner(adapter, prepared, n_keep(prepared, 0.25), method.layer(f), ratio)
        assert jaccard(stage.kept, kept) == 1.0, (label, ratio)
