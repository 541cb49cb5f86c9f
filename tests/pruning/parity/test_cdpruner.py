"""CDPruner parity: the official conditional-DPP rule against ``CDPruner().select``.

Official code: Theia-4869/CDPruner (HEAD), llava/model/llava_arch.py (encode_images)
- lines 148-153: cosine similarity of the ``mm_projector`` outputs;
- lines 156-160: relevance = ``(-cos(image_embeds, text_embeds)).mean(-1)``, min-max normalised as
  ``(r - min + 1e-6) / (max - min)``;
- line 167: kernel ``r S r``;
- lines 170-181: fast greedy MAP: ``argmax`` of ``di2s``, ``eis = (L[j] - cis[:i, j] @ cis[:i]) /
  sqrt(di2s[j])``, ``di2s -= eis**2``, the pick set to -inf.
The code embeds the instruction with CLIP's text tower; the models here have none, so the reference,
as the method (its documented substitute), takes the text after the image as embedded at the LLM
input against the projected visual tokens (decoder input = the eager forward's ``hidden_states[0]``).
``argmax`` takes the first maximum (the lower index). Single-image layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, eager_forward, jaccard, labels, n_keep, visual_positions,
                                         workbench_plan)
from workbench.pruning.methods.cdpruner import CDPruner

BUDGETS = (0.125, 0.25, 0.5)


def official_cdpruner(adapter, prepared, visual_token_num: int, negate: bool = True) -> np.ndarray:
    embeds = eager_forward(adapter, prepared).hidden_states[0][0].double()
    positions = torch.as_tensor(visual_positions(prepared))
    image = embeds[positions]                                   # mm_projector outputs
    text = embeds[int(positions.max()) + 1:]                    # the instruction substitute
    image_normalized = image / image.norm(dim=-1, keepdim=True)
    similarity = image_normalized @ image_normalized.T           # line 153
    relevance = image_normalized @ (text / text.norm(dim=-1, keepdim=True)).T
    relevance = (-relevance if negate else relevance).mean(dim=-1)                      # line 159
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())  # line 160
    kernel = relevance[:, None] * similarity * relevance[None, :]                      # line 167
    n = len(kernel)
    cis = torch.zeros(visual_token_num, n, dtype=kernel.dtype)
    di2s = torch.diagonal(kernel).clone()
    picks = []
    for i in range(visual_token_num):                            # lines 173-181
        j = int(torch.argmax(di2s))
        picks.append(j)
        eis = (kernel[j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
        cis[i] = eis
        di2s -= eis ** 2
        di2s[j] = float("-inf")
    return np.sort(np.array(picks))


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    for budget in BUDGETS:
        k = n_keep(prepared, budget)
        (stage,) = workbench_plan(CDPruner(), adapter, prepared, budget).stages
        assert len(stage.kept) == k
        assert jaccard(stage.kept, official_cdpruner(adapter, prepared, k)) == 1.0, (label, budget)


@pytest.mark.parametrize("label", labels())
def test_paper_sign_variant_follows_the_same_rule_unnegated(label):
    adapter, prepared = case(label)
    k = n_keep(prepared, 0.25)
    (stage,) = workbench_plan(CDPruner(negate_relevance=False), adapter, prepared, 0.25).stages
    assert jaccard(stage.kept, official_cdpruner(adapter, prepared, k, negate=False)) == 1.0
