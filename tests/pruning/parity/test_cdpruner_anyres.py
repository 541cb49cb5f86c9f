"""CDPruner parity on multi-crop (AnyRes) layouts: the official code's selection and LLM visual sequence
against what the workbench selects and gives the LLM, on the tiny LLaVA-NeXT at four image shapes.

Official code: Theia-4869/CDPruner (HEAD), llava/model/llava_arch.py
- lines 199-203: the views of an image (the base image, then the crops) are concatenated and go through
  ``encode_images`` together, one batch of B views;
- lines 141-187 (``encode_images``): ``mm_projector`` on every patch of every view (line 148; the tower's
  ``hidden_states[-2]`` patches, clip_encoder.py ``feature_select``), the crops' padding patches
  included; per view the cosine similarity of those features (lines 151-153); relevance
  ``(-cos).mean(-1)`` (lines 156-159), min-max normalised with ``relevance.min()`` / ``.max()`` over the
  whole [B, N] tensor, i.e. over every patch of every view at once (line 160); per view the kernel
  ``r S r`` (line 167) and the batched greedy MAP loop with the same ``visual_token_num`` T for every
  view (lines 170-181); the picks sorted into ``index_masks`` (lines 183-185);
- line 208: ``mm_patch_merge_type.replace('_unpad', '')``, so the ``spatial`` branch runs without
  unpadding: lines 226-227 view the crops as ``(num_patch_height, num_patch_width, H, W)``, lines 249-253
  ``permute(0, 2, 1, 3).flatten(0, 3)`` the crop masks into raster order of the padded stitched grid and
  keep the chosen features (padding patches included, no ``image_newline``); lines 254-255 put the base
  view's chosen patches first. The sequence is renumbered from 0 (the features are concatenated with
  the text embeddings).
T = round(P x n_keep / N), the budget's ratio of a view (its README: 32 x 5 = 160 tokens on LLaVA-NeXT).
The code embeds the instruction with CLIP's text tower; as the method's default stand-in (see
test_cdpruner.py), the reference takes the text after the image at the LLM input against the projected
patches. The reference's patches are placed by the code's own geometry (``anyres.stitching``), not by the
layout's tower map; a patch unpadding would remove is named ``padded_patch``.
"""

from __future__ import annotations

import pytest
import torch

from tests.pruning.parity.anyres import SIZES, assert_budget_variant_keeps_the_budget, llava_next_case, stitching
from tests.pruning.parity.common import eager_forward, eager_model, eager_tower, facts, jaccard, workbench_plan
from tests.pruning.parity.test_vispruner_anyres import (COLUMNS, assert_llm_gets_the_codes_sequence, per_view_count,
                                                        workbench_names)
from tests.pruning.shipped import run_checked
from workbench.pruning.methods.cdpruner import CDPruner

BUDGETS = (0.125, 0.25, 0.5)
SHAPES = SIZES + (COLUMNS,)


@torch.no_grad()
def projected_patches(adapter, prepared) -> torch.Tensor:
    """[B, N, D]: ``mm_projector`` of every view's ``hidden_states[-2]`` patches (line 148), padding included."""
    return eager_model(adapter).model.multi_modal_projector(feed_patches(adapter, prepared).float()).double()


@torch.no_grad()
def feed_patches(adapter, prepared) -> torch.Tensor:
    """[B, N, D_tower]: every view's ``hidden_states[-2]`` patches (clip_encoder.py ``feature_select``)."""
    pixels = prepared.inputs["pixel_values"]
    pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels                     # line 202: the views
    return eager_tower(adapter, prepared, pixels).hidden_states[facts(adapter).projector_feed_layer][:, 1:]


def official_index_masks(adapter, prepared, visual_token_num: int, image_embeds=None, text_embeds=None,
                         gains: list | None = None) -> torch.Tensor:
    """[B, N] ``index_masks`` of ``encode_images`` on the concatenated views (lines 141-187); relevance
    from CLIP's ``image_embeds`` [B, N, C] and ``text_embeds`` [M, C] when given, else the stand-in.
    ``gains``, when given, receives each step's [B] ``di2s`` at the picks."""
    image_features = projected_patches(adapter, prepared)
    B, N, _ = image_features.shape
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    similarity = image_normalized @ image_normalized.transpose(1, 2)                    # (B, N, N), line 153
    if image_embeds is None:                                                            # the instruction stand-in
        embeds = eager_forward(adapter, prepared).hidden_states[0][0].double()
        image_embeds, text_embeds = image_features, embeds[int(prepared.layout.positions.max()) + 1:]
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)               # lines 156-158
    relevance = image_embeds @ (text_embeds / text_embeds.norm(dim=-1, keepdim=True)).T  # (B, N, M)
    relevance = (-relevance).mean(dim=-1)                                               # (B, N), line 159
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())  # line 160: all views
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)               # line 167
    cis = torch.zeros((visual_token_num, B, N), dtype=kernel.dtype)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long)
    rows = torch.arange(B)
    for i in range(visual_token_num):                                                   # lines 173-181
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        if gains is not None:
            gains.append(di2s[rows, j].clone())
        eis = (kernel[rows, j] - torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])) / torch.sqrt(di2s[rows, j]).unsqueeze(-1)
        cis[i] = eis
        di2s -= torch.square(eis)
        di2s[rows, j] = -float("inf")
    index_masks = torch.zeros(B, N, dtype=torch.bool)
    index_masks.scatter_(1, torch.sort(select_idx.t()).values, True)                    # lines 183-185
    return index_masks


def official_llm_sequence(adapter, prepared, visual_token_num: int, masks=None) -> list[tuple[int, int]]:
    """The (view, patch) of every visual row the code's LLM gets, in its order (lines 202-255), for its
    ``index_masks`` (default: ``official_index_masks`` with the stand-in)."""
    masks = official_index_masks(adapter, prepared, visual_token_num) if masks is None else masks
    views, patches = masks.shape
    grid = stitching(adapter, prepared, patches)
    side = grid.side
    names = torch.arange(views * patches).view(views, patches)                          # (view, patch) as one id
    base = names[0][masks[0]]
    crops = names[1:].view(grid.nph, grid.npw, side, side).permute(0, 2, 1, 3).flatten(0, 3)   # lines 226, 249-253
    crops = crops[masks[1:].view(grid.nph, grid.npw, side, side).permute(0, 2, 1, 3).flatten(0, 3)]
    return [divmod(int(i), patches) for i in torch.cat([base, crops])]                   # lines 254-255: base first


@pytest.mark.parametrize("size", SHAPES)
def test_default_selects_and_gives_the_llm_the_codes_sequence(size):
    assert_llm_gets_the_codes_sequence(CDPruner(), size, official_llm_sequence, BUDGETS)


def test_every_view_keeps_the_same_count_and_the_counts_say_so():
    adapter, prepared = llava_next_case(SIZES[0])
    budget = 0.25
    count = per_view_count(prepared, budget)
    masks = official_index_masks(adapter, prepared, count)
    execution, context = run_checked(adapter, prepared, CDPruner(), budget, max_new_tokens=0)
    assert execution.plan.final_kept == workbench_plan(CDPruner(), adapter, prepared, budget).final_kept
    assert CDPruner().kept_counts(context) == (int(masks.sum()),) == (count * masks.shape[0],)
    assert execution.visual_tokens_per_layer == (count * masks.shape[0],) * len(adapter.decoder_layers())


@pytest.mark.parametrize("size", SIZES)
def test_budget_variant_keeps_exactly_the_budget_and_differs_from_the_code(size):
    assert_budget_variant_keeps_the_budget(CDPruner(crops="budget"), size, BUDGETS)
    adapter, prepared = llava_next_case(size)
    names = workbench_names(adapter, prepared, official_llm_sequence(adapter, prepared, per_view_count(prepared, 0.5)))
    (stage,) = workbench_plan(CDPruner(crops="budget"), adapter, prepared, 0.5).stages
    assert stage.separators == "kept" and not stage.appends
    assert jaccard(stage.kept, names) < 1.0


def test_an_unknown_crop_rule_is_one_clear_line():
    with pytest.raises(ValueError, match=r"cdpruner: crops must be one of \('reference', 'budget'\), got 'x'"):
        CDPruner(crops="x")

