"""FEATHER parity: the official two-cut rule against the workbench's executed stages.

Official code: markendo/FEATHER, prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py (HEAD),
run with vlm-evaluation/scripts/eval_feather.sh (fastv_k=[8, 16], fastv_ratio=0.7, no_rope_s=3):
- lines 203-208: before decoder layer k-1 (k in fastv_k) runs, ``calculate_attention_weight`` on that
  layer's INPUT (lines 250-283): input_layernorm, q/k projections, NO rotary (no_rope), the last
  token's query against the image keys only, softmax over those keys, head mean;
- lines 141-156, first cut (before layer 8): ``topk(int(len(image_indices) * fastV_ratio))`` with
  ``fastV_ratio = 1 - 0.7`` (line 23) united (``torch.unique``) with ``grid[::3, ::3]`` of the square grid;
- line 201: ``image_indices`` becomes the M survivors; lines 158-162, second cut (before layer 16):
  ``topk(int(M * fastV_ratio**2))`` of the survivors;
- lines 191-196: the kept rows keep their position ids.
Layers placed on this decoder by ``scaled_layer`` (8/16 of 32 -> 1/2 of the shipped 4). The tiny
families' 2-layer decoders fold the two cuts (the method says it does not apply there).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, jaccard, labels, layer_attention, run_pruned, torch_topk, workbench_stages
from workbench.pruning.layers import scaled_layer
from workbench.pruning.methods.feather import Feather

BUDGETS = (0.125, 0.5)


def official_feather(adapter, prepared, fastv_k=(8, 16), fastv_ratio=0.7, stride=3):
    depth = len(adapter.decoder_layers())
    k1, k2 = (scaled_layer(k, depth) for k in fastv_k)
    ratio = 1 - fastv_ratio                                                   # line 23
    last = {}

    def score(i, lm, states, kinds):                                          # lines 203-208, 250-283
        image_rows = np.flatnonzero(kinds >= 0)
        logits = layer_attention(lm, i, states, None, [states.shape[1] - 1], rope=False, logits=True)
        probs = torch.softmax(logits[:, 0, image_rows].float(), dim=-1)       # softmax over image keys
        last["score"], last["image"] = probs.mean(dim=0), kinds[image_rows]   # mean over heads

    def cut(i, lm, states, positions, kinds):
        kept = None
        if i == k1:                                                           # lines 141-156
            n = len(last["image"])
            top = torch_topk(last["score"], int(n * ratio))  # exact ties: lower index (see torch_topk)
            grid_size = int(math.sqrt(n))
            strided = np.arange(n).reshape(grid_size, grid_size)[::stride, ::stride].flatten()
            kept = last["image"][np.unique(np.concatenate([top, strided]))]
        elif i == k2:                                                         # lines 158-162
            m = len(last["image"])                                            # line 201: the survivors
            kept = last["image"][torch_topk(last["score"], int(m * (ratio * ratio)))]
        if i + 1 in (k1, k2):  # the code scores AFTER this layer's cut, on the layer's (pruned) input
            rows = np.flatnonzero((kinds < 0) | np.isin(kinds, kept)) if kept is not None else np.arange(len(kinds))
            score(i, lm, states[:, rows], kinds[rows])
        return None if kept is None else (kept, "original")                   # lines 191-196

    return run_pruned(adapter, prepared, cut)[1]


@pytest.mark.parametrize("label", labels())
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    reference = official_feather(adapter, prepared)
    for budget in BUDGETS:  # the default ignores the budget, as the code does
        stages = workbench_stages(Feather(), adapter, prepared, budget)
        assert stages.keys() == reference.keys()
        for layer, kept in reference.items():
            assert jaccard(stages[layer], kept) == 1.0, (label, budget, layer)
