"""Pure drawing: an image, its ``VisualLayout`` and per-token values or a kept mask -> a PIL image.

Every token is painted over its own pixel box (``layout.boxes``, original-image pixels), so tiles,
base views and dynamic resolutions land where the model saw them. Groups whose boxes overlap (a
LLaVA-NeXT base view and its tiles, an Idefics3 global view and its tiles) go to separate panels
(``panels``); groups that only touch share one.

Nothing here knows a model family, runs a model or reads Streamlit.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

DIM = 0.25  # brightness left to dropped tokens
EVIDENCE = (0, 200, 0)
DROPPED_EVIDENCE = (255, 0, 40)
MERGE_COLOURS = ((255, 170, 0), (0, 170, 255), (220, 0, 220), (0, 220, 160), (255, 90, 90), (140, 110, 255))


def display_scale(image_size: tuple[int, int], target: int = 384, largest: int = 768) -> float:
    """How much to scale an image so its longer side is about ``target`` px (never above ``largest``)."""
    longest = max(image_size)
    return max(min(target, largest) / longest, 1e-3) if longest else 1.0


def _scaled(image: Image.Image, scale: float) -> Image.Image:
    image = image.convert("RGB")
    if scale == 1:
        return image.copy()
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)


def pixel_box(box: Sequence[float], scale: float = 1.0) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) of a token's box at ``scale``, x1/y1 exclusive."""
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    return round(x0), round(y0), round(x1), round(y1)


def _tokens_of(layout, groups: Iterable[int] | None) -> np.ndarray:
    if groups is None:
        return np.arange(layout.n_tokens)
    return np.flatnonzero(np.isin(layout.group, list(groups)))


def panels(layout, image: int = 0) -> list[tuple[int, ...]]:
    """Groups of image ``image`` split into panels whose token boxes do not overlap (greedy, in
    layout order): one panel for a single grid or a set of tiles, another for a base/global view."""
    extents = {}
    for g, grp in enumerate(layout.groups):
        if grp.image != image:
            continue
        boxes = layout.boxes[layout.group == g]
        extents[g] = (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())

    def overlap(a, b) -> bool:
        return min(a[2], b[2]) - max(a[0], b[0]) > 1e-6 and min(a[3], b[3]) - max(a[1], b[1]) > 1e-6

    out: list[list[int]] = []
    for g, ext in extents.items():
        for panel in out:
            if not any(overlap(ext, extents[h]) for h in panel):
                panel.append(g)
                break
        else:
            out.append([g])
    return [tuple(p) for p in out]


def normalise(values: np.ndarray, finite_only: bool = True) -> np.ndarray:
    """Values scaled to [0, 1] over their finite entries (NaN stays NaN; a constant map is 0.5)."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    out = np.full(values.shape, np.nan)
    if not finite.any():
        return out
    lo, hi = values[finite].min(), values[finite].max()
    out[finite] = 0.5 if hi - lo <= 0 else (values[finite] - lo) / (hi - lo)
    return out


def colours(values01: np.ndarray, cmap: str = "magma") -> np.ndarray:
    """[N, 3] uint8 colours of values in [0, 1] (NaN -> grey)."""
    from matplotlib import colormaps

    values01 = np.asarray(values01, dtype=float)
    rgba = colormaps[cmap](np.nan_to_num(values01, nan=0.0))
    out = (rgba[:, :3] * 255).round().astype(np.uint8)
    out[~np.isfinite(values01)] = (128, 128, 128)
    return out


def heatmap(image: Image.Image, layout, values, scale: float = 1.0, alpha: float = 0.6,
            cmap: str = "magma", groups: Iterable[int] | None = None, normalised: bool = False) -> Image.Image:
    """Each token's box filled with the colour of its value, blended over the image at ``alpha``.

    ``values``: [N] per visual token (layout order); ``groups``: which token groups to paint
    (default all, in layout order, later ones on top); ``normalised``: values already in [0, 1].
    """
    values = np.asarray(values, dtype=float)
    if values.shape != (layout.n_tokens,):
        raise ValueError(f"{values.shape[0] if values.ndim else 0} values for {layout.n_tokens} visual tokens")
    base = _scaled(image, scale)
    paint = base.copy()
    draw = ImageDraw.Draw(paint)
    tones = colours(values if normalised else normalise(values), cmap)
    for i in _tokens_of(layout, groups):
        x0, y0, x1, y1 = pixel_box(layout.boxes[i], scale)
        if x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=tuple(int(c) for c in tones[i]))
    return Image.blend(base, paint, alpha) if alpha < 1 else paint


def kept_overlay(image: Image.Image, layout, kept, scale: float = 1.0, merges=(),
                 evidence=None, dropped_highlight: bool = True, groups: Iterable[int] | None = None,
                 dim: float = DIM) -> Image.Image:
    """The image with dropped tokens dimmed, merged tokens outlined in one colour per merge group
    (target and sources), and evidence tokens outlined green (dropped evidence filled red).

    ``kept``: indices of the surviving visual tokens, or a boolean [N] mask. ``merges``: objects
    with ``target`` and ``sources`` (``workbench.pruning.plan.Merge``). ``evidence``: boolean [N].
    """
    n = layout.n_tokens
    keep = np.zeros(n, dtype=bool)
    kept = np.asarray(kept)
    if kept.dtype == bool:
        if kept.shape != (n,):
            raise ValueError(f"kept mask of shape {kept.shape} for {n} visual tokens")
        keep = kept.copy()
    else:
        keep[kept.astype(np.int64)] = True
    base = _scaled(image, scale)
    out = base.copy()
    dark = Image.blend(base, Image.new("RGB", base.size, (0, 0, 0)), 1 - dim)
    tokens = _tokens_of(layout, groups)
    for i in tokens:  # dropped tokens dimmed
        if not keep[i]:
            box = pixel_box(layout.boxes[i], scale)
            if box[2] > box[0] and box[3] > box[1]:
                out.paste(dark.crop(box), box[:2])
    draw = ImageDraw.Draw(out)
    selected = set(tokens.tolist())
    width = max(1, round(scale / 4))
    if evidence is not None:
        evidence = np.asarray(evidence, dtype=bool)
        for i in np.flatnonzero(evidence):
            if i not in selected:
                continue
            x0, y0, x1, y1 = pixel_box(layout.boxes[i], scale)
            if dropped_highlight and not keep[i]:
                overlay = Image.new("RGB", (x1 - x0, y1 - y0), DROPPED_EVIDENCE)
                out.paste(Image.blend(out.crop((x0, y0, x1, y1)), overlay, 0.55), (x0, y0))
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=EVIDENCE, width=width)
    for m, merge in enumerate(merges):
        colour = MERGE_COLOURS[m % len(MERGE_COLOURS)]
        for i in (merge.target, *merge.sources):
            if i in selected:
                x0, y0, x1, y1 = pixel_box(layout.boxes[i], scale)
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width + (1 if i == merge.target else 0))
    return out


def side_by_side(images: Sequence[Image.Image], gap: int = 6, background=(255, 255, 255)) -> Image.Image:
    """Panels in one row (for the several token groups of one image)."""
    if len(images) == 1:
        return images[0]
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    height = max(im.height for im in images)
    out = Image.new("RGB", (width, height), background)
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def draw_panels(draw_one, layout, image: int = 0) -> Image.Image:
    """``draw_one(groups)`` for each non-overlapping panel of ``layout``, joined side by side."""
    return side_by_side([draw_one(groups) for groups in panels(layout, image)])
