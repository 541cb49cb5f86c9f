"""How image processors move pixels: maps from a processed view back to the original image.

A ``View`` is an affine map from the pixels the vision tower sees to the original image's pixels;
each adapter builds the views its processor makes (one for a plain resize, a base view plus tiles
for AnyRes), and token boxes are the patch grid pushed through the view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workbench.layout import grid_boxes


@dataclass(frozen=True)
class View:
    """original_x = (x - offset_x) * scale_x, clipped to the image; likewise for y."""

    scale_x: float
    scale_y: float
    offset_x: float = 0.0
    offset_y: float = 0.0

    def to_original(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        out = np.empty_like(boxes, dtype=float)
        out[:, [0, 2]] = (boxes[:, [0, 2]] - self.offset_x) * self.scale_x
        out[:, [1, 3]] = (boxes[:, [1, 3]] - self.offset_y) * self.scale_y
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, height)
        return out

    def patch_boxes(self, rows: int, cols: int, patch_h: float, patch_w: float, width: int, height: int,
                    x0: float = 0.0, y0: float = 0.0) -> np.ndarray:
        """Original-image boxes of a rows x cols patch grid starting at (x0, y0) of the view."""
        grid = grid_boxes(rows, cols, x0, y0, x0 + cols * patch_w, y0 + rows * patch_h)
        return self.to_original(grid, width, height)


def shortest_edge_then_crop(width: int, height: int, shortest_edge: int, crop_w: int, crop_h: int) -> View:
    """CLIP-style processing: resize the shortest edge to ``shortest_edge`` (the long edge is
    truncated to an integer, as transformers does), then centre-crop ``crop_w`` x ``crop_h``."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return View(width / new_w, height / new_h, -left, -top)


def resize_to(width: int, height: int, new_w: int, new_h: int) -> View:
    """A plain resize of the whole image to ``new_w`` x ``new_h``."""
    return View(width / new_w, height / new_h)
