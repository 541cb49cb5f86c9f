"""VScan parity, in-LLM stage: the official ``layer_prune`` run by hand on the decoder after the official
tower side (global + local scans, token merging), against the stage the workbench executes.

Official code: Tencent/SelfEvolvingAgent (HEAD), VScan/llava/model/
- llava_arch.py lines 254-292 (``encode_images``): the tower side (checked in test_vscan.py); lines
  142-197 (``token_merging``): the kept tokens, each averaged with the tokens nearest to it, stay in
  sequence order (``image_features[b, index_mask[b]]``); lines 684-686: ``image_tokens`` = the count
  the tower side passes on, ``prompt_len`` the prompt without the image placeholder;
- eval/model_vqa_loader.py lines 114-115: ``image_token_list = [visual_token_num] + [32]``,
  ``layer_list = [16]`` (scripts/llava1_5/*.sh);
- modeling_llama_x.py lines 1231-1251 (``forward_x``): after decoder layer ``layer_idx``, if
  ``rank_layer = layer_idx + 1`` is in ``layer_list``, ``layer_prune`` runs on that layer's OUTPUT
  with the weights of layer ``rank_layer``; lines 1337-1338: ``keep_length = min(image_token_list[1],
  image_tokens)``; lines 1355-1372: ``layers[rank_layer]``'s input norm, q/k, RoPE at the current
  positions; lines 1421-1430: the query is row ``prompt_len + image_tokens - 1`` (the last prompt
  token), + causal mask, softmax; lines 1442-1451: mean over heads, the image columns,
  ``topk(keep_length)``, sorted (sequence order kept); lines 1480-1481: positions re-numbered.
Placement as the method's (``scaled_layer``: 16 of 32 -> 2 on the shipped 4-layer decoder, 1 on the
tiny 2-layer one), counts scaled by n_keep / 64. Ties: the lower index.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, causal_mask, eager_forward, eager_model, facts, jaccard, labels,
                                         language_model, n_keep, torch_topk, visual_positions, workbench_stages)
from tests.pruning.parity.test_vscan import official_vscan
from workbench.pruning.layers import scaled_layer
from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.vscan import VScan

BUDGETS = (0.125, 0.25, 0.5)


@torch.no_grad()
def layer_prune(lm, rank_layer, states, positions, image_index, image_tokens, keep_length):
    """Row offsets (into the image block) ``layer_prune`` keeps, sorted."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = lm.layers[rank_layer].self_attn
    hidden_states = lm.layers[rank_layer].input_layernorm(states)                      # line 1357
    length, head_dim = hidden_states.shape[1], attn.head_dim
    query_states = attn.q_proj(hidden_states).view(1, length, -1, head_dim).transpose(1, 2)
    key_states = attn.k_proj(hidden_states).view(1, length, -1, head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden_states, positions)
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)  # line 1372
    key_states = key_states.repeat_interleave(query_states.shape[1] // key_states.shape[1], dim=1)
    row = length - 1                                                                    # prompt_total_len - 1
    attn_weights = query_states[0][:, row:row + 1] @ key_states[0].transpose(1, 2) / math.sqrt(head_dim)
    attn_weights = torch.softmax(attn_weights + causal_mask(length)[0][:, row:row + 1], dim=-1, dtype=torch.float32)
    attention_avg_text = attn_weights.mean(0)[:, image_index:image_index + image_tokens].mean(0)  # 1442-1444
    return torch_topk(attention_avg_text.double(), keep_length)                         # 1447-1451


@torch.no_grad()
def official_vscan_llm(adapter, prepared, budget, layer_list=(16,), image_token_list=(32,)):
    """{layer: kept} of the official in-LLM stages after the official tower side."""
    f = facts(adapter)
    method = VScan()
    shallow, deep = method.tower_layers(f)
    group = prepared.layout.groups[0]
    window = max(1, round(6 * min(group.rows, group.cols) / 24))
    tower_tokens, _ = method.counts(SelectionContext(prepared.layout, budget, None, f))
    scale = n_keep(prepared, budget) / 64
    at = {scaled_layer(k, f.decoder_layers): max(1, round(t * scale)) for k, t in zip(layer_list, image_token_list)}
    kept, merges = official_vscan(adapter, prepared, tower_tokens, shallow, deep, window)
    kept = kept.astype(np.int64)
    states = eager_forward(adapter, prepared).hidden_states[0].clone()   # the projected features at their rows
    image_positions = visual_positions(prepared)
    start = int(image_positions[0])
    assert np.array_equal(image_positions, np.arange(start, start + len(image_positions)))  # one image block
    features = states[0, start:start + len(image_positions)]
    block = features[torch.as_tensor(kept)].clone()
    for j, target in enumerate(kept):                                     # token_merging, scaling 1
        sources = merges.get(int(target), [])
        block[j] = (features[target] + features[torch.as_tensor(sources, dtype=torch.long)].sum(0)) / (1 + len(sources))
    states = torch.cat([states[:, :start], block[None], states[:, start + len(image_positions):]], dim=1)
    ids = np.asarray(kept)
    positions = torch.arange(states.shape[1]).unsqueeze(0)
    lm = language_model(eager_model(adapter))
    stages = {}
    for i, layer in enumerate(lm.layers):
        if i in at:
            keep = layer_prune(lm, i, states, positions, start, len(ids), min(at[i], len(ids)))
            stages[i] = tuple(int(v) for v in ids[keep])
            states = torch.cat([states[:, :start], states[:, start + torch.as_tensor(keep)],
                                states[:, start + len(ids):]], dim=1)
            ids = ids[keep]
            positions = torch.arange(states.shape[1]).unsqueeze(0)                  # lines 1480-1481
        out = layer(states, attention_mask=causal_mask(states.shape[1]), position_ids=positions,
                    position_embeddings=lm.rotary_emb(states, positions))
        states = out[0] if isinstance(out, tuple) else out
    return stages


@pytest.mark.parametrize("label", labels(("llava",)))
def test_llm_stage_equals_the_official_rule(label):
    adapter, prepared = case(label)
    for budget in BUDGETS:
        reference = official_vscan_llm(adapter, prepared, budget)
        stages = workbench_stages(VScan(), adapter, prepared, budget)
        assert [w for w in stages if w != "pre_llm"] == list(reference)
        for layer, kept in reference.items():
            assert len(stages[layer]) == len(kept) and jaccard(stages[layer], kept) == 1.0, (label, budget, layer)
