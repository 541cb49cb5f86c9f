"""TopV parity against the paper's rule (no official code was released; see the method's docstring).

Paper: Yang et al., "TopV: Compatible Token Pruning with Inference Time Optimization for Fast and
Low-Memory Multimodal Vision Language Model" (arXiv 2503.18278, CVPR 2025): in layer L_i (2, "following
FastV") the visual tokens entering the layer are the sources and the same tokens leaving it the targets
of an optimal-transport problem whose cost is feature distance ``1 - cos`` plus a relative spatial
distance and an absolute distance from the image centre; Sinkhorn gives the contribution matrix, a
source's importance is its row sum, the top tokens survive and a few pruned tokens are recovered evenly
over the image. What the paper leaves open is fixed by the method's parameters, and the reference uses
the same choices: sources/targets = the decoder's input/output of layer K-1 (K = 2 of 32, placed at the
same relative depth) through the decoder's final norm; distances between the tokens' pixel-box centres
over the image extent's diagonal; uniform marginals, ``iterations`` target-side scalings each after the
first preceded by a source-side one; ``round(recover * n_keep)`` recovered at the middles of equal strides
over the pruned tokens in layout order. The reference reads the eager copy's unpruned hidden states
(exact: nothing is pruned before K).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, eager_forward, eager_model, jaccard, labels, language_model,
                                         n_keep, torch_topk, visual_positions, workbench_plan)
from workbench.pruning.layers import scaled_layer
from workbench.pruning.methods.topv import TopV

BUDGETS = (0.125, 0.25, 0.5)
VARIANTS = ({}, {"iterations": 3}, {"spatial": 0.0, "central": 0.0}, {"recover": 0.0}, {"epsilon": 0.05, "recover": 0.25})


def paper_topv(adapter, prepared, k_keep, layer=2, spatial=1.0, central=1.0, epsilon=0.1, iterations=1, recover=0.1):
    depth = len(adapter.decoder_layers())
    k = scaled_layer(layer, depth)
    hidden = eager_forward(adapter, prepared).hidden_states
    norm = language_model(eager_model(adapter)).norm
    image = torch.as_tensor(visual_positions(prepared))
    with torch.no_grad():
        source = norm(hidden[k - 1][0, image]).double()
        target = norm(hidden[k][0, image]).double()
    source = source / source.norm(dim=-1, keepdim=True)
    target = target / target.norm(dim=-1, keepdim=True)
    boxes = torch.as_tensor(np.asarray(prepared.layout.boxes), dtype=torch.float64)
    centre = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], dim=1)
    low, high = boxes[:, :2].min(dim=0).values, boxes[:, 2:].max(dim=0).values
    diagonal = (high - low).norm()
    cost = ((1 - source @ target.T) + spatial * torch.cdist(centre, centre) / diagonal
            + central * ((centre - (low + high) / 2).norm(dim=-1) / diagonal)[:, None])
    n = len(image)
    kernel = torch.exp(-cost / epsilon)
    u, v = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    for step in range(iterations):  # Sinkhorn with uniform marginals, ending on the target side
        if step:
            u = (1.0 / n) / (kernel @ v)
        v = (1.0 / n) / (kernel.T @ u)
    importance = (u[:, None] * kernel * v[None, :]).sum(dim=1)
    n_recover = min(round(recover * k_keep), n - k_keep)
    best = torch_topk(importance, k_keep - n_recover)
    pruned = np.setdiff1d(np.arange(n), best)
    recovered = [pruned[int((i + 0.5) * len(pruned) / n_recover)] for i in range(n_recover)]
    return k, np.union1d(best, recovered)


@pytest.mark.parametrize("label", labels(("llava",)))
def test_variants_equal_the_paper_rule(label):
    adapter, prepared = case(label)
    for budget in BUDGETS:
        for kwargs in VARIANTS:
            k, kept = paper_topv(adapter, prepared, n_keep(prepared, budget), **kwargs)
            (stage,) = workbench_plan(TopV(**kwargs), adapter, prepared, budget).stages
            assert stage.where == k, (label, kwargs)
            assert len(stage.kept) == len(kept) == n_keep(prepared, budget), (label, budget, kwargs)
            assert jaccard(stage.kept, kept) == 1.0, (label, budget, kwargs)
