"""VisionDrop parity, tower stage: the official dominant + contextual rule on the eager tower against the
workbench's default (``progression="tower"``): the kept patches, the merges, and the merged tower
features the LLM receives.

Official code: Ruixxxx/VisionDrop (HEAD)
- llava/visionzip/main.py line 8: ``apply_info(..., dominant_num=dominant-1, ...)``: the [CLS] takes
  one of the ``dominant`` slots; scripts/v1_5/visiondrop_eval/*.sh: ``--dominant 42 --contextual 6``.
- llava/visionzip/utils.py line 89 (``CLIPAttention_forward``): ``raw_key_states.mean(1)``, the keys
  averaged over heads; lines 122-123 (``apply_info``): ``r = [0]*22 + [1] + [0]``: the metric of
  ``layers[-2]``, the projector-feed layer (here the model's ``projector_feed_tower_layer``).
- llava/visionzip/clip_encoder.py lines 43-85 (``CLIPVisionTower_VisionZip.forward``): ``attentions[-2]``
  [CLS] row summed over heads, ``topk(dominant_num) + 1`` plus the [CLS] (51-55); the others filtered
  in sequence order (57-64); targets ``arange(0, R, max(1, R // C))[:C]`` (69-70); every other token
  joins the ``argmax`` of its cosine to the targets (73-76); contextual token = target hidden state +
  mean of its assigned hidden states (77-82), on ``hidden_states[-2]``, the tower features that then
  go through the projector (llava_arch.py lines 31-36).
  The block it returns is [CLS, dominant patches, contextual tokens] (``masked_select`` keeps sequence
  order, line 58; line 88 concatenates): the [CLS] output of ``hidden_states[-2]`` is the LLM's first
  visual token. The workbench passes it as the plan's reserved token ``cls_token(N)``, brought in by
  the ``pre_llm`` stage before the first patch; compared here: that stage, and the projected [CLS]
  row the LLM receives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, eager_model, eager_tower, facts, labels, n_keep, tower_key_states
from tests.pruning.reference import LayerIO
from workbench.pruning.methods.visiondrop import VisionDrop
from workbench.pruning.plan import PRE_LLM, Append, KeepPlan, cls_token
from workbench.pruning.run import run_method
from workbench.pruning.tower_stages import tower_inputs

BUDGETS = (0.22, 0.5)


@torch.no_grad()
def official_tower_stage(adapter, prepared, dominant: int, contextual: int, layer: int, heads: int):
    """(kept patch indices, {target: sources}, {token: feature}) of the official tower stage; the
    [CLS] feature under the reserved index N (the patch count)."""
    out = eager_tower(adapter, prepared)
    attn = out.attentions[layer].double()                                      # attentions[-2]
    hidden_states = out.hidden_states[layer + 1].double()                      # hidden_states[-2]
    dominant_num = dominant - 1                                                 # main.py line 8
    cls_attention_sum = attn[:, :, 0, 1:].sum(dim=1)                            # lines 52-53
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1      # line 54
    all_indices = torch.cat([torch.zeros((1, 1), dtype=topk_indices.dtype), topk_indices], dim=1)  # 55
    keys = tower_key_states(adapter, prepared, layer).double()
    metric = keys.view(1, keys.shape[1], heads, -1).transpose(1, 2).mean(1)     # utils.py line 89
    mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool).scatter_(1, all_indices, False)  # 57
    dominant_ids = torch.arange(hidden_states.shape[1])[~mask[0]]              # masked_select: sequence order
    filtered = torch.arange(hidden_states.shape[1])[mask[0]]
    metric_filtered = metric[mask].view(1, -1, metric.shape[2])                 # line 62
    hidden_filtered = hidden_states[mask].view(1, -1, hidden_states.shape[2])  # line 64
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)  # line 66
    step = max(1, metric_normalized.shape[1] // contextual)                     # line 69
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]  # line 70
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)   # line 73
    similarity = torch.bmm(metric_normalized[:, others], metric_normalized[:, target_indices].transpose(1, 2))
    assign = torch.zeros(1, int(others.sum()), contextual, dtype=hidden_states.dtype)
    assign.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)              # lines 75-76
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)                       # line 77
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_filtered[:, others]) / counts  # lines 78-79
    contextual_tokens = hidden_filtered[:, target_indices] + aggregated        # lines 80-82
    targets, sources = filtered[target_indices] - 1, filtered[others] - 1
    assigned = similarity.argmax(dim=2)[0]
    merges = {int(t): sorted(int(s) for s in sources[assigned == i]) for i, t in enumerate(targets)}
    features = {int(i) - 1 if i > 0 else hidden_states.shape[1] - 1: hidden_states[0, i] for i in dominant_ids}
    features.update({int(t): contextual_tokens[0, j] for j, t in enumerate(targets)})
    kept = np.sort(np.concatenate([dominant_ids[1:].numpy() - 1, targets.numpy()]))
    return kept, {t: s for t, s in merges.items() if s}, features


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_tower_stage_equals_the_official_rule(label):
    adapter, prepared = case(label)
    f = facts(adapter)
    layer = f.projector_feed_tower_layer
    projector = eager_model(adapter).model.multi_modal_projector
    method = VisionDrop()
    for budget in BUDGETS:
        factor = n_keep(prepared, budget) / method.reference_budget
        dominant, contextual = round(method.dominant * factor), round(method.contextual * factor)
        kept, merges, features = official_tower_stage(adapter, prepared, dominant, contextual, layer, f.vision_heads)
        execution = run_method(adapter, prepared, method, budget, max_new_tokens=1)
        stage = execution.plan.stages[0]
        assert stage.where == f"tower:{layer}"
        assert len(stage.kept) == dominant - 1 + contextual  # the official patch count
        assert stage.kept == tuple(int(i) for i in kept), (label, budget)
        assert {m.target: sorted(m.sources) for m in stage.merges} == merges
        # the merges act on the tower features: the LLM gets the projected official tokens
        llm, _ = tower_inputs(adapter, prepared, KeepPlan("visiondrop", len(stage.kept), prepared.layout.n_tokens,
                                                          (stage,)))
        rows = torch.as_tensor(prepared.layout.positions[list(stage.kept)])
        expected = projector(torch.stack([features[i] for i in stage.kept]).float())
        torch.testing.assert_close(llm.inputs_embeds[0, rows], expected, atol=1e-4, rtol=1e-4)
        # the [CLS] enters first (before the first kept patch) and is one of the LLM's visual tokens
        n = prepared.layout.n_tokens
        entry = execution.plan.stages[1]
        assert entry.where == PRE_LLM and entry.kept == stage.kept + (cls_token(n),)
        assert entry.appends[0] == Append(cls_token(n), (), (1.0,), before=stage.kept[0])
        assert execution.visual_tokens_per_layer[0] == dominant + contextual  # the code's 42 + 6 at 32
        with LayerIO(adapter) as seen:
            run_method(adapter, prepared, method, budget, max_new_tokens=0)
        start = int(prepared.layout.positions[0])
        torch.testing.assert_close(seen.inputs[0][0, start], projector(features[cls_token(n)].float()),
                                   atol=1e-4, rtol=1e-4)
