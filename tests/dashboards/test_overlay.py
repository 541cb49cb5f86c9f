"""Overlay drawing: every token is painted exactly over its layout box, at any scale and tiling."""

import numpy as np
import pytest
from PIL import Image

from workbench import overlay
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


def test_evidence_is_outlined_green_when_kept_and_red_when_dropped_never_filled():
    layout = grid_layout()
    image = Image.new("RGB", (8, 8), (0, 0, 200))
    evidence = np.array([True, True, False, False])
    out = np.asarray(overlay.kept_overlay(image, layout, [0], scale=4, evidence=evidence))  # 16 px tokens
    assert tuple(out[0, 0]) == overlay.EVIDENCE  # outline of kept evidence token 0
    assert tuple(out[0, 16]) == overlay.DROPPED_EVIDENCE  # outline of dropped evidence token 1
    assert (out[4:12, 20:28] == (0, 0, 200)).all()  # its inside: the image itself, undimmed and unfilled
    assert (out[20:28, 4:12] == (0, 0, 50)).all()  # no evidence, dropped: dimmed


def test_merge_colours_are_never_the_evidence_colours():
    for colour in overlay.MERGE_COLOURS:
        assert colour not in (overlay.EVIDENCE, overlay.DROPPED_EVIDENCE)
        r, g, b = colour
        assert not (g > 150 and r < 100 and b < 100) and not (r > 200 and g < 100 and b < 100), colour


def test_a_signed_map_is_centred_on_white_and_a_shared_scale_spans_every_map():
    signed = overlay.value_scale(np.array([-1.0, 0.0, 4.0]), signed=True)
    assert (signed.lo, signed.hi, signed.cmap) == (-4.0, 4.0, overlay.SIGNED_CMAP)
    zero = overlay.colours(signed.to01(np.array([0.0])), signed.cmap)[0]
    assert (zero > 235).all()  # zero is (near) white, not the dark end a one-sided map gives it
    high, low = overlay.colours(signed.to01(np.array([4.0, -4.0])), signed.cmap)
    assert high[0] > high[2] and low[2] > low[0]  # positive red, negative blue
    shared = overlay.value_scale(None, over=[np.array([0.0, 1.0]), np.array([2.0, 5.0])])
    assert (shared.lo, shared.hi) == (0.0, 5.0)
    layout = grid_layout()
    image = Image.new("RGB", (8, 8), (0, 0, 0))
    own = np.asarray(overlay.heatmap(image, layout, np.array([0.0, 1.0, 0.0, 0.0]), 1, alpha=1.0))
    common = np.asarray(overlay.heatmap(image, layout, np.array([0.0, 1.0, 0.0, 0.0]), 1, alpha=1.0,
                                        colour_scale=shared))
    assert (own[0, 4] != common[0, 4]).any()  # 1.0 is the top of its own scale, a fifth of the shared one
    assert (common[0, 4] == overlay.colours(np.array([0.2]))[0]).all()


def test_an_all_equal_map_is_no_signal():
    assert overlay.is_no_signal(np.zeros(5)) and overlay.is_no_signal(np.full(3, np.nan))
    assert overlay.is_no_signal(np.full(4, 7.5)) and not overlay.is_no_signal(np.array([0.0, 0.0, 1e-6]))
    greyed = np.asarray(overlay.no_signal(Image.new("RGB", (80, 80), (255, 0, 0)), 1.0))
    assert np.abs(greyed[..., 0].astype(int) - greyed[..., 1]).max() < 5  # grey: no colour of a wash


def test_colour_bar_and_key_are_drawn_at_the_width_asked():
    bar = overlay.colour_bar(overlay.Scale(-2.0, 2.0, overlay.SIGNED_CMAP, True), 300)
    pixels = np.asarray(bar)
    assert bar.width == 300 and pixels[5, 2, 2] > pixels[5, 2, 0] and pixels[5, -3, 0] > pixels[5, -3, 2]
    key = overlay.kept_key(300)
    assert key.width == 300
    colours = {tuple(c) for c in np.asarray(key).reshape(-1, 3)}
    assert {overlay.EVIDENCE, overlay.DROPPED_EVIDENCE, overlay.MERGE_COLOURS[0]} <= colours
    assert overlay.DROPPED_EVIDENCE not in {tuple(c) for c in np.asarray(overlay.kept_key(300, ("kept",))).reshape(-1, 3)}


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


def test_outlines_land_on_the_tokens_of_an_already_scaled_image():
    layout = grid_layout()  # 8 x 8 image, 4 px tokens
    drawn = Image.new("RGB", (32, 32), (0, 0, 0))  # drawn at scale 4: 16 px tokens
    out = np.asarray(overlay.outline(drawn, layout, np.array([False, False, False, True]), 4))
    assert tuple(out[16, 16]) == overlay.EVIDENCE and tuple(out[31, 31]) == overlay.EVIDENCE  # token 3's corners
    assert (out[20:28, 20:28] == 0).all() and (out[0:16, 0:16] == 0).all()  # inside and elsewhere untouched
