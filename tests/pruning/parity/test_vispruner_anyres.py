"""VisPruner parity on multi-crop (AnyRes) layouts: the official code's LLM visual sequence against what
the workbench gives the LLM, on the tiny LLaVA-NeXT at three image shapes.

Official code: Theia-4869/VisPruner (HEAD), llava/model/llava_arch.py
- lines 141-185 (``encode_images``), on the concatenated views (line 201, the base image then the
  crops): per view the head-mean [CLS] row of ``attentions[-2]`` and the patch features of
  ``hidden_states[-2]`` (clip_encoder.py lines 36-43), ``int(T * 0.5)`` important tokens by
  ``argsort(descending=True)``, the rest de-duplicated in rounds of ``min(8, R - T_div)`` (lines
  159-176; A of ``ceil(R / 2)`` as in test_vispruner.py), the same T for every view; line 185: the
  features of every patch go through ``mm_projector``;
- line 207: ``mm_patch_merge_type.replace('_unpad', '')``, so the ``spatial`` branch without unpadding
  runs: lines 222-224 view the crops as ``(num_patch_height, num_patch_width, H, W)``, lines 246-250
  ``permute(0, 2, 1, 3, 4).flatten(0, 3)`` them into raster order of the padded stitched grid and keep
  the chosen ones (padding patches included, no ``image_newline``); lines 251-252 put the base view's
  chosen patches (its raster order) first. The sequence is renumbered from 0 (lines 280-330: the
  features are concatenated with the text embeddings).
T = round(P x n_keep / N), the budget's ratio of a view (as the code's README states its counts).
The reference's patches are placed on the layout by the code's own geometry (``anyres.stitching``), not
by the layout's tower map; a patch unpadding would remove is named ``padded_patch``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.pruning.parity.anyres import (SIZES, assert_budget_variant_keeps_the_budget, assert_per_view_parity,
                                         llava_next_case, stitching, to_layout, token_of)
from tests.pruning.parity.common import eager_model, eager_tower, facts, jaccard, n_keep, workbench_plan
from tests.pruning.parity.test_vispruner import official_view
from tests.pruning.shipped import run_checked
from workbench.overlay import kept_overlay
from workbench.pruning.executor import Job, execute, execute_batch
from workbench.pruning.flops import DecoderShape, prefill_flops
from workbench.pruning.methods.vispruner import VisPruner
from workbench.pruning.plan import KeepPlan, boxed, padded_patch

BUDGETS = (0.125, 0.25, 0.5)
WIDE, TALL = SIZES[0], SIZES[1]  # padded rows on the stitched grid (the square one has none)
COLUMNS = (60, 100)  # padded columns: padding patches on both sides of every row of the stitched grid
SHAPES = SIZES + (COLUMNS,)


def official_selection(adapter, prepared, visual_token_num: int) -> dict[int, np.ndarray]:
    """{view: chosen patches} of ``encode_images`` on the concatenated views (view 0 the base image)."""
    layer = facts(adapter).projector_feed_tower_layer
    out = eager_tower(adapter, prepared, prepared.inputs["pixel_values"].flatten(0, 1))
    features = out.hidden_states[layer + 1][:, 1:].double()                      # hidden_states[-2], patches
    attentions = out.attentions[layer][:, :, 0, 1:].double().mean(1)             # [:, :, 0, 1:], head mean
    return {v: official_view(features[v], attentions[v], visual_token_num) for v in range(len(features))}


def official_llm_sequence(adapter, prepared, visual_token_num: int) -> list[tuple[int, int]]:
    """The (view, patch) of every visual row the code's LLM gets, in its order (lines 207-252)."""
    kept = official_selection(adapter, prepared, visual_token_num)
    grid = stitching(adapter, prepared, _patches(adapter, prepared))
    views, side = len(kept), grid.side
    masks = torch.zeros(views, side * side, dtype=torch.bool)                    # index_masks
    for view, chosen in kept.items():
        masks[view, torch.as_tensor(chosen, dtype=torch.long)] = True
    names = torch.arange(views * side * side).view(views, side * side)           # (view, patch) as one id
    base = names[0][masks[0]]                                                    # line 251: raster order
    crops = names[1:].view(grid.nph, grid.npw, side, side).permute(0, 2, 1, 3).flatten(0, 3)   # lines 224, 246-249
    crops = crops[masks[1:].view(grid.nph, grid.npw, side, side).permute(0, 2, 1, 3).flatten(0, 3)]
    return [divmod(int(i), side * side) for i in torch.cat([base, crops])]       # line 252: base first


def _patches(adapter, prepared) -> int:
    """P, the patches of one view (the tower's tokens less its [CLS])."""
    return eager_tower(adapter, prepared, prepared.inputs["pixel_values"].flatten(0, 1)).hidden_states[0].shape[1] - 1


def workbench_names(adapter, prepared, sequence) -> list[int]:
    """The plan's name of each (view, patch): the layout token the code's geometry puts it on, else its
    ``padded_patch`` name."""
    grid = stitching(adapter, prepared, grid_patches := _patches(adapter, prepared))
    locate = token_of(prepared, grid)
    sizes = [grid_patches] * prepared.inputs["pixel_values"].shape[1]
    names = []
    for view, patch in sequence:
        token = locate(view, patch)
        names.append(padded_patch(prepared.layout.n_tokens, sizes, view, patch) if token is None else token)
    return names


@torch.no_grad()
def projected(adapter, prepared, sequence) -> torch.Tensor:
    """[len, D]: each (view, patch)'s feature at ``hidden_states[-2]`` through the projector (line 185)."""
    layer = facts(adapter).projector_feed_layer                                  # index into hidden_states
    states = eager_tower(adapter, prepared, prepared.inputs["pixel_values"].flatten(0, 1)).hidden_states[layer]
    rows = torch.stack([states[view, 1 + patch] for view, patch in sequence])
    return eager_model(adapter).model.multi_modal_projector(rows.float())


def image_span(adapter, prepared) -> tuple[int, int]:
    """First and last sequence index of the image placeholders (patches and newlines)."""
    image = (prepared.inputs["input_ids"][0] == adapter.model.config.image_token_id).nonzero().flatten()
    return int(image.min()), int(image.max())


def codes_embeddings(adapter, prepared, sequence) -> torch.Tensor:
    """[1, L', D]: the text embeddings with the code's visual rows in place of the image span."""
    embeds = adapter.llm_inputs(prepared.inputs).inputs_embeds[0]
    start, end = image_span(adapter, prepared)
    return torch.cat([embeds[:start], projected(adapter, prepared, sequence), embeds[end + 1:]])[None]


def decoder_input(adapter, run):
    """(result of ``run()``, the embeddings and position ids the decoder stack got in the prefill)."""
    seen = []
    hook = adapter.language_model().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs.get("inputs_embeds"), kwargs.get("position_ids"))),
        with_kwargs=True)
    try:
        out = run()
    finally:
        hook.remove()
    return (out, *[s for s in seen if s[0] is not None and s[0].shape[1] > 1][-1])


def per_view_count(prepared, budget) -> int:
    return round(len(prepared.layout.tower_owner[0]) * n_keep(prepared, budget) / prepared.layout.n_tokens)


# --- the default: the code's sequence --------------------------------------------------------------

def assert_llm_gets_the_codes_sequence(method, size, official_sequence, budgets) -> None:
    """At every budget, ``method``'s kept set is the names of ``official_sequence(adapter, prepared,
    count per view)`` and the decoder gets exactly the code's rows: no newline, every chosen padding
    patch, in the code's order, numbered from 0; the padded shapes pass padding patches on."""
    adapter, prepared = llava_next_case(size)
    n, padded = prepared.layout.n_tokens, 0
    for budget in budgets:
        sequence = official_sequence(adapter, prepared, per_view_count(prepared, budget))
        names = workbench_names(adapter, prepared, sequence)
        plan = workbench_plan(method, adapter, prepared, budget)
        (stage,) = plan.stages
        assert len(stage.kept) == len(names) and jaccard(stage.kept, names) == 1.0, (size, budget)
        assert stage.separators == "dropped" and stage.position == "reindex"
        padded += sum(name >= n for name in names)
        _, embeds, positions = decoder_input(adapter, lambda: execute(adapter, prepared, plan, max_new_tokens=0))
        expected = codes_embeddings(adapter, prepared, sequence)
        assert embeds.shape == expected.shape
        torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(positions[0], torch.arange(expected.shape[1]))
    assert (padded > 0) == (size != SIZES[2])


@pytest.mark.parametrize("size", SHAPES)
def test_default_gives_the_llm_the_codes_visual_sequence(size):
    assert_llm_gets_the_codes_sequence(VisPruner(), size, official_llm_sequence, BUDGETS)


@pytest.mark.parametrize("size", [WIDE, TALL, COLUMNS])
def test_pruned_logits_equal_the_model_on_the_codes_sequence(size):
    adapter, prepared = llava_next_case(size)
    budget, n = 0.5, prepared.layout.n_tokens
    sequence = official_llm_sequence(adapter, prepared, per_view_count(prepared, budget))
    execution, context = run_checked(adapter, prepared, VisPruner(), budget, max_new_tokens=0)
    sequence_embeds = codes_embeddings(adapter, prepared, sequence)
    with torch.no_grad():
        expected = adapter.model(inputs_embeds=sequence_embeds, logits_to_keep=1).logits[0, -1]
    torch.testing.assert_close(execution.logits, expected.float(), atol=1e-5, rtol=1e-5)
    # honest counts: the padding patches are tokens the LLM gets, in every count and in the FLOPs
    padding = sum(name >= n for name in execution.plan.final_kept)
    assert padding > 0
    depth = len(adapter.decoder_layers())
    assert VisPruner().kept_counts(context) == (len(sequence),)
    assert execution.visual_tokens_per_layer == (len(sequence),) * depth
    assert execution.tokens_per_layer == (sequence_embeds.shape[1],) * depth
    shape = DecoderShape.of(adapter.language_model().config)
    assert prefill_flops(shape, execution.tokens_per_layer) > prefill_flops(shape, [sequence_embeds.shape[1] - padding] * depth)


def test_a_batch_of_two_equals_one_sample_at_a_time():
    cases = [llava_next_case(size) for size in (WIDE, COLUMNS)]
    adapter = cases[0][0]
    jobs = [Job(prepared, workbench_plan(VisPruner(), adapter, prepared, budget))
            for (_, prepared), budget in zip(cases, (0.5, 0.25))]  # different lengths: one is left-padded
    assert all(any(k >= j.prepared.layout.n_tokens for k in j.plan.final_kept) for j in jobs)
    batched = execute_batch(adapter, jobs, max_new_tokens=3)
    assert len({b.tokens_per_layer for b in batched}) == 2
    for job, together in zip(jobs, batched):
        alone = execute(adapter, job.prepared, job.plan, max_new_tokens=3)
        torch.testing.assert_close(together.logits, alone.logits, atol=1e-5, rtol=1e-5)
        assert together.answer_ids == alone.answer_ids
        assert together.tokens_per_layer == alone.tokens_per_layer
        assert together.visual_tokens_per_layer == alone.visual_tokens_per_layer


def test_a_padding_patch_has_no_box_and_the_plan_round_trips():
    adapter, prepared = llava_next_case(WIDE)
    plan = workbench_plan(VisPruner(), adapter, prepared, 0.5)
    n, kept = prepared.layout.n_tokens, plan.final_kept
    on_image = [k for k in kept if k < n]
    assert list(boxed(kept, n)) == on_image and len(on_image) < len(kept)
    assert KeepPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    width, height = prepared.image_size
    image = Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8))
    assert np.array_equal(np.asarray(kept_overlay(image, prepared.layout, kept)),
                          np.asarray(kept_overlay(image, prepared.layout, on_image)))


# --- the named variants --------------------------------------------------------------------------

def official_vispruner_unpadded(adapter, prepared, visual_token_num: int):
    """The code's selection on the model's unpadded layout: chosen padding patches have no token."""
    kept = official_selection(adapter, prepared, visual_token_num)
    return to_layout(prepared, stitching(adapter, prepared, len(prepared.layout.tower_owner[0])), kept)


@pytest.mark.parametrize("size", SIZES)
def test_layout_sequence_keeps_the_models_arrangement(size):
    assert_per_view_parity(VisPruner(sequence="layout"), official_vispruner_unpadded, size, BUDGETS)
    adapter, prepared = llava_next_case(size)
    (stage,) = workbench_plan(VisPruner(sequence="layout"), adapter, prepared, 0.5).stages
    assert stage.separators == "kept" and not stage.appends


@pytest.mark.parametrize("size", SIZES)
def test_budget_variant_keeps_exactly_the_budget(size):
    assert_budget_variant_keeps_the_budget(VisPruner(crops="budget"), size, BUDGETS)


def test_an_unknown_sequence_is_one_clear_line():
    with pytest.raises(ValueError, match=r"vispruner: sequence must be one of \('code', 'layout'\), got 'x'"):
        VisPruner(sequence="x")
