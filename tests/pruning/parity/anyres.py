"""The LLaVA-NeXT (AnyRes) geometry the [CLS] methods' official codes share, for the multi-crop parity
tests: the views' [CLS] rows from the eager tower, and the code's stitching and unpadding of the crops
(``unpad_image`` in each code's llava_arch.py, the same function in FasterVLM, VisPruner and HoloV), to
place a view's patch on the layout's tokens by geometry, not by the layout's tower map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tests.pruning.parity.common import eager_tower, jaccard, n_keep, workbench_plan
from tests.tiny_models import QUESTION, noise_image, tiny_adapter

SIZES = ((90, 60), (48, 100), (100, 100))  # wide (padded rows), tall (padded columns), square


def llava_next_case(size):
    """(adapter, prepared) of the tiny LLaVA-NeXT on a noise image of ``size`` (width, height)."""
    adapter = tiny_adapter("llava_next")
    return adapter, adapter.prepare(noise_image(size), QUESTION)


def view_attentions(adapter, prepared, layer: int) -> torch.Tensor:
    """[views, heads, P] ``attentions[layer][:, :, 0, 1:]`` of every view (view 0 = the base image)."""
    pixels = prepared.inputs["pixel_values"].flatten(0, 1)
    return eager_tower(adapter, prepared, pixels).attentions[layer][:, :, 0, 1:].double()


@dataclass(frozen=True)
class Stitching:
    """The code's crop grid: ``nph`` x ``npw`` crops of ``side`` x ``side`` patches, stitched and
    unpadded to rows ``top..top+rows`` and columns ``left..left+cols``."""

    nph: int
    npw: int
    side: int
    top: int
    left: int
    rows: int
    cols: int

    def crop_cell(self, crop: int, patch: int) -> tuple[int, int] | None:
        """The unpadded stitched (row, col) of a crop's patch, None if unpadding removes it."""
        row = (crop // self.npw) * self.side + patch // self.side - self.top
        col = (crop % self.npw) * self.side + patch % self.side - self.left
        return (row, col) if 0 <= row < self.rows and 0 <= col < self.cols else None


def stitching(adapter, prepared, patches: int) -> Stitching:
    """The crop grid as transformers' LLaVA-NeXT computes it (``get_anyres_image_grid_shape``) and the
    code's ``unpad_image`` on the stitched [nph * side, npw * side] grid."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    config = adapter.model.config
    height_px, width_px = (int(v) for v in prepared.inputs["image_sizes"][0])
    nph, npw = get_anyres_image_grid_shape((height_px, width_px), config.image_grid_pinpoints,
                                           config.vision_config.image_size)
    side = int(round(patches ** 0.5))
    current_height, current_width = nph * side, npw * side
    top = left = 0
    rows, cols = current_height, current_width
    if width_px / height_px > current_width / current_height:      # unpad_image: padded rows
        top = (current_height - int(height_px * (current_width / width_px))) // 2
        rows = current_height - 2 * top
    else:                                                          # padded columns
        left = (current_width - int(width_px * (current_height / height_px))) // 2
        cols = current_width - 2 * left
    return Stitching(nph, npw, side, top, left, rows, cols)


def token_of(prepared, grid: Stitching):
    """``(view, patch) -> layout token or None``: view 0 is the base image (row-major), view c + 1 crop c."""
    layout = prepared.layout
    base = next(g for g, grp in enumerate(layout.groups) if grp.is_base_view)
    assert (layout.groups[1 - base].rows, layout.groups[1 - base].cols) == (grid.rows, grid.cols)
    where = {(int(layout.group[t]), int(layout.cell[t, 0]), int(layout.cell[t, 1])): t for t in range(layout.n_tokens)}

    def locate(view: int, patch: int):
        if view == 0:
            return where[(base, patch // grid.side, patch % grid.side)]
        cell = grid.crop_cell(view - 1, patch)
        return None if cell is None else where[(1 - base, *cell)]

    return locate


def to_layout(prepared, grid: Stitching, kept_per_view) -> np.ndarray:
    """Sorted layout tokens of ``{view: patches}``; patches unpadding removes are dropped."""
    locate = token_of(prepared, grid)
    tokens = [locate(v, int(p)) for v, patches in kept_per_view.items() for p in patches]
    return np.sort([t for t in tokens if t is not None])


def assert_per_view_parity(method, official, size, budgets, argument=None) -> None:
    """``method``'s kept set equals ``official(adapter, prepared, T)`` at every budget, with T the
    budget's share of one view's P patches, rounded (the codes' per-view count); ``argument(prepared,
    budget)``, when given, is what ``official`` takes instead of T (e.g. HiRED's budget rate)."""
    adapter, prepared = llava_next_case(size)
    patches = len(prepared.layout.tower_owner[0])
    for budget in budgets:
        given = (round(patches * n_keep(prepared, budget) / prepared.layout.n_tokens) if argument is None
                 else argument(prepared, budget))
        reference = official(adapter, prepared, given)
        (stage,) = workbench_plan(method, adapter, prepared, budget).stages
        assert len(stage.kept) == len(reference)
        assert jaccard(stage.kept, reference) == 1.0, (size, budget)


def assert_budget_variant_keeps_the_budget(method, size, budgets) -> None:
    """``crops="budget"`` (the per-group rule): one pre-LLM stage keeping exactly the budget's
    tokens, sorted, at every budget."""
    adapter, prepared = llava_next_case(size)
    for budget in budgets:
        (stage,) = workbench_plan(method, adapter, prepared, budget).stages
        assert len(stage.kept) == n_keep(prepared, budget), budget
        assert np.all(np.diff(stage.kept) > 0)
