"""Tower patches the layout has no token for (LLaVA-NeXT's unpadding drops the crops' padding), named
past the [CLS] names (``padded_patch``) and brought into the LLM by a pre-LLM ``Append``; and the crops'
padded stitched grid recovered from a layout's tower map (``padded_grid``).

What the LLM gets with them is checked against the official VisPruner code in
parity/test_vispruner_anyres.py; here: the names, the executor's refusals, and the grid against the
code's own geometry (``anyres.stitching``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.anyres import SIZES, llava_next_case, stitching
from tests.pruning.parity.common import eager_model, eager_tower
from tests.pruning.reference import LayerIO
from tests.pruning.shipped import tiny_input
from workbench.pruning.executor import execute
from workbench.pruning.padded_grid import padded_grid
from workbench.pruning.plan import PRE_LLM, Append, KeepPlan, PlanError, Stage, boxed, cls_token, padded_patch, padded_patch_at


def test_names_follow_the_cls_names_view_by_view():
    sizes = (4, 4, 4)
    assert padded_patch(10, sizes, 0, 0) == 13 == cls_token(10, 2) + 1
    assert padded_patch(10, sizes, 2, 3) == 10 + 3 + 8 + 3
    assert [padded_patch_at(i, 10, sizes) for i in (9, 12, 13, 24)] == [None, None, (0, 0), (2, 3)]
    assert list(boxed([1, 12, 24], 10)) == [1]
    with pytest.raises(PlanError, match="no patch 4 of tower view 1"):
        padded_patch(10, sizes, 1, 4)
    with pytest.raises(PlanError, match="past the last tower patch"):
        padded_patch_at(25, 10, sizes)


def padded_plan(prepared, view: int, patch: int, **place) -> KeepPlan:
    layout = prepared.layout
    token = padded_patch(layout.n_tokens, [len(o) for o in layout.tower_owner], view, patch)
    kept = tuple(range(0, layout.n_tokens, 4))
    stage = Stage(PRE_LLM, kept + (token,), appends=(Append(token, (), (1.0,), **place),), position="reindex")
    return KeepPlan("t", len(stage.kept), layout.n_tokens, (stage,))


def unpadded_away(prepared) -> tuple[int, int]:
    owner = prepared.layout.tower_owner
    view = next(v for v in range(1, len(owner)) if (owner[v] < 0).any())
    return view, int(np.flatnonzero(owner[view] < 0)[0])


@torch.no_grad()
def test_a_padded_patch_enters_as_its_projected_tower_feature():
    adapter, prepared = llava_next_case(SIZES[0])
    view, patch = unpadded_away(prepared)
    plan = padded_plan(prepared, view, patch, before=0)
    with LayerIO(adapter) as seen:
        execution = execute(adapter, prepared, plan, max_new_tokens=0)
    states = eager_tower(adapter, prepared, prepared.inputs["pixel_values"].flatten(0, 1)).hidden_states
    expected = eager_model(adapter).model.multi_modal_projector(states[adapter.projector_feed_layer][view, 1 + patch])
    start = int(prepared.layout.positions[0])
    torch.testing.assert_close(seen.inputs[0][0, start], expected, atol=1e-5, rtol=1e-5)
    assert execution.visual_tokens_per_layer[0] == len(plan.final_kept)


def test_a_patch_with_a_token_is_named_by_that_token():
    adapter, prepared = llava_next_case(SIZES[0])
    owner = prepared.layout.tower_owner
    view, patch = 1, int(np.flatnonzero(owner[1] >= 0)[0])
    with pytest.raises(PlanError, match=f"feeds visual token {int(owner[view][patch])}: a plan names it by that index"):
        execute(adapter, prepared, padded_plan(prepared, view, patch), max_new_tokens=0)


def test_a_layout_without_padding_patches_has_none_to_pass():
    adapter, prepared = tiny_input("llava")
    n = prepared.layout.n_tokens
    token = n + 1 + 3  # past the one view's [CLS]: no tower map entry names a padded patch here
    stage = Stage(PRE_LLM, (0, token), appends=(Append(token, (), (1.0,), before=0),))
    with pytest.raises(PlanError, match="feeds visual token 3"):
        execute(adapter, prepared, KeepPlan("t", 2, n, (stage,)), max_new_tokens=0)


@pytest.mark.parametrize("size", SIZES + ((60, 100), (100, 48)))
def test_the_padded_grid_is_the_codes_geometry(size):
    adapter, prepared = llava_next_case(size)
    grid = padded_grid(prepared.layout)
    code = stitching(adapter, prepared, len(prepared.layout.tower_owner[1]))
    assert (grid.tiles, grid.side, grid.top, grid.left, grid.rows, grid.cols) == \
        ((code.nph, code.npw), code.side, code.top, code.left, code.rows, code.cols)


def test_a_single_view_layout_has_no_padded_grid():
    _, prepared = tiny_input("llava")
    assert padded_grid(prepared.layout) is None


@torch.no_grad()
def test_the_tower_patches_are_what_the_model_feeds_its_own_tokens():
    # An unpadded patch's projected feature is the model's own embedding of the token it feeds: the padded
    # ones come from the same tensor, before the model's unpadding.
    adapter, prepared = llava_next_case(SIZES[1])
    patches, embeds = adapter.tower_patches(prepared), adapter.llm_inputs(prepared.inputs).inputs_embeds[0]
    layout = prepared.layout
    for view, owner in enumerate(layout.tower_owner):
        fed = np.flatnonzero(owner >= 0)
        torch.testing.assert_close(patches[view, fed], embeds[layout.positions[owner[fed]]], atol=1e-6, rtol=1e-6)
