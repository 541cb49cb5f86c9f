"""VisionZip parity on multi-crop (AnyRes) layouts: the official code's LLM visual sequence against what
the workbench gives the LLM, on the tiny LLaVA-NeXT at four image shapes.

Official code: dvlab-research/VisionZip (HEAD)
- visionzip/clip_encoder.py lines 42-83 on the concatenated views (llava_arch.py line 95, the base image
  then the crops), per view: [CLS] + ``topk(dominant_num)`` patches of the head-summed [CLS] row of
  ``attentions[-2]`` (lines 50-54, ``dominant_num = dominant - 1``, main.py line 7), in sequence order
  (line 57); the other patches, padding included, filtered in index order (lines 56-62), targets
  ``arange(0, R, max(1, R // C))[:C]`` (67-68), every other one joins the ``argmax`` cosine target
  of the head-mean keys (72-74); contextual token = target + mean of its assigned (75-80);
  ``cat([dominant, contextual])`` (83).
- visionzip/llava_arch.py lines 107-121: the base view's block as it is ([CLS, dominant, contextual]),
  then ``restore_image_features_sorted`` (lines 42-80) of the crops: their dominant patches scattered back
  onto the padded stitched grid (``view(height, width, 24, 24).permute(0, 2, 1, 3)``, lines 62-71, no
  unpadding, the newline built but unused, line 67), taken in raster order (75), then every crop's [CLS]
  (77), then every crop's contextual tokens, crop by crop (76); line 79 concatenates them. 24 is the
  side of a 336-px CLIP view; the tiny tower's views are 4 x 4 (the same code with its side).
- clip_encoder.py lines 75-83: a contextual token is target + mean(sources) of the feed layer's hidden
  states (``hidden_states[-2]``, every patch of the view, padding included), and llava_arch.py runs the
  projector on the whole block afterwards, so its row is projector(target + mean(sources)).
``merge_at="embedding"`` (the old behaviour) merges the projected rows instead: target + mean(sources) of
the projected patches, which the nonlinear projector makes different.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.anyres import SIZES, llava_next_case, stitching, token_of
from tests.pruning.parity.common import eager_model, eager_tower, facts, jaccard, n_keep, workbench_plan
from tests.pruning.reference import LayerIO
from tests.pruning.shipped import run_checked
from workbench.models.base import encoder_layers
from workbench.pruning.executor import Job, execute, execute_batch
from workbench.pruning.methods.visionzip import VisionZip
from workbench.pruning.plan import PRE_LLM, cls_token, padded_patch

BUDGETS = (0.25, 0.5, 0.75)
SHAPES = SIZES + ((60, 100),)  # padded rows (wide, tall), none (square), padded columns


def pixels(prepared) -> torch.Tensor:
    return prepared.inputs["pixel_values"].flatten(0, 1)  # [views, C, H, W], the code's concat_images


@torch.no_grad()
def view_keys(adapter, prepared, layer: int) -> torch.Tensor:
    """[views, 1 + P, H*d]: ``k_proj`` output of tower layer ``layer`` on every view (the code's metric source)."""
    tower = eager_model(adapter).model.vision_tower
    caught = {}
    handle = encoder_layers(tower)[layer].self_attn.k_proj.register_forward_hook(
        lambda m, a, out: caught.setdefault("k", out.detach().clone()))
    try:
        tower(pixels(prepared))
    finally:
        handle.remove()
    return caught["k"]


def official_sequence(adapter, prepared, dominant: int, contextual: int) -> list[tuple]:
    """The code's LLM visual sequence as items ("cls", v), ("patch", v, p) and ("ctx", v, target, sources)."""
    f = facts(adapter)
    layer = f.projector_feed_tower_layer
    attn = eager_tower(adapter, prepared, pixels(prepared)).attentions[layer].double()   # attentions[-2]
    views = attn.shape[0]
    dominant_num = dominant - 1                                                          # main.py line 7
    topk_indices = attn[:, :, 0, 1:].sum(dim=1).topk(dominant_num, dim=1).indices + 1   # lines 51-53
    all_indices = torch.cat([torch.zeros((views, 1), dtype=topk_indices.dtype), topk_indices], dim=1)
    keys = view_keys(adapter, prepared, layer).double()
    metric = keys.view(views, keys.shape[1], f.vision_heads, -1).transpose(1, 2).mean(1)  # utils.py
    mask = torch.ones(metric.shape[:2], dtype=torch.bool).scatter_(1, all_indices, False)  # line 56
    blocks = []
    for v in range(views):
        filtered = torch.arange(metric.shape[1])[mask[v]]                                # lines 60-62
        normalized = metric[v][mask[v]] / metric[v][mask[v]].norm(dim=-1, keepdim=True)  # line 64
        step = max(1, normalized.shape[0] // contextual)                                 # line 67
        target_indices = torch.arange(0, normalized.shape[0], step)[:contextual]         # line 68
        others = ~torch.isin(torch.arange(normalized.shape[0]), target_indices)
        assigned = (normalized[others] @ normalized[target_indices].T).argmax(dim=1)     # lines 72-74
        dominant_ids = torch.arange(metric.shape[1])[~mask[v]]                           # line 57: in order
        ctx = [("ctx", v, int(filtered[t]) - 1, tuple(int(s) - 1 for s in filtered[others][assigned == i]))
               for i, t in enumerate(target_indices)]
        blocks.append(([("cls", v) if i == 0 else ("patch", v, int(i) - 1) for i in dominant_ids], ctx))
    grid = stitching(adapter, prepared, metric.shape[1] - 1)
    side, crops = grid.side, views - 1
    restored = torch.zeros(crops, side * side, dtype=torch.bool)                          # lines 49-55
    for c in range(crops):
        restored[c, [item[2] for item in blocks[c + 1][0] if item[0] == "patch"]] = True
    ids = torch.arange(crops * side * side).view(grid.nph, grid.npw, side, side).permute(0, 2, 1, 3).flatten()
    raster = ids[restored.view(grid.nph, grid.npw, side, side).permute(0, 2, 1, 3).flatten()]  # lines 69-75
    sequence = blocks[0][0] + blocks[0][1]                                               # line 121: base first
    sequence += [("patch", 1 + int(i) // (side * side), int(i) % (side * side)) for i in raster]
    sequence += [("cls", v) for v in range(1, views)]                                    # line 77
    sequence += [item for v in range(1, views) for item in blocks[v][1]]                 # line 76
    return sequence


def names(adapter, prepared, sequence) -> list[int]:
    """The plan's name of each item: [CLS] -> ``cls_token``, a patch (a contextual token: its target) ->
    the layout token the code's geometry puts it on, else its ``padded_patch`` name."""
    layout = prepared.layout
    sizes = [len(o) for o in layout.tower_owner]
    locate = token_of(prepared, stitching(adapter, prepared, sizes[0]))
    out = []
    for item in sequence:
        if item[0] == "cls":
            out.append(cls_token(layout.n_tokens, item[1]))
            continue
        token = locate(item[1], item[2])
        out.append(padded_patch(layout.n_tokens, sizes, item[1], item[2]) if token is None else token)
    return out


@torch.no_grad()
def visual_rows(adapter, prepared, sequence, merged_in: str = "tower") -> torch.Tensor:
    """[len, D]: each item's row: the projected feed-layer feature of the [CLS] or patch; a contextual token
    as the code makes it (``merged_in="tower"``): projector(target + mean(sources)) of the feed layer's
    hidden states of its view (clip_encoder.py lines 75-80, then the projector); with "embedding", as
    target + mean(sources) of the projected patches."""
    states = eager_tower(adapter, prepared, pixels(prepared)).hidden_states[facts(adapter).projector_feed_layer]
    projector = eager_model(adapter).model.multi_modal_projector
    projected = projector(states.float())                                                # [views, 1 + P, D]
    space = {"tower": states.float(), "embedding": projected}[merged_in]
    rows = []
    for item in sequence:
        if item[0] == "cls":
            rows.append(projected[item[1], 0])
        elif item[0] == "patch":
            rows.append(projected[item[1], 1 + item[2]])
        else:
            _, v, target, sources = item
            merged = space[v, 1 + target] + (space[v, [1 + s for s in sources]].mean(0) if sources else 0)
            rows.append(projector(merged[None, None])[0, 0] if merged_in == "tower" else merged)
    return torch.stack(rows)


def codes_embeddings(adapter, prepared, sequence, merged_in: str = "tower") -> torch.Tensor:
    embeds = adapter.llm_inputs(prepared.inputs).inputs_embeds[0]
    image = (prepared.inputs["input_ids"][0] == adapter.model.config.image_token_id).nonzero().flatten()
    start, end = int(image.min()), int(image.max())
    return torch.cat([embeds[:start], visual_rows(adapter, prepared, sequence, merged_in), embeds[end + 1:]])[None]


def split_of(prepared, budget) -> tuple[int, int]:
    """The code's per-view (dominant, contextual): the method's split of the budget's ratio of a view."""
    layout = prepared.layout
    return VisionZip().split(round(len(layout.tower_owner[0]) * n_keep(prepared, budget) / layout.n_tokens))


@pytest.mark.parametrize("size", SHAPES)
def test_default_gives_the_llm_the_codes_visual_sequence(size):
    adapter, prepared = llava_next_case(size)
    n, padded = prepared.layout.n_tokens, 0
    for budget in BUDGETS:
        sequence = official_sequence(adapter, prepared, *split_of(prepared, budget))
        expected_names = names(adapter, prepared, sequence)
        plan = workbench_plan(VisionZip(), adapter, prepared, budget)
        assert plan.stages[0].where == PRE_LLM and plan.stages[0].separators == "dropped"
        final = plan.final_kept
        assert len(final) == len(expected_names) and jaccard(final, expected_names) == 1.0, (size, budget)
        padded += sum(k >= n + len(prepared.layout.tower_owner) for k in final)
        with LayerIO(adapter) as seen:
            execute(adapter, prepared, plan, max_new_tokens=0)
        expected = codes_embeddings(adapter, prepared, sequence)
        assert seen.inputs[0].shape == expected.shape  # the rows layer 0 computes: no newline, nothing else
        torch.testing.assert_close(seen.inputs[0], expected, atol=1e-4, rtol=1e-4)  # in the code's order
        # merge_at="embedding": the same sequence, its contextual rows merged after the projector
        old = workbench_plan(VisionZip(merge_at="embedding"), adapter, prepared, budget)
        assert old.final_kept == plan.final_kept
        with LayerIO(adapter) as seen:
            execute(adapter, prepared, old, max_new_tokens=0)
        torch.testing.assert_close(seen.inputs[0], codes_embeddings(adapter, prepared, sequence, "embedding"),
                                   atol=1e-4, rtol=1e-4)
        assert not torch.allclose(seen.inputs[0], expected, atol=1e-4, rtol=1e-4)
    assert (padded > 0) == (size != SIZES[2])


@pytest.mark.parametrize("size", [SIZES[0], SHAPES[-1]])
def test_pruned_logits_equal_the_model_on_the_codes_sequence(size):
    adapter, prepared = llava_next_case(size)
    sequence = official_sequence(adapter, prepared, *split_of(prepared, 0.5))
    execution, context = run_checked(adapter, prepared, VisionZip(), 0.5, max_new_tokens=0)
    embeds = codes_embeddings(adapter, prepared, sequence)
    with torch.no_grad():
        expected = adapter.model(inputs_embeds=embeds, logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(execution.logits, expected.float(), atol=1e-5, rtol=1e-5)
    depth = len(adapter.decoder_layers())
    assert execution.visual_tokens_per_layer == (len(sequence),) * depth
    assert execution.tokens_per_layer == (embeds.shape[1],) * depth  # the layer-0 stage's input is no layer's
    assert VisionZip().kept_counts(context)[-1] == len(sequence)


def test_a_batch_of_two_equals_one_sample_at_a_time():
    cases = [llava_next_case(size) for size in (SIZES[0], SHAPES[-1])]
    adapter = cases[0][0]
    jobs = [Job(prepared, workbench_plan(VisionZip(), adapter, prepared, budget))
            for (_, prepared), budget in zip(cases, (0.5, 0.25))]
    batched = execute_batch(adapter, jobs, max_new_tokens=3)
    assert len({b.tokens_per_layer for b in batched}) == 2  # different lengths: one is left-padded
    for job, together in zip(jobs, batched):
        alone = execute(adapter, job.prepared, job.plan, max_new_tokens=3)
        torch.testing.assert_close(together.logits, alone.logits, atol=1e-5, rtol=1e-5)
        assert together.answer_ids == alone.answer_ids
        assert together.visual_tokens_per_layer == alone.visual_tokens_per_layer


@pytest.mark.parametrize("size", SIZES)
def test_budget_variant_keeps_the_groups_shares(size):
    adapter, prepared = llava_next_case(size)
    (stage,) = workbench_plan(VisionZip(crops="budget"), adapter, prepared, 0.5).stages
    assert len(stage.kept) == n_keep(prepared, 0.5) and stage.separators == "kept"
    assert not [k for k in stage.kept if k >= prepared.layout.n_tokens + len(prepared.layout.tower_owner)]
    assert np.all(np.diff(stage.kept) > 0)


def test_a_composition_runs_on_the_codes_multi_crop_sequence():
    """VisionZip's stage before decoder layer 0 acts on the LLM's input like its pre-LLM stage: a
    composition takes both, then the second method's stages among the survivors."""
    from workbench.pruning.registry import create_method

    adapter, prepared = llava_next_case(SIZES[0])
    alone = workbench_plan(VisionZip(), adapter, prepared, 0.5)
    for params in ({}, {"visionzip.crops": "budget"}):
        execution, _ = run_checked(adapter, prepared, create_method("visionzip+pyramiddrop", **params), 0.5,
                                   max_new_tokens=0)
        stages = execution.plan.stages
        assert stages[0].where == PRE_LLM and any(s.in_llm and s.where > 0 for s in stages)
        if not params:
            assert [s.where for s in stages[:2]] == [PRE_LLM, 0] and stages[:2] == alone.stages[:2]
