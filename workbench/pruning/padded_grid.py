"""The crops' padded stitched grid of an AnyRes (LLaVA-NeXT) layout, and the LLM sequence the released
LLaVA codes build on it when they skip unpadding.

LLaVA-NeXT stitches its crops' patch grids into one ``tiles x side`` grid, unpads it (drops the rows or
columns the processor's centre padding filled) and adds a newline after every row; the layout holds that
unpadded arrangement. Several methods' codes (VisPruner's, VisionZip's) drop ``_unpad`` from the merge
type: the LLM gets the chosen crop patches in raster order of the PADDED stitched grid, padding patches
included, with no newline. ``padded_grid`` recovers that grid from the layout's tower map alone (no
model family: the crop arrangement and padding offsets are the unique ones that reproduce the map), and
``code_sequence`` turns per-view chosen patches into a pre-LLM stage's kept tokens and the appends that
bring the padding patches in (``padded_patch``) at their raster places. ``transposed_sequence`` builds
the sequence of a code that reads the crop grid's shape transposed (HiRED's) on the same grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from workbench.layout import VisualLayout
from workbench.pruning.plan import Append, padded_patch


@dataclass(frozen=True)
class PaddedGrid:
    """``tiles = (tile rows, tile cols)`` crops of ``side x side`` patches (view 1 + t is crop t,
    row-major), stitched; unpadding keeps rows ``top..top+rows`` and columns ``left..left+cols``,
    which are the layout's tile group ``group``."""

    side: int
    tiles: tuple[int, int]
    top: int
    left: int
    rows: int
    cols: int
    group: int

    @property
    def width(self) -> int:
        return self.tiles[1] * self.side

    def cell(self, view: int, patch: int) -> tuple[int, int]:
        """(row, col) of a crop view's patch on the padded stitched grid."""
        tile, (r, c) = view - 1, divmod(int(patch), self.side)
        return (tile // self.tiles[1]) * self.side + r, (tile % self.tiles[1]) * self.side + c

    def raster(self, view: int, patch: int) -> int:
        """The patch's place in raster order of the padded stitched grid."""
        row, col = self.cell(view, patch)
        return row * self.width + col

    def owners(self, layout: VisualLayout) -> list[np.ndarray]:
        """Per crop view, the layout token each patch feeds under this geometry (-1: unpadded away)."""
        token = np.full((self.rows, self.cols), -1, dtype=np.int64)
        members = np.flatnonzero(layout.group == self.group)
        token[layout.cell[members, 0], layout.cell[members, 1]] = members
        out = []
        for view in range(1, self.tiles[0] * self.tiles[1] + 1):
            cells = np.array([self.cell(view, p) for p in range(self.side * self.side)]).reshape(-1, 2)
            rows, cols = cells[:, 0] - self.top, cells[:, 1] - self.left
            inside = (rows >= 0) & (rows < self.rows) & (cols >= 0) & (cols < self.cols)
            owner = np.full(len(cells), -1, dtype=np.int64)
            owner[inside] = token[rows[inside], cols[inside]]
            out.append(owner)
        return out


def padded_grid(layout: VisualLayout) -> PaddedGrid | None:
    """The padded stitched grid of an AnyRes layout (view 0 the base image feeding its base group, the
    other views square crops feeding one tile group), or None when the layout is not one or no single
    crop arrangement reproduces its tower map."""
    owner = layout.tower_owner
    if len(owner) < 2 or len(owner[1]) == 0:
        return None
    fed = owner[0][owner[0] >= 0]
    if len(fed) == 0 or not all(layout.groups[g].is_base_view for g in np.unique(layout.group[fed])):
        return None
    tile_groups = [g for g, grp in enumerate(layout.groups) if not grp.is_base_view]
    side = math.isqrt(len(owner[1]))
    if len(tile_groups) != 1 or side * side != len(owner[1]) or any(len(o) != side * side for o in owner[1:]):
        return None
    group = tile_groups[0]
    rows, cols = layout.groups[group].rows, layout.groups[group].cols
    crops, found = len(owner) - 1, []
    for tile_rows in (d for d in range(1, crops + 1) if crops % d == 0):
        tiles = (tile_rows, crops // tile_rows)
        height, width = tiles[0] * side, tiles[1] * side
        if height < rows or width < cols or (height - rows) % 2 or (width - cols) % 2:
            continue
        grid = PaddedGrid(side, tiles, (height - rows) // 2, (width - cols) // 2, rows, cols, group)
        if all(np.array_equal(a, b) for a, b in zip(grid.owners(layout), owner[1:])):
            found.append(grid)
    return found[0] if len(found) == 1 else None


def padded_grid_for(layout: VisualLayout, method: str, instead: str) -> PaddedGrid:
    """``padded_grid`` of a multi-view layout a method builds its code's sequence on, or one clear
    line naming the parameter value ``instead`` that works on the layout's own arrangement."""
    grid = padded_grid(layout)
    if grid is None:
        raise ValueError(f"{method}: the code's multi-crop sequence needs LLaVA-NeXT's stitched crop grid, and this "
                         f"layout's tower map is not one; use {instead}")
    return grid


def code_sequence(layout: VisualLayout, grid: PaddedGrid, chosen) -> tuple[tuple[int, ...], tuple[Append, ...]]:
    """(kept, appends) of a pre-LLM stage giving the LLM the codes' sequence for ``chosen`` ({view:
    patches}, view 0 the base image): the base view's chosen patches, then the crops' in raster order
    of the padded stitched grid. A patch the layout has a token for is kept as that token (the layout
    orders them so already); a padding patch enters as its ``padded_patch`` name, placed before the
    first tile token that follows it in that raster order (after the last tile token if none does).
    With the layout's separators dropped, that is the codes' sequence exactly."""
    sizes = [len(o) for o in layout.tower_owner]
    n = layout.n_tokens
    kept, padded = set(), []
    for view, patches in chosen.items():
        for patch in patches:
            token = int(layout.tower_owner[view][int(patch)])
            if token >= 0:
                kept.add(token)
            elif view > 0:  # the base view feeds a token with every patch
                padded.append((grid.raster(view, int(patch)), padded_patch(n, sizes, view, int(patch))))
    tiles = np.flatnonzero(layout.group == grid.group)  # in layout order = raster order of the unpadded grid
    keys = (layout.cell[tiles, 0] + grid.top) * grid.width + layout.cell[tiles, 1] + grid.left
    appends = []
    for key, token in sorted(padded):
        at = int(np.searchsorted(keys, key))
        place = {"before": int(tiles[at])} if at < len(tiles) else {"after": int(tiles[-1])}
        appends.append(Append(token, (), (1.0,), **place))
    return tuple(sorted(kept | {token for _, token in padded})), tuple(appends)


def transposed_order(grid: PaddedGrid, image_size) -> tuple[tuple[int, int], ...]:
    """(view, patch) of every crop patch an LLaVA-NeXT packing that reads the crop grid's shape as
    (width, height) puts into the LLM, in its order (HiRED's code: its ``(rows, cols)`` taken as
    ``(num_patch_width, num_patch_height)``). The crops, row-major, fill a ``cols x rows`` grid of
    tiles (crop t at tile row ``t // rows``, column ``t % rows``, each crop upright); that grid is cut
    by ``unpad_image`` for the original ``image_size`` (width, height) as if it were the image's
    padded grid, and read in raster order. Equal to the padded grid's own cut on a square crop grid.
    The cut is computed in float32, as the code's division of the image-size tensor."""
    tile_rows, tile_cols = grid.tiles
    side = grid.side
    height, width = tile_cols * side, tile_rows * side
    image_width, image_height = (np.float32(v) for v in image_size)
    rows, cols = range(height), range(width)
    if image_width / image_height > np.float32(width / height):  # wider than the grid: rows are cut
        pad = (height - int(image_height * (np.float32(width) / image_width))) // 2
        rows = range(pad, height - pad)
    else:
        pad = (width - int(image_width * (np.float32(height) / image_height))) // 2
        cols = range(pad, width - pad)
    return tuple((1 + (r // side) * tile_rows + c // side, (r % side) * side + c % side) for r in rows for c in cols)


def transposed_sequence(layout: VisualLayout, grid: PaddedGrid, chosen) -> tuple[tuple[int, ...], tuple[Append, ...]]:
    """(kept, appends) of a pre-LLM stage giving the LLM the sequence of ``transposed_order`` for
    ``chosen`` ({view: patches}, view 0 the base image): the base view's chosen patches as they are,
    then the chosen crop patches that order keeps, in that order, each moved (or, a padding patch,
    brought in as its ``padded_patch`` name) to just before the first tile token's row; a chosen crop
    patch outside it is lost. Each crop patch appears at most once, so the moves are exact."""
    sizes = [len(o) for o in layout.tower_owner]
    picked = {(int(view), int(patch)) for view, patches in chosen.items() if view > 0 for patch in patches}
    kept = {int(layout.tower_owner[0][int(p)]) for p in chosen.get(0, ())}
    first_tile = int(np.flatnonzero(layout.group == grid.group)[0])
    appends = []
    for view, patch in transposed_order(grid, layout.image_sizes[0]):
        if (view, patch) in picked:
            token = int(layout.tower_owner[view][patch])
            token = token if token >= 0 else padded_patch(layout.n_tokens, sizes, view, patch)
            kept.add(token)
            appends.append(Append(token, (), (1.0,), before=first_tile))
    return tuple(sorted(kept)), tuple(appends)
