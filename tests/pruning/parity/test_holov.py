"""HoloV parity: the official crop allocation + per-crop top-k against ``HoloV().select``.

Official code: obananas/HoloV (HEAD)
- llava/model/multimodal_encoder/clip_encoder.py lines 36-43: ``hidden_states`` / ``attentions`` at
  ``select_layer`` (-2), [CLS] row ``[:, :, 0, 1:]``; llava/model/llava_arch.py line 143: head mean;
  line 239: ``HoloV(image_features, image_attns, num_patches=16, new_image_token_num=64)`` on the
  projected features;
- llava/model/utils.py lines 22-112 (HoloV): contiguous runs of ``N // num_patches`` (+1 for the first
  ``N % num_patches``); per run ``1e3 * attn + 0.09 * var_sim * (mean|1e3 attn| / (mean|var| + 1e-6))``
  with the cosine matrix's diagonal zeroed, divided by ``n - 1``; the run's mean; weights
  ``s / (sum s + 1e-6)``, ``floor(w * T)``, the remainder to ``topk(weights)``;
- lines 114-127: a run allotted ``alloc >= size`` keeps all of it (the overflow is lost and padded with
  zeros, lines 138-143), otherwise ``topk(patch_attn, alloc)``.
The number of runs at other budgets is the authors' Qwen2.5-VL port's rule
(qwen-model-HoloV/modeling_qwen2_5_vl.py), ``max(1, int(1024 / 576 * N / T))`` (16 at 64 of 576), the
method's ``chunk_count``. Ties of ``topk``: the lower index. Single-image [CLS] layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, eager_forward, eager_tower, facts, jaccard, labels, n_keep,
                                         torch_topk, visual_positions, workbench_plan)
from workbench.pruning.methods.holov import HoloV, chunk_count

BUDGETS = (0.125, 0.25, 0.5)


def official_holov(adapter, prepared, new_image_token_num: int, num_patches: int, layer: int,
                   attention: torch.Tensor | None = None) -> np.ndarray:
    """``attention``: the flattened per-token attention of a multi-crop image (test_holov_anyres.py)."""
    if attention is None:
        attention = eager_tower(adapter, prepared).attentions[layer][0, :, 0, 1:].double().mean(0)
    image_token = eager_forward(adapter, prepared).hidden_states[0][0].double()[
        torch.as_tensor(visual_positions(prepared))]
    n = len(image_token)
    patch_size, remainder = divmod(n, num_patches)
    runs, start = [], 0
    for p in range(num_patches):
        end = start + patch_size + (1 if p < remainder else 0)
        if end > start:
            runs.append(torch.arange(start, end))
        start = end
    patch_scores = []
    for run in runs:
        patch_attn = attention[run]
        if len(run) <= 1:
            patch_scores.append(patch_attn.mean())
            continue
        f = image_token[run] / (image_token[run].norm(dim=1, keepdim=True) + 1e-6)
        s = (f @ f.T) * (1 - torch.eye(len(run), dtype=f.dtype))
        mean_sim = s.sum(dim=1) / (len(run) - 1)
        var_sim = ((s - mean_sim[:, None]) ** 2).sum(dim=1) / (len(run) - 1)
        scaled = patch_attn * 1e3
        var_sim = var_sim * (scaled.abs().mean() / (var_sim.abs().mean() + 1e-6))
        patch_scores.append((scaled + 0.09 * var_sim).mean())
    scores = torch.stack(patch_scores)
    weights = scores / (scores.sum() + 1e-6)
    allocated = (weights * new_image_token_num).floor().long()
    remaining = new_image_token_num - int(allocated.sum())
    if remaining > 0:
        for idx in torch_topk(weights, min(remaining, len(weights))):
            allocated[int(idx)] += 1
    kept = []
    for run, alloc in zip(runs, allocated):
        alloc = int(alloc)
        if alloc >= len(run):
            kept += [int(i) for i in run]
        elif alloc > 0:
            kept += [int(run[i]) for i in torch_topk(attention[run], alloc)]
    return np.sort(np.array(kept))


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    f = facts(adapter)
    for budget in BUDGETS:
        k = n_keep(prepared, budget)
        (stage,) = workbench_plan(HoloV(), adapter, prepared, budget).stages
        kept = official_holov(adapter, prepared, k, chunk_count(prepared.layout.n_tokens, k),
                              f.projector_feed_tower_layer)
        assert len(stage.kept) == len(kept)  # the official count, the budget less any overflow
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)


@pytest.mark.parametrize("label", labels(("llava",)))
def test_fixed_crop_count_follows_the_same_rule(label):
    adapter, prepared = case(label)
    f = facts(adapter)
    k = n_keep(prepared, 0.25)
    (stage,) = workbench_plan(HoloV(num_patches=16), adapter, prepared, 0.25).stages
    assert jaccard(stage.kept, official_holov(adapter, prepared, k, 16, f.projector_feed_tower_layer)) == 1.0
