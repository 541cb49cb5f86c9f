"""MMTok parity: the official multimodal max-coverage rule against ``MMTok().select``.

Official code: Ironieser/MMTok (HEAD)
- mmtok/core/semantic_selector.py lines 106-118 (``mm_coverage_selection``): L2-normalised text
  embeddings z, projected vision tokens x and CLIP features x_clip; P = softmax(z x^T / tv_temp, dim=1)/m,
  Q = softmax(x_clip x_clip^T / vv_temp, dim=1)/n, Combined = [P; alpha * Q];
  lines 134-143 (and the JIT kernel, lines 24-65): k greedy steps, each
  ``argmax(sum(clamp_min(Combined - best, 0), 0))`` over unpicked columns, best = max(best, column).
- mmtok/core/mmtok_core.py lines 41-43: softmax_tv_temperature=0.02 (vv 0.2, alpha 0.5).
- mmtok/llava/clip_encoder_mmtok.py lines 73-76: x_clip = ``hidden_states[-2][:, 1:]`` (the projector's
  input; here the tower's projector-feed hidden state), x = ``mm_projector`` of it (the decoder's
  input embeddings at the image positions).
The text side is the method's documented deviation (every text token after the image instead of the
question's keywords): the reference takes the same rows, from the eager forward's ``hidden_states[0]``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.pruning.parity.common import (case, eager_forward, eager_tower, facts, jaccard, labels, n_keep,
                                         visual_positions, workbench_plan)
from workbench.pruning.methods.mmtok import MMTok

BUDGETS = (0.125, 0.25, 0.5)


def official_mmtok(text, vision, vision_clip, k: int, alpha=0.5, tv_temp=0.02, vv_temp=0.2) -> np.ndarray:
    def l2(x):
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    z_norm, x_norm, x_clip_norm = l2(text), l2(vision), l2(vision_clip)
    P = z_norm @ x_norm.T
    Q = x_clip_norm @ x_clip_norm.T
    m, n = P.shape
    P = F.softmax(P * (1.0 / tv_temp), dim=1) / m
    Q = F.softmax(Q * (1.0 / vv_temp), dim=1) / n
    Combined = torch.cat([P, Q * alpha], dim=0)
    best = torch.zeros(m + n, dtype=Combined.dtype)
    mask = torch.zeros(n, dtype=Combined.dtype)
    picks = []
    for _ in range(k):
        delta = (Combined - best.unsqueeze(1)).clamp_min_(0).sum(0) + mask
        idx = int(torch.argmax(delta))
        picks.append(idx)
        best = torch.maximum(best, Combined[:, idx])
        mask[idx] = float("-inf")
    return np.sort(picks)


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    embeds = eager_forward(adapter, prepared).hidden_states[0][0].double()
    positions = visual_positions(prepared)
    vision = embeds[torch.as_tensor(positions)]
    text = embeds[positions.max() + 1:]  # every token after the image (no padding: one sequence)
    clip = eager_tower(adapter, prepared).hidden_states[facts(adapter).projector_feed_layer][0, 1:].double()
    for budget in BUDGETS:
        (stage,) = workbench_plan(MMTok(), adapter, prepared, budget).stages
        kept = official_mmtok(text, vision, clip, n_keep(prepared, budget))
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)
