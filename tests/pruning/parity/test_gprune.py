"""G-Prune (G-Search / P-Sigmoid) parity against the paper's rule (no official code was released; see
the method's docstring).

Paper: Zhao et al., "Accelerating Multimodal Large Language Models by Searching Optimal Vision Token
Reduction" (arXiv 2412.00556, CVPR 2025): the ranking of the visual tokens by the attention they
receive is nearly the same in every decoder layer but the first, so ONE ranking serves every layer;
each layer keeps the top tokens of it, only how many is searched. P-Sigmoid parameterises the keep rate
as a decreasing sigmoid of depth, ``1 / (1 + exp(slope * (x - center)))``; G-Search outputs a rate per
layer. What the paper leaves open is fixed by the method's parameters, and the reference uses the same
choices: the ranking is the head-mean attention of the text rows after the image (or the last row) on
the visual keys in the layer before ``start`` (2 of 32, placed at the same relative depth); the sigmoid
of the reference depth ``x = layer * 32 / depth`` rescaled from 1 at the first pruned layer to the budget
at the last; a layer keeps ``round(N * rate)`` (at least the budget; a searched list takes the rate of
reference layer ``round(layer * 32 / depth)`` and ignores the budget). The reference reads the eager
copy's unpruned attention (exact: nothing is pruned before ``start``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.pruning.parity.common import (case, eager_forward, jaccard, labels, n_keep, torch_topk,
                                         visual_positions, workbench_plan)
from workbench.pruning.layers import scaled_layer
from workbench.pruning.methods.gprune import GPrune

BUDGETS = (0.125, 0.25, 0.5)
SEARCHED = tuple(1.0 if k < 4 else 0.8 if k < 12 else 0.55 if k < 20 else 0.3 for k in range(32))  # a G-Search-like list


def ranking(adapter, prepared, layer: int, rows: str) -> np.ndarray:
    attention = eager_forward(adapter, prepared).attentions[layer][0].double().mean(dim=0)  # head mean [S, S]
    image = visual_positions(prepared)
    queries = np.arange(image.max() + 1, attention.shape[0]) if rows == "text" else [attention.shape[0] - 1]
    return attention[queries][:, image].mean(dim=0).numpy()


def paper_gprune(adapter, prepared, budget, rows="text", start=2, slope=0.5, center=16.0, rates=None):
    """{layer: kept} of every layer whose kept count drops."""
    n, k = prepared.layout.n_tokens, n_keep(prepared, budget)
    depth = len(adapter.decoder_layers())
    first = scaled_layer(start, depth)
    scores = ranking(adapter, prepared, first - 1, rows)

    def sigmoid(layer):
        return 1.0 / (1.0 + math.exp(slope * (layer * 32 / depth - center)))

    stages, alive = {}, n
    for layer in range(first, depth):
        if rates is None:
            top, bottom = sigmoid(first), sigmoid(depth - 1)
            rate = k / n if top == bottom else k / n + (1 - k / n) * (sigmoid(layer) - bottom) / (top - bottom)
            count = min(n, max(k, round(n * rate)))
        else:
            count = min(n, round(n * rates[min(round(layer * 32 / depth), 31)]))
        if count < alive:
            stages[layer], alive = tuple(torch_topk(scores, count)), count
    return stages


@pytest.mark.parametrize("label", labels(("llava",)))
def test_schedules_and_rows_equal_the_paper_rule(label):
    adapter, prepared = case(label)
    for budget in BUDGETS:
        for kwargs in ({}, {"rows": "last"}, {"slope": 0.25, "center": 8.0}, {"rates": SEARCHED}):
            reference = paper_gprune(adapter, prepared, budget, **kwargs)
            plan = workbench_plan(GPrune(**kwargs), adapter, prepared, budget)
            stages = {s.where: s.kept for s in plan.stages}
            assert stages.keys() == reference.keys(), (label, budget, kwargs)
            assert reference, (label, budget, kwargs)
            for layer, kept in reference.items():
                assert jaccard(stages[layer], kept) == 1.0, (label, budget, kwargs, layer)
