"""HiRED parity on multi-crop (AnyRes) layouts: the official LLaVA-NeXT rule against ``select`` on the
tiny LLaVA-NeXT at four image shapes (2x2 crops with padded rows, 2x2 with padded columns, 1x2, 2x1).

Official code: hasanar1f/HiRED (HEAD), transformers/src/transformers/models/llava_next/modeling_llava_next.py
- lines 966-967: ``vit_top_layer = 0``, ``vit_bottom_layer = 22`` (hooks on those encoder layers' q/k,
  softmax as the eager attention, lines 77-94); layer 22 is LLaVA's projector-feed layer
  (``attentions[-2]``), placed by the method on this tower's feed layer;
- line 989: tokens are dropped only when ``token_budget_rate < 1.0``;
- lines 518-559 (``HiRED_token_selection``): [CLS] rows ``[:, :, 0, -P:]`` summed over heads; ``total =
  int(V * P * rate)``; base ``min(int(total * alpha), P)`` by the bottom layer; crops ``min(total - base,
  (V - 1) * P)``, split by the base's top ``int(P * (1 - alpha))`` patches by the top layer;
- lines 490-516 (``HiRED_sub_img_budgets``): that mask ``reshape``d into (V - 1) contiguous chunks, one
  per crop, ``(count / sum * budget).int()`` in float32, clamped to P; each crop's top-k by the bottom
  layer (line 556);
- lines 782-828 (``pack_HiRED_image_features``): the crops' masks unpadded with their features, so a
  crop patch chosen in the padding is lost. (Its stitching reads the grid shape transposed, line 816,
  which changes nothing on a square crop grid; on a non-square one the default follows that and is
  tested in ``test_hired_transposed.py``; here the reference places patches by the model's own
  geometry, which ``stitching="model"`` follows on every grid.)
- line 1011: the forward packs the features with ``image_newline=None`` at every rate (the packing adds a
  newline only when given one, lines 830 and 854), and ``_merge_input_ids_with_image_features`` puts
  them in the image token's place with positions ``cumsum - 1`` (line 779): the LLM input is the text and
  the kept patches, no image-newline row, numbered 0..L'-1.
The tiny tower has two layers, so the top and bottom layers are both layer 0 here; the layers are
checked on the deeper shipped tower by ``test_cls_attention.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.anyres import assert_per_view_parity, llava_next_case, stitching, to_layout, view_attentions
from tests.pruning.handmade import stack_inputs, text_and_kept_rows
from tests.pruning.parity.common import facts, torch_topk, workbench_plan
from tests.pruning.shipped import tiny_input
from workbench.pruning.executor import Job, execute, execute_batch
from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.cls_attention import HiRED
from workbench.pruning.run import record_needs, run_method

HIRED_SIZES = ((90, 60), (60, 100), (56, 32), (32, 56))  # every crop count here divides P = 16, as the code needs
SQUARE_GRIDS = HIRED_SIZES[:2]  # 2x2 crops; the others are 1x2 and 2x1


def by_the_models_stitching(size) -> HiRED:
    """The method the model-geometry reference describes at ``size``: the default on a square crop
    grid (the code's transposed reading changes nothing there), ``stitching="model"`` otherwise."""
    return HiRED() if size in SQUARE_GRIDS else HiRED(stitching="model")
BUDGETS = (0.125, 0.22, 0.25, 0.3, 0.5, 1.0)


def official_hired_views(adapter, prepared, token_budget_rate: float, alpha: float = 0.5) -> dict[int, list[int]]:
    """The code's chosen patches of every view (view 0 the base image), before its packing."""
    f = facts(adapter)
    grid = stitching(adapter, prepared, prepared.layout.tower_owner[0].shape[0])
    if not token_budget_rate < 1.0:  # line 989: no token dropping, every mask all ones
        return {v: list(range(len(o))) for v, o in enumerate(prepared.layout.tower_owner)}
    top_attn = view_attentions(adapter, prepared, 0).sum(dim=1)  # [V, P], line 535
    bottom_attn = view_attentions(adapter, prepared, f.projector_feed_tower_layer).sum(dim=1)  # line 534
    num_patch, num_vision_tokens = bottom_attn.shape
    num_total_budget = int(num_patch * num_vision_tokens * token_budget_rate)  # line 538
    full_img_budget = min(int(num_total_budget * alpha), num_vision_tokens)  # line 539
    total_sub_img_budget = min(num_total_budget - full_img_budget, (num_patch - 1) * num_vision_tokens)
    kept = {0: torch_topk(bottom_attn[0], full_img_budget)}  # line 547
    if total_sub_img_budget > 0:
        spatial_distribution = torch.zeros(num_vision_tokens, dtype=torch.bool)
        spatial_distribution[torch.as_tensor(torch_topk(top_attn[0], int(num_vision_tokens * (1 - alpha))))] = True
        # lines 500-510: get_anyres_image_grid_shape returns (rows, cols) (line 127), named (width, height)
        num_patch_width, num_patch_height = grid.nph, grid.npw
        sum_img_mask = spatial_distribution.reshape(num_patch_height, num_patch_width, -1).sum(dim=-1).reshape(-1)
        budget_ratio = sum_img_mask / sum_img_mask.sum()  # line 513 (float32)
        sub_img_budgets = torch.clamp((budget_ratio * total_sub_img_budget).int(), max=num_vision_tokens)
        for i, num_topk_other in enumerate(sub_img_budgets.tolist()):
            kept[i + 1] = torch_topk(bottom_attn[i + 1], num_topk_other)  # line 556
    return kept


def official_hired_anyres(adapter, prepared, token_budget_rate: float, alpha: float = 0.5):
    """The code's chosen patches placed by the model's stitching (unpadded-away picks lost)."""
    grid = stitching(adapter, prepared, prepared.layout.tower_owner[0].shape[0])
    return to_layout(prepared, grid, official_hired_views(adapter, prepared, token_budget_rate, alpha))


def rate(prepared, budget):
    return budget  # the code's token_budget_rate: a fractional budget as given


@pytest.mark.parametrize("size", HIRED_SIZES)
def test_default_equals_the_official_llava_next_rule(size):
    adapter, _ = llava_next_case(size)
    f = facts(adapter)
    assert HiRED().cls_layers(f) == tuple(sorted({0, f.projector_feed_tower_layer}))
    assert_per_view_parity(by_the_models_stitching(size), official_hired_anyres, size, BUDGETS, argument=rate)


@pytest.mark.parametrize("size", HIRED_SIZES[:2])
def test_alpha_is_the_codes_alpha(size):
    for alpha in (0.25, 0.7):
        assert_per_view_parity(HiRED(alpha=alpha), lambda a, p, r: official_hired_anyres(a, p, r, alpha),
                               size, BUDGETS, argument=rate)


def test_kept_counts_report_the_survivors_of_unpadding():
    adapter, prepared = llava_next_case((90, 60))  # padded rows: some crop picks are lost
    recording = record_needs(adapter, prepared, [HiRED()])
    lost = 0
    for budget in BUDGETS:
        context = SelectionContext(prepared.layout, budget, recording, facts(adapter))
        official = official_hired_anyres(adapter, prepared, budget)
        assert HiRED().kept_counts(context) == (len(official),)
        lost += int(5 * 16 * budget) - len(official)  # 5 views of 16 patches
    assert lost > 0  # the shape does exercise the loss


def test_a_crop_count_that_does_not_divide_the_patches_uses_near_equal_chunks():
    # 3 crops of 16 patches: the code's reshape fails; patch j of the base counts for crop j * 3 // 16
    adapter, prepared = llava_next_case((48, 100))
    recording = record_needs(adapter, prepared, [HiRED()])
    context = SelectionContext(prepared.layout, 0.5, recording, facts(adapter))
    early = [np.zeros(16)] * 4
    early[0] = np.arange(16.0)  # the top 8 base patches are 8..15: chunks 1 (8, 9, 10) and 2 (11..15)
    # 32 patches: base 16, crops 16 split 3/8 and 5/8 -> 6 and 10, floored
    assert HiRED().view_counts(context, early) == [16, 0, 6, 10]


@pytest.mark.parametrize("size", HIRED_SIZES[:2])
def test_budget_variant_keeps_exactly_the_kept_count_by_group_shares(size):
    adapter, prepared = llava_next_case(size)
    for budget in BUDGETS:
        (stage,) = workbench_plan(HiRED(crops="budget"), adapter, prepared, budget).stages
        assert len(stage.kept) == int(prepared.layout.n_tokens * budget)


# --- the LLM input: text and kept patches, no image newline (line 1011) ----------------------------

def newline_of(adapter) -> torch.Tensor:
    """The model's learned image-newline embedding."""
    return next(p for name, p in adapter.model.named_parameters() if name.endswith("image_newline")).detach()


@pytest.mark.parametrize("size", HIRED_SIZES)
def test_the_llm_input_has_no_image_newline_rows(size):
    adapter, prepared = llava_next_case(size)
    layout = prepared.layout
    inputs = adapter.llm_inputs(prepared.inputs)
    newline = newline_of(adapter).to(inputs.inputs_embeds.dtype)
    assert len(layout.separators) > 0  # the model itself puts newlines there
    assert torch.equal(inputs.inputs_embeds[0, layout.separators], newline.expand(len(layout.separators), -1))
    recording = record_needs(adapter, prepared, [HiRED()])
    method = by_the_models_stitching(size)
    for budget in BUDGETS:
        execution, embeds, positions = stack_inputs(
            adapter, lambda: run_method(adapter, prepared, method, budget, recording=recording, max_new_tokens=0))
        rows = text_and_kept_rows(prepared, official_hired_anyres(adapter, prepared, budget))
        assert execution.plan.stages[0].separators == "dropped"
        assert not (embeds[0] == newline).all(-1).any(), (size, budget)
        assert torch.equal(embeds, inputs.inputs_embeds[:, rows]), (size, budget)
        assert torch.equal(positions.cpu(), torch.arange(len(rows))[None]), (size, budget)
        assert execution.tokens_per_layer == (len(rows),) * len(adapter.decoder_layers())

    # the named variant keeps the model's newlines where the model puts them
    kept, embeds, _ = stack_inputs(adapter, lambda: run_method(adapter, prepared, HiRED(separators="kept"), 0.25,
                                                                 recording=recording, max_new_tokens=0))
    assert (embeds[0] == newline).all(-1).sum() == len(layout.separators)
    assert kept.tokens_per_layer[0] == len(text_and_kept_rows(prepared, kept.final_kept)) + len(layout.separators)


@pytest.mark.parametrize("size", HIRED_SIZES[:2])
def test_the_pruned_logits_are_the_models_on_the_codes_llm_input(size):
    adapter, prepared = llava_next_case(size)
    inputs = adapter.llm_inputs(prepared.inputs)
    recording = record_needs(adapter, prepared, [HiRED()])
    for budget in (0.22, 1.0):
        execution = run_method(adapter, prepared, HiRED(), budget, recording=recording, max_new_tokens=0)
        rows = text_and_kept_rows(prepared, official_hired_anyres(adapter, prepared, budget))
        with torch.no_grad():  # by hand: text + kept patches, no newline, the model's own positions 0..L'-1
            expected = adapter.model(inputs_embeds=inputs.inputs_embeds[:, rows], logits_to_keep=1).logits[0, -1]
        torch.testing.assert_close(execution.logits, expected.float(), atol=1e-5, rtol=1e-5)
        kept = run_method(adapter, prepared, HiRED(separators="kept"), budget, recording=recording, max_new_tokens=0)
        assert not torch.allclose(kept.logits, execution.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sizes", (HIRED_SIZES[:2], HIRED_SIZES[2:]))  # 2x2 crops; 1x2 and 2x1 (moved crop tokens)
def test_a_batch_of_two_shapes_equals_each_alone(sizes):
    cases = [llava_next_case(size) for size in sizes]
    adapter = cases[0][0]
    prepared = [p for _, p in cases]
    assert prepared[0].layout.sequence_length != prepared[1].layout.sequence_length
    jobs = [Job(p, workbench_plan(HiRED(), adapter, p, budget), gold_answer="red")
            for p, budget in zip(prepared, (0.22, 0.5))]
    batched = execute_batch(adapter, jobs, 4)
    for job, together in zip(jobs, batched):
        one = execute(adapter, job.prepared, job.plan, 4, gold_answer=job.gold_answer)
        rows = text_and_kept_rows(job.prepared, job.plan.final_kept)
        assert together.tokens_per_layer == one.tokens_per_layer == (len(rows),) * len(adapter.decoder_layers())
        assert together.answer_ids == one.answer_ids
        torch.testing.assert_close(together.logits, one.logits, atol=1e-4, rtol=1e-4)
        assert together.gold_logprob == pytest.approx(one.gold_logprob, abs=1e-4)


def test_the_newlines_go_under_either_crop_rule_and_other_layouts_keep_their_separators():
    adapter, prepared = llava_next_case(HIRED_SIZES[0])
    assert workbench_plan(HiRED(crops="budget"), adapter, prepared, 0.25).stages[0].separators == "dropped"
    adapter, prepared = tiny_input("llava")  # one view: not the code's LLaVA-NeXT path
    assert workbench_plan(HiRED(), adapter, prepared, 0.25).stages[0].separators == "kept"
