"""How image processors move pixels: maps from a processed view back to the original image.

A ``View`` is an affine map from the pixels the vision tower sees to the original image's pixels;
each adapter builds the views its processor makes (one for a plain resize, a base view plus tiles
for AnyRes), and token boxes are the patch grid pushed through the view.

The size arithmetic here mirrors ``transformers``' PIL image processors exactly (which rounding,
which side gets the odd pixel), because a token box one pixel off is a token attributed to the
wrong object.
"""

from __future__ import annotations

import math
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

    def through(self, step: View) -> View:
        """This view after one more processing step; ``step`` maps the step's output pixels to this
        view's pixels (e.g. a resize of what this view shows)."""
        return View(self.scale_x * step.scale_x, self.scale_y * step.scale_y,
                    step.offset_x + self.offset_x / step.scale_x, step.offset_y + self.offset_y / step.scale_y)

    def to_original(self, boxes: np.ndarray, width: int, height: int) -> np.ndarray:
        """Boxes [N, 4] in view pixels -> original-image pixels, clipped to the image (a box wholly
        in padding comes out with zero area)."""
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


def size_value(size, *keys: str) -> int:
    """The first set field among ``keys`` of an image processor's size (a dict or a ``SizeDict``)."""
    for key in keys:
        if size is not None and key in size and size[key]:
            return int(size[key])
    raise ValueError(f"image processor size {size} has none of {keys}")


def shortest_edge_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after resizing the shortest edge to ``shortest_edge``; the long edge is
    truncated to an integer, as ``transformers.image_transforms.get_resize_output_image_size`` does."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def shortest_edge_then_crop(width: int, height: int, shortest_edge: int, crop_w: int, crop_h: int) -> View:
    """CLIP-style processing: resize the shortest edge to ``shortest_edge``, then centre-crop
    ``crop_w`` x ``crop_h``."""
    new_w, new_h = shortest_edge_size(width, height, shortest_edge)
    return resize_then_crop(width, height, new_w, new_h, crop_w, crop_h)


def resize_then_crop(width: int, height: int, new_w: int, new_h: int, crop_w: int, crop_h: int) -> View:
    """A plain resize to ``new_w`` x ``new_h``, then a centre crop (top/left offsets rounded down, as
    ``transformers.image_transforms.center_crop`` does). Crops larger than the image are refused:
    transformers pads them instead, which would need other offsets."""
    if crop_w > new_w or crop_h > new_h:
        raise ValueError(f"centre crop {crop_w}x{crop_h} is larger than the resized image {new_w}x{new_h}")
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    return View(width / new_w, height / new_h, -left, -top)


def resize_to(width: int, height: int, new_w: int, new_h: int) -> View:
    """A plain resize of the whole image to ``new_w`` x ``new_h``."""
    return View(width / new_w, height / new_h)


def resize_and_crop(image_processor, width: int, height: int) -> tuple[View, int, int]:
    """The generic ``do_resize`` + ``do_center_crop`` steps of a CLIP/SigLIP-style PIL image
    processor applied to a ``width`` x ``height`` image: the view and the output (width, height).

    ``size`` is either a shortest edge (aspect kept) or a fixed height and width (stretched)."""
    size = image_processor.size
    new_w, new_h = width, height
    if image_processor.do_resize:
        if size.get("shortest_edge") and not size.get("longest_edge"):
            new_w, new_h = shortest_edge_size(width, height, size_value(size, "shortest_edge"))
        elif size.get("height") and size.get("width"):
            new_w, new_h = size_value(size, "width"), size_value(size, "height")
        else:
            raise ValueError(f"unsupported image processor size {size}: expected a shortest edge or height and width")
    crop_w, crop_h = new_w, new_h
    if image_processor.do_center_crop:
        crop = image_processor.crop_size
        crop_w, crop_h = size_value(crop, "width"), size_value(crop, "height")
    return resize_then_crop(width, height, new_w, new_h, crop_w, crop_h), crop_w, crop_h


def fit_and_pad(width: int, height: int, target_w: int, target_h: int) -> View:
    """AnyRes (LLaVA-NeXT / OneVision): resize to fit ``target_w`` x ``target_h`` keeping the aspect
    ratio, the free side rounded up (``get_patch_output_size``), then pad equally on both sides with
    the odd pixel at the end (``_get_padding_size``). The view maps the padded canvas to the image;
    canvas pixels in the padding fall outside the image and are clipped away."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    return View(width / new_w, height / new_h, (target_w - new_w) // 2, (target_h - new_h) // 2)


def cell_boxes(view: View, row_edges: np.ndarray, col_edges: np.ndarray, width: int, height: int) -> np.ndarray:
    """Original-image boxes of the cells of a (possibly irregular) grid, row-major.

    ``row_edges`` [R, 2] and ``col_edges`` [C, 2] are each cell row's / column's (start, end) in view
    pixels; cells may overlap (a pooled token draws on several patches)."""
    r, c = np.meshgrid(np.arange(len(row_edges)), np.arange(len(col_edges)), indexing="ij")
    r, c = r.ravel(), c.ravel()
    boxes = np.stack([col_edges[c, 0], row_edges[r, 0], col_edges[c, 1], row_edges[r, 1]], axis=1).astype(float)
    return view.to_original(boxes, width, height)
