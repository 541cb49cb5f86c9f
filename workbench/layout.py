"""Where each visual token sits: in the sequence, in its image's tile grid, and in pixels.

Every figure and every ground-truth metric goes through a ``VisualLayout``; nothing else in the
workbench knows how many visual tokens a model makes or how they tile the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TokenGroup:
    """One grid of visual tokens: an image's single view, its base view, or one of its tiles."""

    name: str  # "image 0", "image 0 / base", "image 0 / tile 3"
    image: int
    rows: int
    cols: int

    @property
    def is_base_view(self) -> bool:
        """The whole image at low resolution beside its tiles (LLaVA-NeXT's base, Idefics3's global)."""
        return self.name.split(" / ")[-1].split(" ")[0] in ("base", "global")


@dataclass(frozen=True)
class VisualLayout:
    """Visual tokens of one sample, in sequence order (the order every token index refers to).

    ``positions``: sequence index of each visual token at the LLM input.
    ``group``/``cell``: its grid and (row, col) in that grid.
    ``boxes``: its receptive pixel box (x0, y0, x1, y1) in the original image, x1/y1 exclusive.
    ``image_sizes``: (width, height) of each original image.
    ``separators``: sequence indices inside the image span that carry no patch (row-end newline
    tokens, tile markers); pruning keeps them (unless a pre-LLM stage leaves them out of the LLM
    input, ``Stage.separators``) and figures skip them.
    """

    positions: np.ndarray  # [N] int64
    group: np.ndarray  # [N] int64
    cell: np.ndarray  # [N, 2] int64
    boxes: np.ndarray  # [N, 4] float64
    groups: tuple[TokenGroup, ...]
    image_sizes: tuple[tuple[int, int], ...]
    sequence_length: int
    separators: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tower_owner: tuple[np.ndarray, ...] = ()

    def __post_init__(self):
        n = len(self.positions)
        if not (len(self.group) == len(self.cell) == len(self.boxes) == n):
            raise ValueError("positions, group, cell and boxes must describe the same tokens")
        if n and (np.diff(self.positions) <= 0).any():
            raise ValueError("visual token positions must be strictly increasing (sequence order)")
        for g, grp in enumerate(self.groups):
            if (self.group == g).sum() != grp.rows * grp.cols:
                raise ValueError(f"group {grp.name!r} has {(self.group == g).sum()} tokens, expected {grp.rows}x{grp.cols}")
        owner = tuple(np.asarray(o, dtype=np.int64) for o in self.tower_owner)
        for v, o in enumerate(owner):
            if o.ndim != 1 or (len(o) and (o.min() < -1 or o.max() >= n)):
                raise ValueError(f"tower_owner of view {v} must be a 1-D array of token indices in -1..{n - 1}")
        object.__setattr__(self, "tower_owner", owner)

    @property
    def n_tokens(self) -> int:
        return len(self.positions)

    def overlapping(self, box) -> np.ndarray:
        """Boolean [N]: tokens whose pixel box overlaps ``box`` (x0, y0, x1, y1), image 0."""
        return self.overlapping_any([box])

    def overlapping_any(self, boxes, image: int = 0) -> np.ndarray:
        hit = np.zeros(self.n_tokens, dtype=bool)
        for x0, y0, x1, y1 in boxes:
            b = self.boxes
            hit |= (b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)
        return hit & self._on_image(image)

    def _on_image(self, image: int) -> np.ndarray:
        """Boolean [N]: tokens of a group drawn from image ``image``."""
        return np.array([grp.image == image for grp in self.groups], dtype=bool)[self.group]

    def covered_share(self, mask: np.ndarray, image: int = 0) -> np.ndarray:
        """Float [N]: share of each token's pixel box covered by a boolean [H, W] mask."""
        height, width = mask.shape
        integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        # Each box widened to whole pixels and clipped to the mask, then read off the integral image.
        x0, x1 = (np.clip(f(self.boxes[:, c]), 0, width).astype(np.int64) for f, c in ((np.floor, 0), (np.ceil, 2)))
        y0, y1 = (np.clip(f(self.boxes[:, c]), 0, height).astype(np.int64) for f, c in ((np.floor, 1), (np.ceil, 3)))
        area = (x1 - x0) * (y1 - y0)
        inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        share = np.divide(inside, area, out=np.zeros(self.n_tokens), where=area > 0)
        return np.where(self._on_image(image), share, 0.0)

    def evidence_tokens(self, mask: np.ndarray | None = None, boxes=(), min_share: float = 0.0) -> np.ndarray:
        """Boolean [N]: tokens that hold evidence: covered by the mask (more than ``min_share``
        of their box) when a mask is given, else overlapping an evidence box."""
        if mask is not None:
            return self.covered_share(mask) > min_share
        return self.overlapping_any(boxes)

    def grid(self, values: np.ndarray, group: int = 0) -> np.ndarray:
        """Arrange per-token ``values`` [N] of one group as its [rows, cols] grid (NaN where absent)."""
        grp = self.groups[group]
        out = np.full((grp.rows, grp.cols), np.nan)
        sel = self.group == group
        out[self.cell[sel, 0], self.cell[sel, 1]] = np.asarray(values, dtype=float)[sel]
        return out


def grid_boxes(rows: int, cols: int, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Pixel boxes [rows*cols, 4] of a regular grid over the rectangle (x0, y0)-(x1, y1), row-major."""
    xs = np.linspace(x0, x1, cols + 1)
    ys = np.linspace(y0, y1, rows + 1)
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    r, c = r.ravel(), c.ravel()
    return np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)


def grid_cells(rows: int, cols: int) -> np.ndarray:
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.stack([r.ravel(), c.ravel()], axis=1)
