import numpy as np
import pytest

from workbench.layout import TokenGroup, VisualLayout, grid_boxes, grid_cells


def square_layout(n=4, size=8):
    return VisualLayout(
        positions=np.arange(3, 3 + n * n), group=np.zeros(n * n, dtype=np.int64), cell=grid_cells(n, n),
        boxes=grid_boxes(n, n, 0, 0, n * size, n * size), groups=(TokenGroup("image 0", 0, n, n),),
        image_sizes=((n * size, n * size),), sequence_length=3 + n * n + 5,
    )


def test_overlap_and_coverage():
    layout = square_layout()
    hit = layout.overlapping((9, 9, 15, 20))  # inside column 1, rows 1-2
    assert np.flatnonzero(hit).tolist() == [5, 9]
    mask = np.zeros((32, 32), dtype=bool)
    mask[8:16, 8:12] = True  # half of token 5
    share = layout.covered_share(mask)
    assert share[5] == pytest.approx(0.5) and share.sum() == pytest.approx(0.5)
    assert np.flatnonzero(layout.evidence_tokens(mask)).tolist() == [5]


def test_grid_round_trip():
    layout = square_layout()
    values = np.arange(16.0)
    assert np.array_equal(layout.grid(values), values.reshape(4, 4))


def test_inconsistent_layout_is_rejected():
    with pytest.raises(ValueError, match="same tokens"):
        VisualLayout(np.arange(4), np.zeros(3, dtype=np.int64), grid_cells(2, 2), grid_boxes(2, 2, 0, 0, 4, 4),
                     (TokenGroup("g", 0, 2, 2),), ((4, 4),), 10)
    with pytest.raises(ValueError, match="expected 3x3"):
        VisualLayout(np.arange(4), np.zeros(4, dtype=np.int64), grid_cells(2, 2), grid_boxes(2, 2, 0, 0, 4, 4),
                     (TokenGroup("g", 0, 3, 3),), ((4, 4),), 10)


def test_covered_share_reads_each_whole_pixel_box_of_the_image():
    """Fractional boxes widen to whole pixels, clip to the mask, and tokens of another image get 0."""
    rng = np.random.default_rng(0)
    n, height, width = 40, 30, 50
    corners = rng.uniform(-5, 55, size=(n, 2, 2))
    boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1)[:, [0, 1, 2, 3]]
    boxes[3] = (10.2, 4.0, 10.8, 4.5)  # inside one pixel
    boxes[4] = (60, 40, 70, 45)  # off the mask: no area
    layout = VisualLayout(
        positions=np.arange(n), group=np.repeat([0, 1], n // 2), cell=np.concatenate([grid_cells(4, 5)] * 2),
        boxes=boxes, groups=(TokenGroup("a", 0, 4, 5), TokenGroup("b", 1, 4, 5)),
        image_sizes=((width, height), (width, height)), sequence_length=n + 2)
    mask = rng.random((height, width)) < 0.4
    share = layout.covered_share(mask)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        xa, xb = (int(min(max(v, 0), width)) for v in (np.floor(x0), np.ceil(x1)))
        ya, yb = (int(min(max(v, 0), height)) for v in (np.floor(y0), np.ceil(y1)))
        region = mask[ya:yb, xa:xb]
        expected = region.mean() if region.size and i < n // 2 else 0.0
        assert share[i] == pytest.approx(expected), i
    assert share[3] in (0.0, 1.0) and share[4] == 0.0
