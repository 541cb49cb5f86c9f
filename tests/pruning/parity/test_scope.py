"""SCOPE parity: the official saliency x coverage greedy rule against ``Scope().select``.

Official code: kinredon/SCOPE (HEAD), scope/clip_encoder.py
- lines 116-129 (CLIPVisionTower_SCOPE.forward): ``attentions[-2]`` (softmax probabilities,
  scope/utils.py line 61) [CLS] row ``[:, :, 0, 1:]`` summed over heads; features
  ``hidden_states[-2][:, 1:]``; ``SCOPE(image_features, dominant_num, cls_attention_sum)``;
- lines 140-199 (SCOPE): unit features, cosine matrix; ``cur_max = 0``; per step the gain of each
  unselected candidate j is ``sum_i max(0, cos[i, j] - cur_max[i])``, times ``cls_attn ** ALPHA``
  (``COMBINED=multi``) or plus it (``add``), selected candidates at -inf, ``argmax``; ``cur_max``
  becomes ``max(cur_max, cos[best])``. ALPHA 1.0 (run_scope_llava.sh), COMBINED multi (line 181).
``argmax`` takes the first maximum (the lower index), as the method. Single-image layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, eager_tower, facts, jaccard, labels, n_keep, workbench_plan
from workbench.pruning.methods.scope import Scope

BUDGETS = (0.125, 0.25, 0.5)


def official_scope(adapter, prepared, num_selected_token: int, layer: int, alpha: float = 1.0,
                   combined: str = "multi") -> np.ndarray:
    out = eager_tower(adapter, prepared)
    cls_attn = out.attentions[layer][0, :, 0, 1:].double().sum(0)   # lines 123-124
    features = out.hidden_states[layer + 1][0, 1:].double()           # line 126
    norm_vectors = features / features.norm(dim=-1, keepdim=True)
    cosine_simi = norm_vectors @ norm_vectors.T
    n = len(features)
    selected = torch.zeros(n, dtype=torch.bool)
    cur_max = torch.zeros(n, dtype=torch.float64)
    powered = cls_attn ** alpha
    picks = []
    for _ in range(num_selected_token):                               # lines 171-194
        gains = torch.clamp(cosine_simi.masked_fill(selected[None, :], 0) - cur_max[:, None], min=0).sum(0)
        gains = gains * powered if combined == "multi" else gains + powered
        gains = gains.masked_fill(selected, float("-inf"))
        best = int(gains.argmax())
        selected[best] = True
        picks.append(best)
        cur_max = torch.maximum(cur_max, cosine_simi[best])
    return np.sort(np.array(picks))


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    method = Scope()
    f = facts(adapter)
    assert method.layer(f) == f.projector_feed_tower_layer  # attentions[-2] / hidden_states[-2]
    for budget in BUDGETS:
        k = n_keep(prepared, budget)
        (stage,) = workbench_plan(method, adapter, prepared, budget).stages
        kept = official_scope(adapter, prepared, k, method.layer(f))
        assert len(stage.kept) == k
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)


@pytest.mark.parametrize("label", labels())
def test_alpha_and_additive_variant_follow_the_same_rule(label):
    adapter, prepared = case(label)
    f = facts(adapter)
    for alpha, combine in ((2.0, "multi"), (1.0, "add")):
        method = Scope(alpha=alpha, combine=combine)
        (stage,) = workbench_plan(method, adapter, prepared, 0.25).stages
        kept = official_scope(adapter, prepared, n_keep(prepared, 0.25), method.layer(f), alpha, combine)
        assert jaccard(stage.kept, kept) == 1.0, (label, alpha, combine)
