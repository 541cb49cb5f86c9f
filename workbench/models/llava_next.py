"""LLaVA-NeXT / LLaVA-1.6 (``LlavaNextForConditionalGeneration``): AnyRes.

The processor makes a base view (the whole image stretched to one tile) and cuts the image, fitted
into the best of ``image_grid_pinpoints`` and centre-padded, into tiles. The model stitches the
tiles' patch grids back into one high-resolution grid, drops the rows (or columns) it takes for
padding (``unpad_image``), and appends the learned ``image_newline`` embedding after every row of
what is left. Sequence: base grid (row-major), then each kept row followed by its newline token.

Groups: "image 0 / base" and "image 0 / tiles" (the stitched, unpadded grid: one grid rather than
one per tile, because the model orders its tokens row by row across tiles, and OneVision's pooling
mixes neighbouring tiles).

Tower map (``tower_owner``): tower view 0 is the base view (patch i -> base token i); view 1 + t is
tile t (row-major over the best-fit grid, as the processor cuts them), whose patch (r, c) sits at
(tile_row * side + r, tile_col * side + c) of the stitched grid and feeds the high-res token of that
row and column when unpadding keeps both (else -1). OneVision's pooling: see its ``_axis_owner``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import unpad_image

from workbench.layout import TokenGroup, VisualLayout, grid_cells
from workbench.models.geometry import View, cell_boxes, fit_and_pad, resize_and_crop, resize_to, size_value
from workbench.models.llava import LlavaAdapter
from workbench.models.registry import register


@dataclass(frozen=True)
class HighResGrid:
    """The high-resolution tokens after unpadding (and pooling): each token row / column as the
    half-open range of stitched-grid patch rows / columns it is computed from."""

    rows: np.ndarray  # [R, 2]
    cols: np.ndarray  # [C, 2]


def kept_rows_cols(unpad, grid_rows: int, grid_cols: int, image_height: int, image_width: int):
    """Which stitched-grid rows and columns the model's own ``unpad`` keeps (run on an index map, so
    its integer rounding is the model's)."""
    index = torch.arange(grid_rows * grid_cols).view(1, grid_rows, grid_cols)
    kept = unpad(index, (image_height, image_width))[0]
    return (kept[:, 0] // grid_cols).numpy(), (kept[0, :] % grid_cols).numpy()


@register
class LlavaNextAdapter(LlavaAdapter):
    """Same skeleton as LLaVA-1.5 (``model.model.{vision_tower, language_model}``), AnyRes layout."""

    architectures = ("LlavaNextForConditionalGeneration",)
    family = "llava_next"
    multi_view = True
    _unpad = staticmethod(unpad_image)

    def _tile_geometry(self) -> tuple[int, int]:
        """(tile size, patch size) in pixels, checked against the processor's settings."""
        vision = self.model.config.vision_config
        tile, patch = vision.image_size, vision.patch_size
        ip = self.processor.image_processor
        cut = size_value(ip.crop_size, "height") if ip.crop_size else size_value(ip.size, "height", "shortest_edge")
        _, out_w, out_h = resize_and_crop(ip, cut, cut)
        if not cut == out_w == out_h == tile:
            raise ValueError(f"the processor cuts {cut}px tiles and sends {out_w}x{out_h} to a {tile}px tower; "
                             "only processors whose tiles reach the tower unchanged are supported")
        strategy = self.model.config.vision_feature_select_strategy
        if (strategy == "default") != self.has_cls_token:
            raise ValueError(f"vision_feature_select_strategy={strategy!r} with a tower "
                             f"{'with' if self.has_cls_token else 'without'} [CLS] does not give a square patch grid")
        return tile, patch

    def _base_view(self, width: int, height: int) -> View:
        """The base view: the image stretched to the tile size, then the usual resize/crop steps."""
        ip = self.processor.image_processor
        side_h = size_value(ip.size, "height", "shortest_edge")
        side_w = size_value(ip.size, "width", "shortest_edge")
        step, _, _ = resize_and_crop(ip, side_w, side_h)
        return resize_to(width, height, side_w, side_h).through(step)

    def _pool(self, grid: HighResGrid, side: int) -> HighResGrid:
        """LLaVA-NeXT keeps the unpadded grid as it is; OneVision may shrink it."""
        return grid

    def _axis_owner(self, n_in: int, n_out: int) -> np.ndarray:
        """[n_in]: which token row (column) each kept patch row (column) feeds; no pooling here."""
        if n_in != n_out:
            raise ValueError(f"{n_in} kept patch rows/columns for {n_out} token rows/columns without pooling")
        return np.arange(n_in)

    def _tower_owner(self, side: int, tiles: tuple[int, int], kept: tuple[np.ndarray, np.ndarray],
                     grid: HighResGrid, n_base: int) -> tuple[np.ndarray, ...]:
        """Per tower view (base, then tiles row-major) the layout token each patch feeds, or -1."""
        tile_rows, tile_cols = tiles
        owner_axes = []
        for kept_axis, n_stitched, n_out in ((kept[0], tile_rows * side, len(grid.rows)),
                                             (kept[1], tile_cols * side, len(grid.cols))):
            axis = np.full(n_stitched, -1, dtype=np.int64)
            axis[kept_axis] = self._axis_owner(len(kept_axis), n_out)
            owner_axes.append(axis)
        row_owner, col_owner = owner_axes
        n_cols = len(grid.cols)
        r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        r, c = r.ravel(), c.ravel()
        views = [np.arange(n_base, dtype=np.int64)]
        for tr in range(tile_rows):
            for tc in range(tile_cols):
                rows, cols = row_owner[tr * side + r], col_owner[tc * side + c]
                views.append(np.where((rows >= 0) & (cols >= 0), n_base + rows * n_cols + cols, -1))
        return tuple(views)

    def layout(self, inputs, image_sizes):
        width, height = image_sizes[0]
        tile, patch = self._tile_geometry()
        side = tile // patch  # patches per tile side
        best_h, best_w = select_best_resolution((height, width), self.model.config.image_grid_pinpoints)
        grid_rows, grid_cols = best_h // tile * side, best_w // tile * side
        rows, cols = kept_rows_cols(self._unpad, grid_rows, grid_cols, height, width)
        grid = self._pool(HighResGrid(np.stack([rows, rows + 1], 1), np.stack([cols, cols + 1], 1)), side)
        n_rows, n_cols = len(grid.rows), len(grid.cols)

        positions = self.image_token_positions(inputs).numpy()
        n_base = side * side
        expected = n_base + n_rows * (n_cols + 1)
        if len(positions) != expected:
            raise ValueError(f"{len(positions)} image tokens in the prompt, expected {expected} "
                             f"({side}x{side} base + {n_rows}x{n_cols} tiles + {n_rows} newlines; "
                             "one image per sequence is supported)")
        # After the base grid, every row of the high-res grid is n_cols tokens and a newline.
        in_row = np.arange(len(positions) - n_base) % (n_cols + 1)
        high_res, newlines = positions[n_base:][in_row < n_cols], positions[n_base:][in_row == n_cols]

        base_boxes = self._base_view(width, height).patch_boxes(side, side, patch, patch, width, height)
        canvas = fit_and_pad(width, height, best_w, best_h)
        tile_boxes = cell_boxes(canvas, grid.rows * patch, grid.cols * patch, width, height)
        return VisualLayout(
            positions=np.concatenate([positions[:n_base], high_res]),
            group=np.repeat([0, 1], [n_base, n_rows * n_cols]),
            cell=np.concatenate([grid_cells(side, side), grid_cells(n_rows, n_cols)]),
            boxes=np.concatenate([base_boxes, tile_boxes]),
            groups=(TokenGroup("image 0 / base", 0, side, side), TokenGroup("image 0 / tiles", 0, n_rows, n_cols)),
            image_sizes=(image_sizes[0],), sequence_length=int(inputs["input_ids"].shape[1]), separators=newlines,
            tower_owner=self._tower_owner(side, (best_h // tile, best_w // tile), (rows, cols), grid, n_base),
        )
