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
