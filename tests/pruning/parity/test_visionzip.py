"""VisionZip parity: the official dominant + contextual rule against ``VisionZip().select``.

Official code: dvlab-research/VisionZip (HEAD)
- visionzip/main.py line 7: ``dominant_num = dominant - 1`` ([CLS] fills one dominant slot).
- visionzip/clip_encoder.py lines 43-80 (CLIPVisionTower_VisionZip.forward): ``attentions[-2]`` [CLS]
  row summed over heads, ``topk(dominant_num) + 1`` plus [CLS] (lines 51-54); the rest filtered in
  index order (56-62); ``metric`` = layer -2's key states averaged over heads (utils.py line 89,
  ``raw_key_states.mean(1)``), L2-normalised (64); targets ``arange(0, R, max(1, R // C))[:C]``
  (67-68); every other token joins ``argmax`` of its cosine to the targets (72-74); contextual token
  = target + mean of its assigned tokens (75-80); ``cat([dominant, contextual])`` (83): the contextual
  tokens follow the dominant ones, in target order. ``dominant_tokens`` (58) is ``masked_select`` of
  ``hidden_states[-2]`` at ``all_indices``, in sequence order, so the [CLS] output (row 0) is the first
  token of the block the projector and the LLM receive (llava_arch.py ``encode_images_visionzip``).
Splits: README 54+10 / 108+20 / 162+30, i.e. the method's ``split`` (10/64 contextual).
The layer is the method's ``layer`` (the reference's -2, this tower's projector-feed layer).

The default (``merge_at="tower"``) merges where the code does, on ``hidden_states[-2]`` before the
projector (lines 75-83; llava_arch.py ``encode_images_visionzip`` then runs the projector on the block):
checked as a tower stage with the official merges and weights, a ``pre_llm`` stage that brings the
[CLS] in first and moves the contextual tokens behind the dominant ones in target order, and the
decoder's input rows for the visual block against the projector run on the official block made by
hand from the eager tower. ``merge_at="embedding"`` (merges of the projected embeddings at the LLM
input) is checked against the same selection.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, eager_model, eager_tower, facts, jaccard, labels, n_keep,
                                         tower_key_states, workbench_plan)
from tests.pruning.reference import LayerIO
from workbench.pruning.methods.visionzip import VisionZip
from workbench.pruning.plan import PRE_LLM, Append, cls_token, tower_where
from workbench.pruning.run import run_method

BUDGETS = (0.25, 0.5, 0.75)


@torch.no_grad()
def official_visionzip(adapter, prepared, dominant: int, contextual: int, layer: int, heads: int):
    """(kept patch indices, {target: sources}, the LLM's visual block, the block's tower features) in
    0-based patch indices; the block lists the tokens in the code's order, the [CLS] as "cls":
    [CLS, dominant..., contextual...]; the features [len(block), D] are the code's
    ``hidden_states_save`` (line 83): the feed layer's rows, each contextual token target + mean(sources)."""
    out = eager_tower(adapter, prepared)
    attn = out.attentions[layer].double()                                   # [1, H, P+1, P+1]
    hidden_states = out.hidden_states[layer + 1].double()                   # hidden_states[-2]
    dominant_num = dominant - 1                                             # main.py line 7
    cls_attention_sum = attn[:, :, 0, 1:].sum(dim=1)                        # lines 51-52
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1  # line 53
    all_indices = torch.cat([torch.zeros((1, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    keys = tower_key_states(adapter, prepared, layer).double()               # [1, P+1, H*d]
    metric = keys.view(1, keys.shape[1], heads, -1).transpose(1, 2).mean(1)  # utils.py: raw_key_states.mean(1)
    mask = torch.ones(metric.shape[:2], dtype=torch.bool).scatter_(1, all_indices, False)  # line 56
    dominant_tokens = hidden_states[:, ~mask[0]]                             # line 58: masked_select, in order
    filtered = torch.arange(metric.shape[1])[mask[0]]                        # token ids of the rest, in order
    metric_filtered = metric[mask].view(1, -1, metric.shape[2])              # line 60
    hidden_states_filtered = hidden_states[:, mask[0]]                       # line 62
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)  # line 64
    step = max(1, metric_normalized.shape[1] // contextual)                   # line 67
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual]  # line 68
    others = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    similarity = torch.bmm(metric_normalized[:, others], metric_normalized[:, target_indices].transpose(1, 2))
    assigned = similarity.argmax(dim=2)[0]                                    # line 74
    assign_one_hot = torch.zeros(1, int(others.sum()), contextual, dtype=hidden_states.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)     # line 75
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)            # line 76
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_states_filtered[:, others]) / counts
    contextual_tokens = hidden_states_filtered[:, target_indices] + aggregated_hidden  # lines 77-80
    targets = filtered[target_indices] - 1
    sources = filtered[others] - 1
    merges = {int(t): sorted(int(s) for s in sources[assigned == i]) for i, t in enumerate(targets)}
    kept = np.sort(np.concatenate([topk_indices[0].numpy() - 1, targets.numpy()]))
    dominant_ids = torch.arange(metric.shape[1])[~mask[0]]                   # line 58: sequence order, [CLS] first
    block = ["cls" if i == 0 else int(i) - 1 for i in dominant_ids] + [int(t) for t in targets]  # line 83
    features = torch.cat([dominant_tokens, contextual_tokens], dim=1)[0]    # line 83: hidden_states_save
    return kept, {t: s for t, s in merges.items() if s}, block, features


def reference_weights(sources) -> tuple[float, ...]:
    """target + mean(sources), lines 75-80 (a target nothing joined: itself)."""
    return (1.0,) + (1.0 / max(len(sources), 1),) * len(sources)


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_merges_in_the_tower_as_the_official_rule(label):
    adapter, prepared = case(label)
    method = VisionZip()
    f = facts(adapter)
    assert method.layer(f) == f.projector_feed_tower_layer  # attentions[-2] / hidden_states[-2]
    n = prepared.layout.n_tokens
    cls = cls_token(n)
    for budget in BUDGETS:
        dominant, contextual = method.split(n_keep(prepared, budget))
        tower, entry = workbench_plan(method, adapter, prepared, budget).stages
        kept, merges, block, _ = official_visionzip(adapter, prepared, dominant, contextual, method.layer(f),
                                                    f.vision_heads)
        # the tower stage after the feed layer keeps the code's patches and merges its hidden states
        # (lines 75-80, before the projector): every target with its assigned tokens, target + mean
        assert tower.where == tower_where(f.projector_feed_tower_layer) and tower.appends == ()
        assert tower.kept == tuple(int(i) for i in kept), (label, budget)
        assert {m.target: sorted(m.sources) for m in tower.merges} == merges
        for m in tower.merges:
            assert m.weights == pytest.approx(reference_weights(m.sources))
        # the LLM gets dominant + contextual tokens, the [CLS] among them (the code's count)
        assert entry.where == PRE_LLM and entry.merges == ()
        assert len(entry.kept) == dominant + contextual == len(block)
        assert jaccard(entry.kept, list(kept) + [cls]) == 1.0
        # the [CLS] is brought in first, before the first kept patch (line 58); the contextual tokens
        # (already merged in the tower) only move behind the dominant ones, in target order (line 83)
        entering, *moved = entry.appends
        assert entering == Append(cls, (), (1.0,), before=tower.kept[0])
        targets = block[dominant:]
        assert moved == [Append(t, (), (1.0,)) for t in targets] and targets == sorted(targets)
        # the LLM's visual block in the code's order, the [CLS] as the reserved token
        assert executed_block(entry, tower.kept) == [cls if t == "cls" else t for t in block]


@pytest.mark.parametrize("label", labels(("llava",)))
def test_the_decoder_gets_the_projected_official_block(label):
    # The code's block is made on the tower's hidden states and only then projected (llava_arch.py
    # ``encode_images_visionzip``: ``mm_projector`` on ``hidden_states_save``): the decoder's input rows
    # for the visual block are the projector on the official [CLS, dominant, target + mean(sources)].
    adapter, prepared = case(label)
    f = facts(adapter)
    projector = eager_model(adapter).model.multi_modal_projector
    start = int(prepared.layout.positions[0])
    for budget in BUDGETS:
        dominant, contextual = VisionZip().split(n_keep(prepared, budget))
        *_, features = official_visionzip(adapter, prepared, dominant, contextual, f.projector_feed_tower_layer,
                                          f.vision_heads)
        with LayerIO(adapter) as seen:
            run_method(adapter, prepared, VisionZip(), budget, max_new_tokens=0)
        expected = projector(features.float())
        torch.testing.assert_close(seen.inputs[0][0, start:start + len(expected)], expected, atol=1e-4, rtol=1e-4)
        # around the block, the text as the unpruned model embeds it (the image's other rows are gone)
        embeds = adapter.llm_inputs(prepared.inputs).inputs_embeds[0]
        end = int(prepared.layout.positions[-1]) + 1
        got = seen.inputs[0][0]
        assert got.shape[0] == embeds.shape[0] - prepared.layout.n_tokens + len(expected)
        torch.testing.assert_close(got[:start], embeds[:start])
        torch.testing.assert_close(got[start + len(expected):], embeds[end:])


@pytest.mark.parametrize("label", labels(("llava",)))
def test_embedding_merging_makes_the_same_block_after_the_projector(label):
    adapter, prepared = case(label)
    method = VisionZip(merge_at="embedding")
    f = facts(adapter)
    for budget in BUDGETS:
        dominant, contextual = method.split(n_keep(prepared, budget))
        (stage,) = workbench_plan(method, adapter, prepared, budget).stages
        kept, merges, block, _ = official_visionzip(adapter, prepared, dominant, contextual, method.layer(f),
                                                    f.vision_heads)
        n, cls = prepared.layout.n_tokens, cls_token(prepared.layout.n_tokens)
        assert len(stage.kept) == dominant + contextual == len(block)
        assert jaccard(stage.kept, list(kept) + [cls]) == 1.0, (label, budget)
        entering, *contextual_tokens = stage.appends
        assert entering == Append(cls, (), (1.0,), before=0)
        assert {a.token: sorted(a.sources) for a in contextual_tokens if a.sources} == merges
        for a in contextual_tokens:
            assert a.weights == pytest.approx(reference_weights(a.sources))
        targets = [a.token for a in contextual_tokens]
        assert len(targets) == contextual and targets == sorted(targets) and stage.merges == ()
        assert {a.after for a in contextual_tokens} == {n - 1}
        assert executed_block(stage, range(n)) == [cls if t == "cls" else t for t in block]


def executed_block(stage, alive) -> list[int]:
    """The visual tokens of ``stage``'s output in sequence order, as ``arrange`` places them, for the
    visual tokens ``alive`` before it."""
    from workbench.pruning.executor import arrange

    alive = np.asarray(alive, dtype=np.int64)
    arrangement = arrange(stage, alive)
    tokens = alive[arrangement.order.numpy()]
    for row, append in arrangement.appended:
        tokens[row] = append.token
    return [int(t) for t in tokens]
