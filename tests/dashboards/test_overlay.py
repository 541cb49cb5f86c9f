"""Overlay drawing: every token is painted exactly over its layout box, at any scale and tiling."""

import numpy as np
import pytest
from PIL import Image

from dashboards import overlay
from workbench.layout import TokenGroup, VisualLayout, grid_boxes, grid_cells


def grid_layout(rows=2, cols=2, width=8, height=8):
    n = rows * cols
    return VisualLayout(positions=np.arange(1, n + 1), group=np.zeros(n, dtype=np.int64), cell=grid_cells(rows, cols),
                        boxes=grid_boxes(rows, cols, 0, 0, width, height), groups=(TokenGroup("image 0", 0, rows, cols),),
                        image_sizes=((width, height),), sequence_length=n + 2)


def tiled_layout():
    """A base view over the whole 8x4 image plus two 1x1 tiles (left and right halves)."""
    boxes = np.array([[0, 0, 8, 4], [0, 0, 4, 4], [4, 0, 8, 4]], dtype=float)
    groups = (TokenGroup("image 0 / base", 0, 1, 1), TokenGroup("image 0 / tile 0", 0, 1, 1),
              TokenGroup("image 0 / tile 1", 0, 1, 1))
    return VisualLayout(positions=np.arange(3), group=np.arange(3), cell=np.zeros((3, 2), dtype=np.int64),
                        boxes=boxes, groups=groups, image_sizes=((8, 4),), sequence_length=5)


def test_a_token_is_painted_exactly_over_its_box():
    layout = grid_layout()
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    values = np.array([0.0, 1.0, 0.0, 0.0])  # token 1: row 0, col 1 -> x 4..8, y 0..4
    out = np.asarray(overlay.heatmap(image, layout, values, scale=1, alpha=1.0))
    hot, cold = overlay.colours(np.array([1.0, 0.0]))
    inside = np.zeros((8, 8), dtype=bool)
    inside[0:4, 4:8] = True
    assert (out[inside] == hot).all()
    assert (out[~inside] == cold).all()


@pytest.mark.parametrize("scale", [3, 2.5])
def test_scaled_boxes_follow_the_layout(scale):
    layout = grid_layout(3, 3, 9, 9)
    image = Image.new("RGB", (9, 9), (0, 0, 0))
    values = np.zeros(9)
    values[4] = 1.0  # the centre token: pixels 3..6
    out = np.asarray(overlay.heatmap(image, layout, values, scale=scale, alpha=1.0))
    x0, y0, x1, y1 = overlay.pixel_box(layout.boxes[4], scale)
    hot = overlay.colours(np.array([1.0]))[0]
    assert out.shape[:2] == (round(9 * scale), round(9 * scale))
    assert (out[y0:y1, x0:x1] == hot).all()
    mask = np.ones(out.shape[:2], dtype=bool)
    mask[y0:y1, x0:x1] = False
    assert not (out[mask] == hot).all(axis=1).any()


def test_dropped_tokens_are_dimmed_and_kept_ones_untouched():
    layout = grid_layout()
    image = Image.new("RGB", (8, 8), (200, 200, 200))
    out = np.asarray(overlay.kept_overlay(image, layout, [0, 3], scale=1))
    assert (out[0:4, 0:4] == 200).all() and (out[4:8, 4:8] == 200).all()  # kept
    assert (out[0:4, 4:8] < 100).all() and (out[4:8, 0:4] < 100).all()  # dropped


def test_dropped_evidence_is_highlighted_and_evidence_outlined():
    layout = grid_layout()
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    evidence = np.array([True, True, False, False])
    out = np.asarray(overlay.kept_overlay(image, layout, [0], scale=1, evidence=evidence))
    assert tuple(out[0, 0]) == overlay.EVIDENCE  # outline of kept evidence token 0
    assert out[1:3, 5:7, 0].min() > 100  # inside of dropped evidence token 1: red
    assert (out[4:8, 0:4] == 0).all()  # no evidence, dropped: dimmed black stays black


def test_merge_groups_are_outlined():
    from workbench.pruning.plan import Merge

    layout = grid_layout()
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    out = np.asarray(overlay.kept_overlay(image, layout, [0], scale=1, merges=[Merge.mean(0, [1])]))
    colour = overlay.MERGE_COLOURS[0]
    assert tuple(out[0, 0]) == colour and tuple(out[0, 4]) == colour and tuple(out[7, 7]) == (0, 0, 0)


def test_overlapping_views_go_to_separate_panels():
    layout = tiled_layout()
    assert overlay.panels(layout) == [(0,), (1, 2)]
    image = Image.new("RGB", (8, 4), (0, 0, 0))
    drawn = overlay.draw_panels(lambda g: overlay.heatmap(image, layout, np.array([0.0, 1.0, 0.5]), 1, 1.0, groups=g),
                                layout)
    assert drawn.size == (8 + 6 + 8, 4)
    pixels = np.asarray(drawn)
    lo, hi = overlay.colours(np.array([0.0, 1.0]))
    assert (pixels[:, 0:8] == lo).all()  # the base view alone
    assert (pixels[:, 14:18] == hi).all()  # tile 0 over the left half of the second panel


def test_wrong_value_count_is_refused():
    with pytest.raises(ValueError, match="4 visual tokens"):
        overlay.heatmap(Image.new("RGB", (8, 8)), grid_layout(), np.zeros(3))
