"""VisionDrop parity, in-LLM stages: the official ``visiondrop_rank_drop`` run by hand on the decoder,
from the official tower stage on, against every stage the workbench executes for the default.

Official code: Ruixxxx/VisionDrop (HEAD), llava/model/modeling_llama_visiondrop.py
- lines 1224-1243 (``visiondrop_forward``): after decoder layer ``layer_idx``, if ``rank_layer =
  layer_idx + 1`` is in ``layer_list`` ([8, 16, 24], scripts/v1_5/visiondrop_eval/*.sh), the rank &
  drop runs on that layer's OUTPUT with the weights of layer ``rank_layer`` (before layer 8/16/24);
- lines 1321-1324: the stage keeps ``image_token_ratio_list[stage + 1]`` = [dominant, contextual]
  ([30, 5], [22, 4], [16, 3]);
- lines 1339-1355: ``layers[rank_layer]``'s input norm, q/k projections, RoPE at the current positions;
- lines 1407-1421: the image rows as queries over the whole sequence, + causal mask, softmax, mean
  over heads, the image columns, mean over the image rows; line 1424: metric = the RoPE'd keys
  averaged over the KV heads, image rows;
- lines 1428-1455: ``topk(dominant)``; the others in sequence order; targets ``arange(0, R,
  max(1, R // C))[:C]``; each other token joins the ``argmax`` of its key cosine to the targets;
  contextual token = target + mean of its assigned tokens;
- lines 1458-1462: the image block becomes [dominant tokens (sequence order), contextual tokens];
  lines 1497-1498: positions re-numbered ``0..len-1``.
The LLM's first visual block is the tower stage's output (clip_encoder.py lines 43-85, checked in
test_visiondrop.py): [CLS, dominant patches, contextual patches]. The [CLS] is a visual token of every
LLM stage there (``image_tokens`` counts it, line 1321): ranked, kept, dropped or merged like a patch;
the workbench names it by the reserved index N (``cls_token``), so it is compared like the others.

What is compared: the kept SET of original visual indices at every stage and every merge (target and
sources). The code's reordering changes which tokens are spaced targets and, through the causal mask
and RoPE, the later layers' states; ``order="code"`` reproduces it (the method's default, whose
plan moves the contextual tokens behind the dominant ones), ``order="layout"`` keeps every token in
its place (the method's ``order=layout``). Across the two orders the in-LLM stages differ (the shipped
model, every sample alike: Jaccard 0.75 / 0.68 / 0.73 at layers 1 / 2 / 3 at budget 0.22,
0.76 / 0.69 / 0.65 at 0.5; tiny LLaVA 0.33 and 0.43), so each test below fails if the method's
order is not the one it claims.
Layers placed by ``scaled_layer`` (8/16/24 of 32 -> 1/2/3 on the shipped 4-layer decoder); the budget
scales the counts (0.22 of 144 = 32 tokens: the code's own numbers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, causal_mask, eager_forward, eager_model, eager_tower, facts,
                                         jaccard, labels, language_model, visual_positions)
from tests.pruning.parity.test_visiondrop import official_tower_stage
from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.visiondrop import VisionDrop
from workbench.pruning.plan import PRE_LLM, Append, Merge, cls_token
from workbench.pruning.run import run_method

BUDGETS = (0.22, 0.5)


@torch.no_grad()
def rank_drop(lm, index, states, positions, image_rows, dominant_num, contextual_num):
    """One ``visiondrop_rank_drop`` on the image rows ``image_rows`` (a contiguous block, sequence
    order): (dominant row offsets, target row offsets, {target offset: source offsets}, merged image
    block [dominant..., contextual...])."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = lm.layers[index]
    attn = layer.self_attn
    hidden_states = layer.input_layernorm(states)                                        # line 1339
    length, head_dim = hidden_states.shape[1], attn.head_dim
    query_states = attn.q_proj(hidden_states).view(1, length, -1, head_dim).transpose(1, 2)
    key_states = attn.k_proj(hidden_states).view(1, length, -1, head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(hidden_states, positions)
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)  # line 1355
    image = torch.as_tensor(image_rows)
    cur_key_states = key_states[0]                                                       # [KV heads, S, d]
    repeated = cur_key_states.repeat_interleave(query_states.shape[1] // cur_key_states.shape[0], dim=0)
    attn_weights = query_states[0][:, image] @ repeated.transpose(1, 2) / math.sqrt(head_dim)  # line 1415
    attn_weights = torch.softmax(attn_weights + causal_mask(length)[0][:, image], dim=-1, dtype=torch.float32)
    attention_avg_image = attn_weights.mean(0)[:, image].mean(0)                         # lines 1419-1421
    metric = cur_key_states.mean(0)[image]                                               # line 1424
    vision_tokens = states[0][image]
    topk_indices = attention_avg_image.topk(dominant_num).indices                        # line 1428
    mask = torch.ones(len(image), dtype=torch.bool)
    mask[topk_indices] = False
    dominant = torch.arange(len(image))[~mask]                                           # sequence order
    filtered = torch.arange(len(image))[mask]
    metric_normalized = metric[mask] / metric[mask].norm(dim=-1, keepdim=True)           # line 1440
    # line 1443; ``contextual_num == 0`` (a scaled-down schedule) divides by zero in the code: no targets
    step = max(1, metric_normalized.shape[0] // max(contextual_num, 1))
    target_indices = torch.arange(0, metric_normalized.shape[0], step)[:contextual_num]
    others = ~torch.isin(torch.arange(metric_normalized.shape[0]), target_indices)
    similarity = metric_normalized[others] @ metric_normalized[target_indices].T              # line 1450
    assigned = similarity.argmax(dim=1) if len(target_indices) else torch.zeros(0, dtype=torch.long)
    hidden_filtered = vision_tokens[mask]
    contextual_tokens = hidden_filtered[target_indices].clone()
    for j in range(len(target_indices)):                                                  # lines 1452-1455
        if (assigned == j).any():
            contextual_tokens[j] += hidden_filtered[others][assigned == j].mean(0)
    merges = {int(filtered[t]): [int(s) for s in filtered[others][assigned == j]]
              for j, t in enumerate(target_indices)}
    block = torch.cat([vision_tokens[dominant], contextual_tokens])                       # line 1458
    return dominant.numpy(), filtered[target_indices].numpy(), merges, block


@torch.no_grad()
def official_visiondrop(adapter, prepared, budget, order="code"):
    """{where: (kept, {target: sorted sources})} of the official pipeline: the tower stage, then every
    LLM stage on the hand-run eager decoder."""
    f = facts(adapter)
    method = VisionDrop()
    schedule = method.schedule(SelectionContext(prepared.layout, budget, None, f))
    (where, dominant, contextual), llm_stages = schedule[0], schedule[1:]
    tower_layer = f.projector_feed_tower_layer
    kept, merges, features = official_tower_stage(adapter, prepared, dominant + 1, contextual, tower_layer,
                                                  f.vision_heads)
    # the tower stage's output order: dominant patches (sequence order), then contextual (clip_encoder.py line 88)
    cls_row = eager_tower(adapter, prepared).attentions[tower_layer][0, :, 0, 1:].double().sum(0)
    dominant_set = set(cls_row.topk(dominant).indices.tolist())
    n = prepared.layout.n_tokens
    cls = [cls_token(n)]  # the block starts with the [CLS] (clip_encoder.py line 58)
    ordered = cls + ([i for i in kept if i in dominant_set] + [i for i in kept if i not in dominant_set]
                     if order == "code" else list(kept))
    stages = {where: (tuple(int(i) for i in kept), merges)}
    model = eager_model(adapter)
    projector = model.model.multi_modal_projector
    states = eager_forward(adapter, prepared).hidden_states[0].clone()
    image_positions = visual_positions(prepared)
    start = int(image_positions[0])
    assert np.array_equal(image_positions, np.arange(start, start + len(image_positions)))  # one image block
    block = projector(torch.stack([features[i] for i in ordered]).float()).to(states.dtype)
    states = torch.cat([states[:, :start], block[None], states[:, start + len(image_positions):]], dim=1)
    ids = np.asarray(ordered)  # original visual index of each image row, in sequence order
    positions = torch.arange(states.shape[1]).unsqueeze(0)
    lm = language_model(model)
    at = {w: (d, c) for w, d, c in llm_stages}
    for i, layer in enumerate(lm.layers):
        if i in at:
            d, c = at[i]
            rows = np.arange(start, start + len(ids))
            dominant_rows, targets, row_merges, block = rank_drop(lm, i, states, positions, rows, d, c)
            stages[i] = (tuple(sorted(int(ids[r]) for r in np.concatenate([dominant_rows, targets]))),
                         {int(ids[t]): sorted(int(ids[s]) for s in src) for t, src in row_merges.items() if src})
            new_ids = np.concatenate([ids[dominant_rows], ids[targets]])
            if order != "code":  # the layout order: rows back in original-index order (the [CLS] first)
                rank = np.argsort(np.where(new_ids >= n, -1, new_ids), kind="stable")
                block, new_ids = block[torch.as_tensor(rank)], new_ids[rank]
            states = torch.cat([states[:, :start], block[None], states[:, start + len(ids):]], dim=1)
            ids = new_ids
            positions = torch.arange(states.shape[1]).unsqueeze(0)                   # lines 1497-1498
        out = layer(states, attention_mask=causal_mask(states.shape[1]), position_ids=positions,
                    position_embeddings=lm.rotary_emb(states, positions))
        states = out[0] if isinstance(out, tuple) else out
    return stages


def workbench_visiondrop(method, adapter, prepared, budget):
    """{where: (kept, {target: sorted sources})} of every executed stage, merges made in place or by
    moving the target (``Append``), and the executed plan."""
    plan = run_method(adapter, prepared, method, budget, max_new_tokens=1).plan
    made = {s.where: list(s.merges) + [a for a in s.appends if a.sources] for s in plan.stages}
    return {s.where: (s.kept, {m.target if isinstance(m, Merge) else m.token: sorted(m.sources) for m in made[s.where]})
            for s in plan.stages}, plan


def check_equal(reference, stages, label, budget):
    assert stages.keys() == reference.keys()
    for where, (kept, merges) in reference.items():
        assert jaccard(stages[where][0], kept) == 1.0, (label, budget, where)
        assert stages[where][1] == merges, (label, budget, where)


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_llm_stages_equal_the_official_rule(label):
    adapter, prepared = case(label)
    for budget in BUDGETS:
        reference = official_visiondrop(adapter, prepared, budget, order="code")
        stages, plan = workbench_visiondrop(VisionDrop(), adapter, prepared, budget)
        # the tower's output order: a pre_llm stage keeps the tower's tokens and moves its targets
        tower, reorder = plan.stages[:2]
        cls = cls_token(prepared.layout.n_tokens)
        assert reorder.where == PRE_LLM and reorder.kept == tower.kept + (cls,) and not reorder.merges
        entering, *moved = reorder.appends
        assert entering == Append(cls, (), (1.0,), before=tower.kept[0])  # the [CLS] first
        moved = [a.token for a in moved]
        assert moved == sorted(moved) and {m.target for m in tower.merges} <= set(moved)
        assert all(not a.sources and a.after is None and a.before is None for a in reorder.appends[1:])
        check_equal(reference, {w: v for w, v in stages.items() if w != PRE_LLM}, label, budget)


@pytest.mark.parametrize("label", labels(("llava",)))
def test_layout_order_variant_is_the_rule_with_tokens_in_place(label):
    adapter, prepared = case(label)
    for budget in BUDGETS:
        reference = official_visiondrop(adapter, prepared, budget, order="layout")
        stages, plan = workbench_visiondrop(VisionDrop(order="layout"), adapter, prepared, budget)
        cls = cls_token(prepared.layout.n_tokens)
        assert [a for s in plan.stages for a in s.appends] == [Append(cls, (), (1.0,), before=plan.stages[0].kept[0])]
        check_equal(reference, {w: v for w, v in stages.items() if w != PRE_LLM}, label, budget)
