"""ToDRE parity against the paper's rule (no official code was released; see the method's docstring).

Paper: Li, Yang, Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large
Vision-Language Models" (arXiv 2505.18757 v1), method section: stage 1 keeps a diverse subset of the
visual tokens after the vision encoder with the greedy k-center algorithm (Gonzalez: each new centre is
the token farthest from its nearest centre, distance 1 - cosine); stage 2, inside the LLM after the
shallow layers where visual information migrates to the text tokens, drops the visual tokens the
text/instruction tokens attend to least. What the paper leaves open is fixed by the method's
parameters, and the reference uses the same choices: features = the tower's projector-feed hidden
state (patches only), first centre = the token farthest from its nearest other token, stage 1 keeps
``ceil(n_keep / 0.5)``, stage 2 before decoder layer 2 of 32 (scaled) keeps ``n_keep`` by the
head- and row-mean attention of every text token after the image (RoPE, causal); stage 1's sequence is
numbered contiguously (as LLaVA numbers image features pruned before they join the text), stage 2 keeps
those positions.
The reference computes k-center and the in-LLM attention independently of the workbench (eager tower
hidden states; the eager copy's decoder run by hand on the physically pruned sequence).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, eager_tower, facts, jaccard, labels, layer_attention, n_keep,
                                         run_pruned, workbench_stages)
from workbench.pruning.layers import scaled_layer
from workbench.pruning.methods.todre import ToDRE
from workbench.pruning.plan import PRE_LLM

BUDGETS = (0.125, 0.25, 0.5)


def k_center(features: torch.Tensor, k: int) -> list[int]:
    """Greedy k-center (Gonzalez) with distance 1 - cosine; the first centre is the token whose nearest
    other token is farthest."""
    x = features / features.norm(dim=-1, keepdim=True)
    distance = 1.0 - x @ x.T
    nearest = distance.clone().fill_diagonal_(float("inf")).min(dim=0).values
    centres = [int(torch.argmax(nearest))]
    to_set = distance[centres[0]].clone()
    while len(centres) < k:
        candidate = to_set.clone()
        candidate[centres] = -float("inf")
        centres.append(int(torch.argmax(candidate)))
        to_set = torch.minimum(to_set, distance[centres[-1]])
    return centres


def paper_todre(adapter, prepared, keep: int, layer: int = 2, relevance_keep: float = 0.5):
    n = prepared.layout.n_tokens
    feed = facts(adapter).projector_feed_layer
    patches = eager_tower(adapter, prepared).hidden_states[feed][0, 1:].double()  # the projector's input
    diverse = k_center(patches, min(n, math.ceil(keep / relevance_keep)))
    prune_at = scaled_layer(layer, len(adapter.decoder_layers()))

    def cut(i, lm, states, positions, kinds):
        if i == 0:  # stage 1, before the LLM (pruning the decoder's input = before layer 0)
            return np.asarray(diverse), "reindex"
        if i == prune_at:
            image = np.flatnonzero(kinds >= 0)
            text = np.arange(image.max() + 1, states.shape[1])
            relevance = layer_attention(lm, i, states, positions, text).mean(dim=(0, 1))[image]
            top = torch.sort(-relevance.double(), stable=True).indices[:keep].numpy()
            return kinds[image[top]], "original"
        return None

    return run_pruned(adapter, prepared, cut)[1]


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_paper_rule(label):
    adapter, prepared = case(label)
    for budget in BUDGETS:
        reference = paper_todre(adapter, prepared, n_keep(prepared, budget))
        stages = workbench_stages(ToDRE(), adapter, prepared, budget)
        assert jaccard(stages[PRE_LLM], reference[0]) == 1.0, (label, budget, "stage 1")
        (layer,) = [k for k in stages if k != PRE_LLM]
        assert layer == scaled_layer(2, len(adapter.decoder_layers()))
        assert jaccard(stages[layer], reference[layer]) == 1.0, (label, budget, "stage 2")
