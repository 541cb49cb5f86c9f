"""AIM parity, in-LLM stage: the official PageRank pruning against the workbench's executed stages.

Official code: LaVi-Lab/AIM (HEAD), other_packages/transformers/src/transformers/models/qwen2/modeling_qwen2.py
- lines 61-78 (get_importance): on the layer's masked attention LOGITS, ``M = softmax(attn / 0.1)``
  per head, ``dist = 1/N`` then 5 times ``dist = (dist @ M) * (1 - d) + d / N`` with ``d = 0``, then
  ``mean(dist ** 2 over heads) ** 0.5``; called in the attention forward on the prefill (lines 358-360);
- line 936 (Qwen2Model.forward): ``retain_rate[i] = max(0, 1 - (i - 14 + 1) * 0.125)`` for layer
  ``i >= 14`` of 28, else 1;
- lines 996-1011: after layer i, the text (system prompt and question) is protected with score 1.0,
  tokens masked earlier get -1; ``sort(descending)`` and the first ``int((N - protected) * retain_rate[i]
  + protected)`` stay, the rest are masked for every later layer (positions unchanged).
Placement (the method's documented choices, used here too): the code's first layer 14 of 28 is
``first_layer`` 16 of the 32-layer reference, reference layer r placed at ``scaled_layer(r)`` capped at
depth - 2, reference layers landing on one decoder layer fold (the later count wins); pruned tokens are
removed rather than masked (documented deviation), so the reference runs on the live, physically pruned
sequence; top-k ties to the lower index (stable sort). The LLM's input is the merged sequence of the
pre-LLM stage, built with the merging reference of ``test_aim.py`` (positions re-numbered).
The eager copy's decoder layers are run by hand; the workbench's stages come from its executor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, causal_mask, eager_forward, eager_model, labels, language_model,
                                         layer_attention, n_keep, visual_positions, workbench_stages)
from tests.pruning.parity.test_aim import official_aim_merge
from workbench.pruning.layers import scaled_layer
from workbench.pruning.methods.aim import AIM
from workbench.pruning.plan import PRE_LLM

BUDGETS = (0.25, 0.5, 1.0)  # the code's 25 % merge, one step, none
VARIANTS = ({},                                  # the default: every visual token gone before the last layer
            {"rate_step": 0.05},                # one stage keeping 20 % on the shipped decoder
            {"first_layer": 8, "rate_step": 0.02},  # two stages (92 % then 52 %) on the shipped decoder
            {"rate_step": 0.05, "iterations": 2, "damping": 0.15, "temperature": 0.5})


def get_importance(logits: torch.Tensor, tau: float, iters: int, d: float) -> torch.Tensor:
    """[S] importance from the [H, S, S] masked logits (lines 61-78)."""
    m = torch.softmax(logits.double() / tau, dim=-1)
    n = m.shape[-1]
    dist = torch.full((m.shape[0], 1, n), 1.0 / n, dtype=torch.float64)
    for _ in range(iters):
        dist = (dist @ m) * (1 - d) + d / n
    return dist.pow(2).mean(dim=0).pow(0.5)[0]


def merge_steps(n: int, keep: int) -> tuple[int, ...]:
    """The merging steps of the budgets tested here (``test_aim.py``): none at 100 %, ``n // 2`` at 50 %,
    the code's ``n // 2, n // 4`` at 25 %."""
    steps = {n: (), n // 2: (n // 2,), n // 4: (n // 2, n // 4)}
    return steps[keep]


def official_aim_llm(adapter, prepared, budget, first_layer=16, rate_step=0.125, temperature=0.1,
                     iterations=5, damping=0.0):
    """{layer: visual tokens alive entering it} for every decoder layer."""
    depth = len(adapter.decoder_layers())
    merged = official_aim_merge(adapter, prepared, merge_steps(prepared.layout.n_tokens, n_keep(prepared, budget)))
    places = sorted(merged)
    m = len(places)
    rates = {}  # scoring layer -> retain_rate after it (line 936; folded, the later reference layer wins)
    for r in range(first_layer, 32):
        rates[min(scaled_layer(r, depth), depth - 2)] = max(0.0, 1.0 - (r - first_layer + 1) * rate_step)

    # the LLM's input: text rows as embedded, the merged visual rows at their places, positions 0..L-1
    embedded = eager_forward(adapter, prepared).hidden_states[0][0]
    image = visual_positions(prepared)
    assert (np.diff(image) == 1).all()
    features = embedded[torch.as_tensor(image)].double()
    visual = torch.stack([torch.as_tensor(merged[p]) @ features for p in places]).to(embedded.dtype)
    states = torch.cat([embedded[:image[0]], visual, embedded[image[-1] + 1:]])[None]
    kinds = np.concatenate([np.full(image[0], -1), places, np.full(embedded.shape[0] - image[-1] - 1, -1)])
    positions = torch.arange(states.shape[1])[None]

    lm = language_model(eager_model(adapter))
    alive = {}
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            alive[i] = tuple(int(v) for v in kinds[kinds >= 0])
            if i in rates:  # score on this layer's live input, mask (remove) for the next layers
                logits = layer_attention(lm, i, states, positions, np.arange(states.shape[1]), logits=True)
                importance = get_importance(logits, temperature, iterations, damping)
                protected = kinds < 0
                importance[torch.as_tensor(protected)] = 1.0
                order = torch.sort(-importance, stable=True).indices.numpy()
                # lines 1006-1008; N - protected is m there (masked tokens stay in the code's sequence)
                keep = order[:int(m * rates[i] + protected.sum())]
            out = layer(states, attention_mask=causal_mask(states.shape[1]), position_ids=positions,
                        position_embeddings=lm.rotary_emb(states, positions))
            states = out[0] if isinstance(out, tuple) else out
            if i in rates:
                rows = np.sort(keep)
                states, kinds, positions = states[:, rows], kinds[rows], positions[:, torch.as_tensor(rows)]
    return alive


def executed_alive(stages, depth):
    """{layer: visual tokens alive entering it} from the workbench's stages."""
    current, alive = tuple(sorted(stages[PRE_LLM])), {}
    for i in range(depth):
        if i in stages:
            current = tuple(sorted(stages[i]))
        alive[i] = current
    return alive


@pytest.mark.parametrize("label", labels(("llava",)))
def test_in_llm_pruning_equals_the_official_rule(label):
    adapter, prepared = case(label)
    depth = len(adapter.decoder_layers())
    for budget in BUDGETS:
        for kwargs in VARIANTS:
            reference = official_aim_llm(adapter, prepared, budget, **kwargs)
            executed = executed_alive(workbench_stages(AIM(**kwargs), adapter, prepared, budget), depth)
            assert executed == reference, (label, budget, kwargs)
