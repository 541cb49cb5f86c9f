"""VisionZip parity: the official dominant + contextual rule against ``VisionZip().select``.

Official code: dvlab-research/VisionZip (HEAD)
- visionzip/main.py line 7: ``dominant_num = dominant - 1`` ([CLS] fills one dominant slot).
- visionzip/clip_encoder.py lines 43-80 (CLIPVisionTower_VisionZip.forward): ``attentions[-2]`` [CLS]
  row summed over heads, ``topk(dominant_num) + 1`` plus [CLS] (lines 51-54); the rest filtered in
  index order (56-62); ``metric`` = layer -2's key states averaged over heads (utils.py line 89,
  ``raw_key_states.mean(1)``), L2-normalised (64); targets ``arange(0, R, max(1, R // C))[:C]``
  (67-68); every other token joins ``argmax`` of its cosine to the targets (72-74); contextual token
  = target + mean of its assigned tokens (75-80); ``cat([dominant, contextual])`` (83): the contextual
  tokens follow the dominant ones, in target order. ``dominant_tokens`` (58) is ``masked_select`` of
  ``hidden_states[-2]`` at ``all_indices``, in sequence order, so the [CLS] output (row 0) is the first
  token of the block the projector and the LLM receive (llava_arch.py ``encode_images_visionzip``).
Splits: README 54+10 / 108+20 / 162+30, i.e. the method's ``split`` (10/64 contextual).
The layer is the method's ``layer`` (the reference's -2, this tower's projector-feed layer).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, eager_tower, facts, jaccard, labels, n_keep, tower_key_states,
                                         workbench_plan)
from workbench.pruning.methods.visionzip import VisionZip
from workbench.pruning.plan import Append, cls_token

BUDGETS = (0.25, 0.5, 0.75)


def official_visionzip(adapter, prepared, dominant: int, contextual: int, layer: int, heads: int):
    """(kept patch indices, {target: sources}, the LLM's visual block) in 0-based patch indices; the
    block lists the tokens in the code's order, the [CLS] as "cls": [CLS, dominant..., contextual...]."""
    attn = eager_tower(adapter, prepared).attentions[layer].double()       # [1, H, P+1, P+1]
    dominant_num = dominant - 1                                             # main.py line 7
    cls_attention_sum = attn[:, :, 0, 1:].sum(dim=1)                        # lines 51-52
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1  # line 53
    all_indices = torch.cat([torch.zeros((1, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    keys = tower_key_states(adapter, prepared, layer).double()               # [1, P+1, H*d]
    metric = keys.view(1, keys.shape[1], heads, -1).transpose(1, 2).mean(1)  # utils.py: raw_key_states.mean(1)
    mask = torch.ones(metric.shape[:2], dtype=torch.bool).scatter_(1, all_indices, False)  # line 56
    filtered = torch.arange(metric.shape[1])[mask[0]]                        # token ids of the rest, in order
    metric_filtered = metric[mask].view(1, -1, metric.shape[2])              # line 60
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)  # line 64
    step = max(1, metric_normalized.shape[1] // contextual)                   # line 67
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]  # line 68
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others], metric_normalized[:, target_indices].transpose(1, 2))
    assigned = similarity.argmax(dim=2)[0]                                    # line 74
    targets = filtered[target_indices] - 1
    sources = filtered[others] - 1
    merges = {int(t): sorted(int(s) for s in sources[assigned == i]) for i, t in enumerate(targets)}
    kept = np.sort(np.concatenate([topk_indices[0].numpy() - 1, targets.numpy()]))
    dominant_ids = torch.arange(metric.shape[1])[~mask[0]]                   # line 58: sequence order, [CLS] first
    block = ["cls" if i == 0 else int(i) - 1 for i in dominant_ids] + [int(t) for t in targets]  # line 83
    return kept, {t: s for t, s in merges.items() if s}, block


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    method = VisionZip()
    f = facts(adapter)
    assert method.layer(f) == f.projector_feed_tower_layer  # attentions[-2] / hidden_states[-2]
    for budget in BUDGETS:
        dominant, contextual = method.split(n_keep(prepared, budget))
        (stage,) = workbench_plan(method, adapter, prepared, budget).stages
        kept, merges, block = official_visionzip(adapter, prepared, dominant, contextual, method.layer(f),
                                                 f.vision_heads)
        n, cls = prepared.layout.n_tokens, cls_token(prepared.layout.n_tokens)
        # the LLM gets dominant + contextual tokens, the [CLS] among them (the code's count)
        assert len(stage.kept) == dominant + contextual == len(block)
        assert jaccard(stage.kept, list(kept) + [cls]) == 1.0, (label, budget)
        # the [CLS] is brought in first, before the first patch (line 58); then the contextual tokens
        entering, *contextual_tokens = stage.appends
        assert entering == Append(cls, (), (1.0,), before=0)
        assert {a.token: sorted(a.sources) for a in contextual_tokens if a.sources} == merges
        for a in contextual_tokens:  # target + mean(sources), lines 75-80 (a target nothing joined: itself)
            assert a.weights == pytest.approx((1.0,) + (1.0 / max(len(a.sources), 1),) * len(a.sources))
        # line 83: every target's contextual token after the dominant ones, in target order
        targets = [a.token for a in contextual_tokens]
        assert len(targets) == contextual and targets == sorted(targets) and stage.merges == ()
        assert {a.after for a in contextual_tokens} == {n - 1}
        # the LLM's visual block in the code's order, the [CLS] as the reserved token
        assert executed_block(stage, n) == [cls if t == "cls" else t for t in block]


def executed_block(stage, n: int) -> list[int]:
    """The visual tokens of ``stage``'s output in sequence order, as ``arrange`` places them."""
    from workbench.pruning.executor import arrange

    alive = np.arange(n)
    order = arrange(stage, alive).order.numpy()
    tokens = alive[order]
    for row, append in arrange(stage, alive).appended:
        tokens[row] = append.token
    return [int(t) for t in tokens]
