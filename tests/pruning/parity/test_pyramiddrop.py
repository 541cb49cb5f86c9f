"""PyramidDrop parity: the official rank & drop rule against the workbench's executed stages.

Official code: Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py (HEAD)
- lines 1221-1236: after decoder layer ``layer_idx``, if ``rank_layer = layer_idx + 1`` is in
  ``layer_list`` ([8, 16, 24]), ``pdrop_rank_drop`` runs on that layer's OUTPUT with the weights of
  layer ``rank_layer`` (i.e. before layer 8/16/24);
- lines 1306-1307: ``keep_length = int(N * image_token_ratio_list[stage + 1])`` with
  ``image_token_ratio_list = [1.0] + [0.5, 0.25, 0.125]`` (README lines 75-76, scripts/v1_5/pdrop_eval/*.sh);
- lines 1320-1343: q/k of ``layers[rank_layer]`` (input_layernorm, q_proj, k_proj, RoPE at the
  current positions); lines 1380-1390: the last prompt token's row, + causal mask, softmax, mean over
  heads, image keys, ``topk(keep_length)``; the pruned sequence is then re-numbered from 0.
Layers are placed on this decoder by ``scaled_layer`` (8/16/24 of 32 -> 1/2/3 of the shipped 4).
The reference runs the eager copy's decoder layers by hand on the physically pruned sequence
(``run_pruned``); the workbench's stages come from its executor with the method's layer callback.
Tiny families have 2-layer decoders where the three stages fold into one: not comparable.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.parity.common import case, jaccard, labels, layer_attention, run_pruned, workbench_stages
from workbench.pruning.layers import scaled_layer
from workbench.pruning.methods.pyramiddrop import PyramidDrop

BUDGETS = (0.125, 0.25, 0.5)


def official_pyramiddrop(adapter, prepared, ratio_list=(0.5, 0.25, 0.125), layer_list=(8, 16, 24), counts=None):
    """{layer: kept} by the official rule; ``counts`` overrides ``int(N * ratio)`` per stage."""
    n = prepared.layout.n_tokens
    depth = len(adapter.decoder_layers())
    at = {scaled_layer(k, depth): s for s, k in enumerate(layer_list)}
    assert len(at) == len(layer_list), "stages fold on this decoder"

    def cut(i, lm, states, positions, kinds):
        if i not in at:
            return None
        keep_length = int(n * ratio_list[at[i]]) if counts is None else counts[at[i]]
        probs = layer_attention(lm, i, states, positions, [states.shape[1] - 1])  # last prompt token
        image_rows = np.flatnonzero(kinds >= 0)
        scores = probs.mean(0)[0, image_rows]                                     # head mean, image keys
        top = scores.topk(keep_length).indices.numpy()
        return kinds[image_rows[top]], "reindex"

    return run_pruned(adapter, prepared, cut)[1]


@pytest.mark.parametrize("label", labels())
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    reference = official_pyramiddrop(adapter, prepared)
    for budget in BUDGETS:  # the default ignores the budget, as the code does
        stages = workbench_stages(PyramidDrop(), adapter, prepared, budget)
        assert stages.keys() == reference.keys()
        for layer, kept in reference.items():
            assert jaccard(stages[layer], kept) == 1.0, (label, budget, layer)


@pytest.mark.parametrize("label", labels())
def test_final_budget_variant_follows_the_same_rule_with_its_lambda(label):
    adapter, prepared = case(label)
    n = prepared.layout.n_tokens
    for budget in (0.125, 0.25):
        method = PyramidDrop(budget_mode="final")
        stages = workbench_stages(method, adapter, prepared, budget)
        counts = [len(kept) for _, kept in sorted(stages.items())]
        assert counts[-1] == round(n * budget)
        reference = official_pyramiddrop(adapter, prepared, counts=counts)
        for layer, kept in reference.items():
            assert len(kept) == len(stages[layer]) and jaccard(stages[layer], kept) == 1.0, (label, budget, layer)
