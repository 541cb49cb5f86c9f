"""Partition a token grid into a given number of near-equal rectangular windows.

Shared by the spatial baselines: ``UniformGrid`` keeps each window's centre token, ``AveragePool``
merges each window into it. Any count 0..rows*cols is reachable exactly: the grid is cut into
horizontal bands and each band into a near-equal number of windows, so a square count on a square
grid gives the regular k x k pooling and other counts stay as close to it as they can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    cells: tuple[tuple[int, int], ...]  # (row, col), row-major
    centre: tuple[int, int]


def _cuts(length: int, parts: int) -> list[int]:
    return [(i * length) // parts for i in range(parts + 1)]


def grid_windows(rows: int, cols: int, count: int) -> list[Window]:
    """``count`` windows covering the ``rows`` x ``cols`` grid, in raster order of their bands."""
    if not 0 <= count <= rows * cols:
        raise ValueError(f"cannot cut a {rows}x{cols} grid into {count} windows")
    if count == 0:
        return []
    # As many bands as a square lattice of ``count`` points with the grid's aspect would have.
    bands = min(max(round(math.sqrt(count * rows / cols)), 1), rows, count)
    while math.ceil(count / bands) > cols:
        bands += 1
    windows = []
    row_cuts = _cuts(rows, bands)
    for band in range(bands):
        per_band = count // bands + (1 if band < count % bands else 0)
        r0, r1 = row_cuts[band], row_cuts[band + 1]
        col_cuts = _cuts(cols, per_band)
        for j in range(per_band):
            c0, c1 = col_cuts[j], col_cuts[j + 1]
            cells = tuple((r, c) for r in range(r0, r1) for c in range(c0, c1))
            windows.append(Window(cells, ((r0 + r1) // 2, (c0 + c1) // 2)))
    return windows
