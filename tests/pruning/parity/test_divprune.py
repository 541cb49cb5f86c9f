"""DivPrune parity: the official greedy max-min rule against ``DivPrune().select``.

Official code: vbdi/divprune, LLaVA/llava/model/llava_arch.py (HEAD)
- lines 147-150 ``pairwise_cosine_similarity``; line 155: distance = 1 - cosine.
- lines 152-171 ``DivPrune``: ``threshold_terms = int(round(ratio * N))`` picks; the first pick is the
  argmax over columns of the SECOND-smallest distance (``topk(m2, 2, largest=False).values[1]``, line
  164); every next pick the argmax of the min distance to the picks so far (lines 161, 166-169).
- lines 365-375: applied with LAYER_INDEX=0 to ``new_input_embeds`` (the projected visual tokens
  at the LLM input), here the eager forward's ``hidden_states[0]`` at the image positions.
Budgets are fractions, the code's SUBSET_RATIO; the count is ``int(round(ratio * N))`` (Python's
round half to even: 0.75 of OneVision's 46 tiny tokens is 34, where the workbench's n_keep rounds
half up to 35), which the method's default ``count="round"`` keeps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, eager_forward, jaccard, labels, visual_positions, workbench_plan
from tests.tiny_models import TINY_FAMILIES
from workbench.pruning.methods.divprune import DivPrune

BUDGETS = (0.125, 0.25, 0.5, 0.75)


def official_divprune(visual_tokens: torch.Tensor, ratio: float) -> np.ndarray:
    n = visual_tokens.shape[0]
    threshold_terms = int(round(ratio * n))                                       # line 153
    norm = visual_tokens / visual_tokens.norm(dim=1, keepdim=True)                 # line 148
    cosine_matrix = 1.0 - torch.mm(norm, norm.t())                                 # lines 149, 155
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            m2 = cosine_matrix
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]         # line 164
        else:
            m2 = torch.index_select(cosine_matrix, 0, s[:i])                      # line 161
            scores = torch.min(m2, dim=0).values                                  # line 166
        s[i] = torch.argmax(scores)                                               # lines 168-169
    return np.sort(s.numpy())


@pytest.mark.parametrize("label", labels(TINY_FAMILIES))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    embeds = eager_forward(adapter, prepared).hidden_states[0][0].double()  # the decoder's input
    visual = embeds[torch.as_tensor(visual_positions(prepared))]
    for budget in BUDGETS:
        (stage,) = workbench_plan(DivPrune(), adapter, prepared, budget).stages
        kept = official_divprune(visual, budget)
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)
