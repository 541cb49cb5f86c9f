"""TransPrune parity: the official TTV + IGA rank & drop against the workbench's executed stages.

Official code: liaolea/TransPrune, llava/model/modeling_llama_transprune.py (HEAD), defaults from
scripts/transprune/v1_5_test/*.sh (accumulating [7..12], pruning [7, 9, 12], ratios
[0.875, 0.625, 0.125]; llava/eval/model_vqa_loader.py line 97 prepends 1.0):
- lines 860-913: a decoder layer whose ``layer_idx + 1`` is accumulating returns
  ``compute_transf_weight(input_layernorm out, attention out) + compute_transf_weight(
  post_attention_layernorm out, mlp out)``; lines 917-930: ``||after|| / ||before|| *
  exp(1 - cos) / sum(exp(1 - cos))`` over the sequence;
- lines 1319-1360: after layer ``layer_idx``, if ``layer_idx + 1`` is a pruning layer, rank & drop;
- lines 1439-1440: ``keep_length = int(N * ratio_list[stage + 1])``;
- lines 1455-1475: q/k of ``layers[rank_layer]`` (input_layernorm, RoPE at the current positions);
  lines 1493-1502: rows from the first token after the image to the prompt's end, causal softmax,
  head mean, image keys, mean over rows (IGA);
- lines 1514-1523: TTV summed over the stored layers, both normalised by ``sum + 1e-8``, added;
  ``topk(keep_length)``; lines 1530-1536 keep the stored TTV rows of the survivors; the sequence is
  re-numbered from 0 afterwards.
Layers are placed on this decoder as the method does (``scaled_layer``; folded stages keep the later
ratio): on the shipped 4-layer decoder, TTV of layers 0-1, stages before layers 1 (0.625) and 2 (0.125).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.pruning.parity.common import (case, causal_mask, eager_forward, eager_model, jaccard, labels,
                                         language_model, layer_attention, torch_topk, visual_positions,
                                         workbench_stages)
from workbench.pruning.layers import scaled_layer
from workbench.pruning.methods.transprune import TransPrune

BUDGETS = (0.125, 0.5)


def compute_transf_weight(before, after):                                     # lines 917-930
    length_ratio = torch.norm(after, dim=-1) / torch.norm(before, dim=-1)
    exp_cosine = torch.exp(1 - F.cosine_similarity(before, after, dim=-1))
    return length_ratio * (exp_cosine / exp_cosine.sum())


@torch.no_grad()
def official_transprune(adapter, prepared, accumulating=(7, 8, 9, 10, 11, 12), pruning=(7, 9, 12),
                        ratios=(0.875, 0.625, 0.125)):
    lm = language_model(eager_model(adapter))
    depth = len(lm.layers)
    stage_ratio = {}
    for p, r in zip(pruning, ratios):
        stage_ratio[scaled_layer(p, depth)] = r
    accumulate = {scaled_layer(a, depth) - 1 for a in accumulating}
    n = prepared.layout.n_tokens
    h = eager_forward(adapter, prepared).hidden_states[0].clone()
    positions = torch.arange(h.shape[1]).unsqueeze(0)
    kinds = np.full(h.shape[1], -1)
    kinds[visual_positions(prepared)] = np.arange(n)
    transf_weight_list, stages = [], {}
    for i, layer in enumerate(lm.layers):
        if i in stage_ratio:  # rank & drop after layer i - 1 (rank_layer = i)
            keep_length = int(n * stage_ratio[i])                             # line 1440
            image = np.flatnonzero(kinds >= 0)
            text = np.arange(image.max() + 1, h.shape[1])                     # prompt_ids..prompt_total_len
            probs = layer_attention(lm, i, h, positions, text)                # [H, T, S], RoPE, causal
            iga = probs.mean(dim=0)[:, image].mean(dim=0).double()            # lines 1499-1501
            ttv = sum(w[image] for w in transf_weight_list) if transf_weight_list else torch.zeros(len(image))
            ttv = ttv.double() / (ttv.double().sum() + 1e-8)                   # line 1519
            iga = iga / (iga.sum() + 1e-8)                                    # line 1520
            top = torch_topk(ttv + iga, keep_length)                          # lines 1523-1524
            stages[i] = tuple(sorted(int(v) for v in kinds[image[top]]))
            rows = np.flatnonzero((kinds < 0) | np.isin(kinds, kinds[image[top]]))
            h, kinds = h[:, rows], kinds[rows]
            transf_weight_list = [w[rows] for w in transf_weight_list]        # lines 1530-1536
            positions = torch.arange(len(rows)).unsqueeze(0)                   # re-numbered
        # the decoder layer, sublayer by sublayer (lines 860-896)
        embeddings = lm.rotary_emb(h, positions)
        residual = h
        x = layer.input_layernorm(h)
        attn = layer.self_attn(x, attention_mask=causal_mask(h.shape[1]), position_embeddings=embeddings,
                               position_ids=positions)[0]
        h = residual + attn
        y = layer.post_attention_layernorm(h)
        mlp = layer.mlp(y)
        h = h + mlp
        if i in accumulate:                                                   # lines 1323-1337, 907-913
            transf_weight_list.append(compute_transf_weight(x[0], attn[0]) + compute_transf_weight(y[0], mlp[0]))
    return stages


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    reference = official_transprune(adapter, prepared)
    for budget in BUDGETS:  # the default ignores the budget, as the code does
        stages = workbench_stages(TransPrune(), adapter, prepared, budget)
        assert stages.keys() == reference.keys()
        for layer, kept in reference.items():
            assert jaccard(stages[layer], kept) == 1.0, (label, budget, layer)
