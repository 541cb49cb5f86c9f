"""FlowCut parity: the official in-tower progression, run by hand on the eager tower, against the
workbench's default (``progression="tower"``), kept sets and the features the LLM receives.

Official code: TungChintao/FlowCut (HEAD)
- flowcut/main.py lines 36-39: ``target_tokens = target_num + 1`` for ``select_feature == 'patch'``
  (one slot for the [CLS], dropped at the end); line 299 of modeling_clip_flowcut.py:
  ``select_layer = len(layers) - 2``, LLaVA-1.5's projector-feed layer; here the feed layer of the
  model at hand (``projector_feed_tower_layer``).
- flowcut/modeling_clip_flowcut.py lines 22-37, 39-40, 67-69, 97 (``CLIPAttention_forward``): attention
  ``softmax(q * scale @ k^T)``; semantic ``softmax(v_cls @ v^T)`` per head, mean over heads; value
  metric = value states averaged over heads.
- lines 121-163 (``CLIPEncoderLayer_forward``): after the layer, while more than ``target`` tokens
  live: [CLS] row over the patches (head mean) -> ``compute_score``; cumulative ``0.5 old + 0.5 new``;
  at even ``rpl``: ``prune_num = adaptive_prune_ratio(cls_attention, rpl, target - 1)`` (or all at
  ``rpl == 0``), ``target_num = max(S - prune_num, target)``, top ``target_num - 1`` patches by the
  cumulative score, sorted, [CLS] first; later layers run on that shorter sequence.
- line 203 (``CLIPEncoder_forward``): ``remain_prune_layer = select_layer - idx - 1``.
- flowcut/utils_flowcut.py lines 20-27 (``compute_score``) and 30-42 (``adaptive_prune_ratio``).
- flowcut/clip_encoder.py + llava_arch.py lines 31-35: the kept patches' features of the feed layer go
  through the projector, in sequence order.

Models: the shipped model (3-layer tower fed from its last layer: one cut, after layer 1, that layer 2
runs on) and a tiny LLaVA with an 8-layer tower fed from layer -2 (as LLaVA-1.5) whose attention is
sharpened so the entropy-adaptive cuts after layers 1 and 3 drop patches before the final one. The
stock tiny LLaVA (2-layer tower fed from layer 0) is too shallow for the official count-down
(``rpl`` is negative at every layer), so it is not a parity case.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from tests.pruning.parity.common import eager_model, facts, labels, case, n_keep
from workbench.pruning.methods.flowcut import FlowCut
from workbench.pruning.run import run_method
from workbench.pruning.tower_stages import tower_inputs

BUDGETS = (0.25, 0.5)


@functools.lru_cache(maxsize=None)
def deep_tiny_llava():
    """(adapter, [prepared]) of the tiny LLaVA family with an 8-layer tower fed from hidden_states[-2],
    its query weights scaled so the [CLS] attention is far from flat (adaptive cuts drop patches)."""
    from tests.tiny_models import QUESTION, TINY_SPECS, noise_image
    from transformers import LlavaForConditionalGeneration
    from workbench.models.base import encoder_layers
    from workbench.models.registry import adapter_for

    model, processor = TINY_SPECS["llava"].build()
    config = copy.deepcopy(model.config)
    config.vision_config.num_hidden_layers = 8
    config.vision_feature_layer = -2
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in encoder_layers(model.model.vision_tower):
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    adapter = adapter_for(model, processor, name="tiny-llava-deep")
    return adapter, [adapter.prepare(noise_image(TINY_SPECS["llava"].image_size, seed=s), QUESTION) for s in (0, 1)]


def parity_case(label):
    if label.startswith("deep-"):
        adapter, prepared = deep_tiny_llava()
        return adapter, prepared[int(label.split("-")[1])]
    return case(label)


LABELS = labels() + ["deep-0", "deep-1"]


def adaptive_prune_ratio(attn, rpl, target_num):
    """utils_flowcut.py lines 30-42."""
    n = attn.shape[-1]
    prob = attn / attn.sum(dim=-1, keepdim=True)
    entropy = -torch.sum(prob * torch.log(prob), dim=-1)
    ratio = entropy / torch.log(torch.tensor(float(n), dtype=attn.dtype))
    r = (n - target_num) / rpl ** 0.5 * (1 - ratio ** 2)
    return int(r.round())


@torch.no_grad()
def official_flowcut(adapter, prepared, budget_count: int, select_layer: int):
    """(cuts {layer: kept patch indices}, features [K, D] of the kept patches at the feed layer)."""
    model = eager_model(adapter)
    tower = model.model.vision_tower
    vision = getattr(tower, "vision_model", tower)
    hidden = vision.pre_layrnorm(vision.embeddings(prepared.inputs["pixel_values"]))
    target = budget_count + 1                                                  # main.py line 39
    keep = torch.arange(hidden.shape[1])[None]
    cumulative, cuts, feature = None, {}, None
    for idx, layer in enumerate(vision.encoder.layers):
        rpl = select_layer - idx - 1                                           # line 203
        attn = layer.self_attn
        b, s, d = hidden.shape
        heads = attn.num_heads
        residual = hidden
        h = layer.layer_norm1(hidden)
        shape = lambda x: x.view(b, s, heads, -1).transpose(1, 2)              # noqa: E731
        q, k, v = shape(attn.q_proj(h) * attn.scale), shape(attn.k_proj(h)), shape(attn.v_proj(h))
        weights = torch.softmax(q @ k.transpose(-1, -2), dim=-1)               # lines 37, 67
        semantic = torch.softmax(v[:, :, :1] @ v.transpose(-1, -2), dim=-1).view(b, heads, s).mean(1)  # 39-40, 69, 97
        v_metric = v.mean(1)                                                   # lines 29, 97
        out = attn.out_proj((weights @ v).transpose(1, 2).reshape(b, s, d))
        hidden = residual + out
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        if hidden.shape[1] > target:                                           # line 138
            cls_attention = weights[:, :, 0, 1:].mean(dim=1)                   # line 140
            relation = cls_attention / cls_attention.sum(-1, keepdim=True)     # compute_score
            sem = semantic[:, 1:] / semantic[:, 1:].sum(-1, keepdim=True)
            scores = (relation + sem) * torch.norm(v_metric[:, 1:], p=1, dim=-1)
            cumulative = scores.clone() if cumulative is None else 0.5 * cumulative + 0.5 * scores
            if not rpl % 2:                                                    # lines 148-163
                prune_num = adaptive_prune_ratio(cls_attention, rpl, target - 1) if rpl else hidden.shape[1]
                target_num = max(hidden.shape[1] - prune_num, target)
                _, keep_indices = torch.topk(cumulative, target_num - 1, dim=1)
                keep_indices = keep_indices.sort(dim=1).values
                top = torch.gather(hidden[:, 1:], 1, keep_indices.unsqueeze(-1).expand(-1, -1, d))
                cumulative = torch.gather(cumulative, 1, keep_indices)
                keep = torch.cat([keep[:, :1], torch.gather(keep[:, 1:], 1, keep_indices)], dim=1)
                hidden = torch.cat([hidden[:, :1], top], dim=1)
                cuts[idx] = tuple(int(i) - 1 for i in keep[0, 1:])
        if idx == select_layer:
            feature = hidden[0, 1:]                                             # feature_select('patch')
    return cuts, feature


@pytest.mark.parametrize("label", LABELS)
def test_default_runs_the_official_progression_inside_the_tower(label):
    adapter, prepared = parity_case(label)
    f = facts(adapter)
    projector = eager_model(adapter).model.multi_modal_projector
    for budget in BUDGETS:
        count = n_keep(prepared, budget)
        cuts, feature = official_flowcut(adapter, prepared, count, f.projector_feed_tower_layer)
        execution = run_method(adapter, prepared, FlowCut(), budget, max_new_tokens=1)
        stages = execution.plan.stages
        # every cut that dropped patches, in order, the same patches (a cut that drops nothing is not recorded)
        official, alive = [], prepared.layout.n_tokens
        for layer, kept in sorted(cuts.items()):
            if len(kept) < alive:
                official.append((f"tower:{layer}", kept))
            alive = len(kept)
        assert [(s.where, s.kept) for s in stages] == official, (label, budget)
        assert len(execution.final_kept) == count
        # the LLM receives the official features of the kept patches (the tower ran on them alone)
        llm, replayed = tower_inputs(adapter, prepared, execution.plan)
        assert [s.kept for s in replayed] == [s.kept for s in stages]  # the recorded plan replays
        rows = torch.as_tensor(prepared.layout.positions[list(execution.final_kept)])
        torch.testing.assert_close(llm.inputs_embeds[0, rows], projector(feature), atol=1e-4, rtol=1e-4)


def test_the_deep_tower_cuts_adaptively_before_the_final_cut():
    adapter, prepared = parity_case("deep-0")
    execution = run_method(adapter, prepared, FlowCut(), 0.25, max_new_tokens=1)
    wheres = [s.where for s in execution.plan.stages]
    assert len(wheres) >= 2 and wheres[-1] == "tower:5", wheres  # rpl = 5 - idx: cuts after 1, 3, 5
    # The recording-based simulation stays available as a named deviation; once an adaptive cut has
    # dropped patches, later layers' scores on the pruned tower differ from the unpruned ones, and
    # here so does the kept set (the parity test above shows which one the official code keeps).
    simulated = FlowCut(progression="simulated")
    assert simulated.needs(facts(adapter)) and not FlowCut().needs(facts(adapter))
    inside = run_method(adapter, prepared, FlowCut(), 0.5, max_new_tokens=1).final_kept
    outside = run_method(adapter, prepared, simulated, 0.5, max_new_tokens=1).final_kept
    assert len(inside) == len(outside) and inside != outside
