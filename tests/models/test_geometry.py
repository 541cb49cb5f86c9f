"""Pixel-exact checks of the geometry the layouts rest on, against the real processors' output.

The painting test in test_families.py checks token assignment to within a resampling margin (a
quarter of a token or so); these pin the integer rounding below that, where it is observable.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.image_processing_utils import select_best_resolution
from transformers.image_transforms import get_resize_output_image_size
from transformers.image_utils import ChannelDimension

from tests.tiny_models import tiny_adapter
from workbench.models.geometry import View, fit_and_pad, resize_and_crop, shortest_edge_size

SIZES = [(90, 60), (60, 90), (80, 60), (64, 64), (37, 91), (150, 40), (65, 64), (33, 100), (101, 99), (7, 5)]


@pytest.mark.parametrize("size", SIZES)
def test_shortest_edge_size_matches_transformers(size):
    width, height = size
    image = np.zeros((3, height, width))
    expected = get_resize_output_image_size(image, 32, default_to_square=False,
                                            input_data_format=ChannelDimension.FIRST)
    assert shortest_edge_size(width, height, 32)[::-1] == tuple(expected)


def test_resize_and_crop_view_maps_the_crop_window():
    processor = tiny_adapter("llava").processor.image_processor  # shortest edge 32, crop 32x32
    view, out_w, out_h = resize_and_crop(processor, 72, 48)  # -> 48x32, 8 px cropped on each side
    assert (out_w, out_h) == (32, 32)
    np.testing.assert_allclose(view.to_original(np.array([[0.0, 0, 32, 32]]), 72, 48), [[12, 0, 60, 48]])


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", SIZES)
def test_anyres_canvas_matches_the_processors_padding(family, size):
    """A white image through the AnyRes processor: its tiles, stitched back, are white exactly where
    ``fit_and_pad`` says the image lands on the canvas and black (the padding) elsewhere."""
    adapter = tiny_adapter(family)
    width, height = size
    tile = adapter.model.config.vision_config.image_size
    out = adapter.processor.image_processor(images=[Image.new("RGB", size, (255, 255, 255))], return_tensors="np")
    best_h, best_w = select_best_resolution((height, width), adapter.model.config.image_grid_pinpoints)
    rows, cols = best_h // tile, best_w // tile
    tiles = out["pixel_values"][0, 1:1 + rows * cols, 0]  # red channel of each tile, row-major
    canvas = tiles.reshape(rows, cols, tile, tile).transpose(0, 2, 1, 3).reshape(best_h, best_w)
    white = canvas > 0  # normalised white is +1, the black padding -1
    view: View = fit_and_pad(width, height, best_w, best_h)
    x0, y0 = view.offset_x, view.offset_y
    x1, y1 = x0 + width / view.scale_x, y0 + height / view.scale_y
    assert np.isclose(x1, round(x1)) and np.isclose(y1, round(y1))
    expected = np.zeros_like(white)
    expected[int(y0):round(y1), int(x0):round(x1)] = True
    np.testing.assert_array_equal(white, expected)


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
@pytest.mark.parametrize("size", SIZES + [(200, 120), (120, 200), (129, 64), (64, 129)])
def test_idefics_tiling_matches_the_processor(family, size):
    adapter = tiny_adapter(family)
    out = adapter.processor.image_processor(images=[Image.new("RGB", size)], return_row_col_info=True,
                                            return_tensors="np")
    assert adapter._tiling(*size) == (out["rows"][0][0], out["cols"][0][0])


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
@pytest.mark.parametrize("size", [(90, 60), (80, 60), (37, 91), (150, 40)])
def test_anyres_base_view_matches_the_processor(family, size):
    """A white box on black through the processor: in the base view it lands where the adapter's
    base ``View`` says, to within the pixel grid (the resampling blur is thresholded at half-grey)."""
    adapter = tiny_adapter(family)
    width, height = size
    box = (width // 4, height // 3, width // 4 + width // 2, height // 3 + height // 2)
    image = Image.new("RGB", size)
    image.paste((255, 255, 255), box)
    base = adapter.processor.image_processor(images=[image], return_tensors="np")["pixel_values"][0, 0, 0]
    ys, xs = np.nonzero(base > 0)  # normalised: black -1, white +1
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
    view = adapter._base_view(width, height)
    expected = np.array([box[0] / view.scale_x + view.offset_x, box[1] / view.scale_y + view.offset_y,
                         box[2] / view.scale_x + view.offset_x, box[3] / view.scale_y + view.offset_y])
    np.testing.assert_allclose(found, expected, atol=0.75)
