"""HiRED on a non-square crop grid: the LLM gets the sequence of the code's transposed stitching.

Official code: hasanar1f/HiRED (HEAD), transformers/src/transformers/models/llava_next/modeling_llava_next.py,
``pack_HiRED_image_features`` (lines 782-860), called with ``image_newline=None`` (line 1011):
- line 127: ``get_anyres_image_grid_shape`` returns ``(height // patch_size, width // patch_size)``, the
  crop grid's (rows, cols);
- line 816: the packing unpacks that pair as ``num_patch_width, num_patch_height``;
- lines 821-826: the crops' features and masks ``view(num_patch_height, num_patch_width, h, w)``,
  ``permute`` to (tile row, h, tile col, w) and are flattened into one stitched grid;
- lines 827-828: ``unpad_image`` (lines 167-206, float division of the ``image_sizes`` tensor, (height,
  width)) cuts the stitched features and mask for the image's size;
- lines 849-853: the cut is flattened row-major and the mask selects from it; the base view's chosen
  patches (lines 808-810) go first.
The selection itself (which patches each view chooses) is ``official_hired_views`` of
``test_hired_anyres.py``. The reference below runs that packing on tensors of (view, patch) names, so it
gives the LLM's visual sequence, each entry the crop patch whose feature the code puts there. A crop
patch the model's own stitching unpads away has no layout token: it is compared as its ``padded_patch``
name, and its decoder row as that patch's projected tower feature.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.anyres import llava_next_case
from tests.pruning.parity.common import facts, jaccard, workbench_plan
from tests.pruning.parity.test_hired_anyres import BUDGETS, SQUARE_GRIDS, official_hired_views
from tests.pruning.parity.test_vispruner_anyres import codes_embeddings, decoder_input, workbench_names
from workbench.pruning.executor import execute
from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.cls_attention import HiRED
from workbench.pruning.padded_grid import padded_grid
from workbench.pruning.run import record_needs

# 1x2 crops (the model unpads nothing), 2x1 (nothing), 1x2 with two padded rows per crop; 2 crops divide P = 16
NON_SQUARE = ((56, 32), (32, 56), (60, 20))


def unpad_image(tensor: torch.Tensor, original_size: torch.Tensor) -> torch.Tensor:
    """The code's ``unpad_image`` on a 2-D mask (lines 182-206): ``original_size`` the (height, width)
    tensor, so the ratios are float32 tensor divisions, as there."""
    original_height, original_width = original_size
    current_height, current_width = tensor.shape
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[padding:current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, padding:current_width - padding]


def official_llm_sequence(adapter, prepared, token_budget_rate: float) -> list[tuple[int, int]]:
    """(view, patch) of every visual row the code gives the LLM, in order."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    chosen = official_hired_views(adapter, prepared, token_budget_rate)
    views, patches = len(prepared.layout.tower_owner), len(prepared.layout.tower_owner[0])
    side = int(round(patches ** 0.5))
    masks = torch.zeros(views, patches, dtype=torch.bool)
    for view, picked in chosen.items():
        masks[view, torch.as_tensor(np.asarray(picked, dtype=np.int64))] = True
    names = torch.arange(views * patches).view(views, patches)  # view * P + patch, the feature's name
    sequence = names[0][masks[0]].tolist()  # lines 808-810: the base view's chosen patches, in its order
    config = adapter.model.config
    image_size = prepared.inputs["image_sizes"][0]  # (height, width), as the code's image_sizes[image_idx]
    num_patch_width, num_patch_height = get_anyres_image_grid_shape(  # line 816: (rows, cols) read as (w, h)
        image_size.tolist(), config.image_grid_pinpoints, config.vision_config.image_size)
    crops, crop_masks = names[1:], masks[1:]
    crops = crops.view(num_patch_height, num_patch_width, side, side).permute(0, 2, 1, 3).flatten(0, 1).flatten(1, 2)
    crop_masks = crop_masks.view(num_patch_height, num_patch_width, side, side).permute(0, 2, 1, 3)
    crop_masks = crop_masks.flatten(0, 1).flatten(1, 2)
    crops, crop_masks = unpad_image(crops, image_size), unpad_image(crop_masks, image_size)  # lines 827-828
    sequence += crops.flatten()[crop_masks.flatten()].tolist()  # lines 849-853
    return [divmod(int(name), patches) for name in sequence]


@pytest.mark.parametrize("size", NON_SQUARE)
def test_default_gives_the_llm_the_codes_transposed_sequence(size):
    adapter, prepared = llava_next_case(size)
    grid = padded_grid(prepared.layout)
    assert grid.tiles[0] != grid.tiles[1]
    n, moved, padded = prepared.layout.n_tokens, 0, 0
    for budget in BUDGETS:
        sequence = official_llm_sequence(adapter, prepared, budget)
        assert len(set(sequence)) == len(sequence)  # every patch at most once
        names = workbench_names(adapter, prepared, sequence)
        plan = workbench_plan(HiRED(), adapter, prepared, budget)
        (stage,) = plan.stages
        assert len(stage.kept) == len(names) and jaccard(stage.kept, names) == 1.0, (size, budget)
        assert stage.separators == "dropped" and stage.position == "reindex"
        crop_names = [name for name, (view, _) in zip(names, sequence) if view > 0]
        moved += crop_names != sorted(crop_names)
        padded += sum(name >= n for name in names)
        _, embeds, positions = decoder_input(adapter, lambda: execute(adapter, prepared, plan, max_new_tokens=0))
        expected = codes_embeddings(adapter, prepared, sequence)
        assert embeds.shape == expected.shape, (size, budget)
        torch.testing.assert_close(embeds, expected, atol=1e-5, rtol=1e-5)  # row for row, in the code's order
        assert torch.equal(positions[0].cpu(), torch.arange(expected.shape[1]))
    # the code's order is not the layout's (the crops' tokens move), except at (60, 20), where the code's
    # cut holds padding patches only (crop 0's last row, then crop 1's first), which the model unpads
    assert (moved > 0) == (padded == 0) == (size != (60, 20))


@pytest.mark.parametrize("size", NON_SQUARE)
def test_kept_counts_report_the_codes_rows(size):
    adapter, prepared = llava_next_case(size)
    recording = record_needs(adapter, prepared, [HiRED()])
    for budget in BUDGETS:
        context = SelectionContext(prepared.layout, budget, recording, facts(adapter))
        assert HiRED().kept_counts(context) == (len(official_llm_sequence(adapter, prepared, budget)),)


@pytest.mark.parametrize("size", SQUARE_GRIDS)
def test_square_grids_are_the_same_under_either_stitching(size):
    adapter, prepared = llava_next_case(size)
    for budget in BUDGETS:
        code, model = (workbench_plan(HiRED(stitching=s), adapter, prepared, budget) for s in ("code", "model"))
        assert code.stages == model.stages
        names = workbench_names(adapter, prepared, official_llm_sequence(adapter, prepared, budget))
        assert list(code.stages[0].kept) == sorted(names) and not code.stages[0].appends


def test_model_stitching_differs_on_a_non_square_grid_and_bad_values_are_one_line():
    adapter, prepared = llava_next_case(NON_SQUARE[0])
    code, model = (workbench_plan(HiRED(stitching=s), adapter, prepared, 0.5) for s in ("code", "model"))
    assert set(code.stages[0].kept) != set(model.stages[0].kept) and not model.stages[0].appends
    with pytest.raises(ValueError, match="hired: stitching must be one of"):
        HiRED(stitching="rows")
