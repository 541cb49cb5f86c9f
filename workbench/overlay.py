"""Pure drawing: an image, its ``VisualLayout`` and per-token values or a kept mask -> a PIL image.

Every token is painted over its own pixel box (``layout.boxes``, original-image pixels), so tiles,
base views and dynamic resolutions land where the model saw them. Groups whose boxes overlap (a
LLaVA-NeXT base view and its tiles, an Idefics3 global view and its tiles) go to separate panels
(``panels``); groups that only touch share one.

Nothing here knows a model family, runs a model or reads Streamlit: the dashboard and the report
both draw through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

DIM = 0.25  # brightness left to dropped tokens
EVIDENCE = (0, 200, 0)  # outline of evidence tokens that were kept
DROPPED_EVIDENCE = (255, 0, 40)  # outline of evidence tokens that were dropped (an outline: the object stays visible)
# Merge groups: neither green nor red, so a merge is never read as evidence.
MERGE_COLOURS = ((255, 170, 0), (0, 150, 255), (220, 0, 220), (255, 255, 0), (0, 230, 230), (150, 110, 255))
UNSIGNED_CMAP = "magma"
SIGNED_CMAP = "RdBu_r"  # blue below zero, white at zero, red above


def display_scale(image_size: tuple[int, int], target: int = 384, largest: int = 768) -> float:
    """How much to scale an image so its longer side is about ``target`` px (never above ``largest``)."""
    longest = max(image_size)
    return max(min(target, largest) / longest, 1e-3) if longest else 1.0


def scaled(image: Image.Image, scale: float) -> Image.Image:
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


@dataclass(frozen=True)
class Scale:
    """How values map to colours: [lo, hi] onto ``cmap``; a signed scale is symmetric about 0."""

    lo: float
    hi: float
    cmap: str = UNSIGNED_CMAP
    signed: bool = False

    def to01(self, values) -> np.ndarray:
        values = np.asarray(values, dtype=float)
        span = self.hi - self.lo
        out = np.full(values.shape, 0.5) if span <= 0 else (values - self.lo) / span
        return np.where(np.isfinite(values), np.clip(out, 0.0, 1.0), np.nan)


def is_no_signal(values) -> bool:
    """True when a map carries nothing to draw: no finite value, or every finite value equal (an
    all-zero sink score). Painting it would show a uniform wash that reads as a signal."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return not finite.size or float(finite.max() - finite.min()) <= 1e-12 * max(1.0, float(np.abs(finite).max()))


def value_scale(values, signed: bool = False, over=None) -> Scale:
    """The colour scale of ``values`` (or of every array in ``over``: one scale shared by several
    maps). Signed: symmetric about 0 on a diverging map, so 0 is white whatever the spread."""
    arrays = [np.asarray(v, dtype=float) for v in (over if over is not None else [values])]
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays]) if arrays else np.zeros(0)
    if not finite.size:
        return Scale(0.0, 1.0, SIGNED_CMAP if signed else UNSIGNED_CMAP, signed)
    if signed:
        bound = float(np.abs(finite).max())
        return Scale(-bound, bound, SIGNED_CMAP, True)
    return Scale(float(finite.min()), float(finite.max()), UNSIGNED_CMAP, False)


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
            cmap: str = UNSIGNED_CMAP, groups: Iterable[int] | None = None, normalised: bool = False,
            colour_scale: Scale | None = None, grey: bool = False) -> Image.Image:
    """Each token's box filled with the colour of its value, blended over the image at ``alpha``.

    ``values``: [N] per visual token (layout order); ``groups``: which token groups to paint
    (default all, in layout order, later ones on top); ``normalised``: values already in [0, 1];
    ``colour_scale``: a fixed scale (shared across maps, or signed) instead of the map's own
    min..max; ``grey``: blend over a greyscale copy of the image, so the map's colours do not mix
    with the objects' own.
    """
    values = np.asarray(values, dtype=float)
    if values.shape != (layout.n_tokens,):
        raise ValueError(f"{values.shape[0] if values.ndim else 0} values for {layout.n_tokens} visual tokens")
    base = scaled(image, scale)
    if grey:
        base = base.convert("L").convert("RGB")
    paint = base.copy()
    draw = ImageDraw.Draw(paint)
    if colour_scale is not None:
        tones = colours(colour_scale.to01(values), colour_scale.cmap)
    else:
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
    (target thicker than its sources), and evidence tokens outlined: green where kept, red where
    dropped (outlines only, so the evidence itself stays countable under them).

    ``kept``: indices of the surviving visual tokens, or a boolean [N] mask. ``merges``: objects
    with ``target`` and ``sources`` (``workbench.pruning.plan.Merge``). ``evidence``: boolean [N].
    Indices from N on (a plan's [CLS] tokens and padded patches, ``workbench.pruning.plan.cls_token``,
    ``padded_patch``) have no box and are not drawn.
    """
    n = layout.n_tokens
    keep = np.zeros(n, dtype=bool)
    kept = np.asarray(kept)
    if kept.dtype == bool:
        if kept.shape != (n,):
            raise ValueError(f"kept mask of shape {kept.shape} for {n} visual tokens")
        keep = kept.copy()
    else:
        kept = kept.astype(np.int64)
        keep[kept[kept < n]] = True  # the tower's [CLS] (index >= N) has no box
    base = scaled(image, scale)
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
            dropped = dropped_highlight and not keep[i]
            if dropped:  # the dropped evidence shown undimmed under its outline: what was lost stays visible
                out.paste(base.crop((x0, y0, x1, y1)), (x0, y0))
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=DROPPED_EVIDENCE if dropped else EVIDENCE,
                           width=width + (1 if dropped else 0))
    for m, merge in enumerate(merges):
        colour = MERGE_COLOURS[m % len(MERGE_COLOURS)]
        for i in (merge.target, *merge.sources):
            if i in selected:  # a [CLS] (no box) is never among the layout's tokens
                x0, y0, x1, y1 = pixel_box(layout.boxes[i], scale)
                draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width + (1 if i == merge.target else 0))
    return out


def outline(drawn: Image.Image, layout, tokens, scale: float, colour=EVIDENCE,
            groups: Iterable[int] | None = None) -> Image.Image:
    """``drawn`` (an image already at ``scale``, e.g. a heatmap) with the boxes of ``tokens`` (boolean
    [N] or indices) outlined in ``colour``."""
    tokens = np.asarray(tokens)
    chosen = np.flatnonzero(tokens) if tokens.dtype == bool else tokens.astype(np.int64)
    out = drawn.copy()
    draw = ImageDraw.Draw(out)
    selected = set(_tokens_of(layout, groups).tolist())
    width = max(1, round(scale / 4))
    for i in chosen:
        if int(i) in selected:
            x0, y0, x1, y1 = pixel_box(layout.boxes[i], scale)
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=width)
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


# --- keys and colour bars ------------------------------------------------------------------------

def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow without scalable default font
        return ImageFont.load_default()


def _label(value: float) -> str:
    return f"{value:.3g}"


def colour_bar(colour_scale: Scale, width: int, height: int = 34, note: str = "") -> Image.Image:
    """A horizontal colour bar with its low, middle and high values (and ``note``) under it."""
    out = Image.new("RGB", (max(width, 120), height), (255, 255, 255))
    ramp = colours(np.linspace(0, 1, out.width - 2), colour_scale.cmap)
    bar = Image.fromarray(np.repeat(ramp[None], 12, axis=0), "RGB")
    out.paste(bar, (1, 1))
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, 0, out.width - 1, 13), outline=(120, 120, 120))
    font = _font(11)
    mid = (colour_scale.lo + colour_scale.hi) / 2
    low, centre, high = _label(colour_scale.lo), _label(mid), _label(colour_scale.hi)
    draw.text((1, 16), low, fill=(0, 0, 0), font=font)
    draw.text((out.width // 2, 16), centre, fill=(0, 0, 0), font=font, anchor="ma")
    draw.text((out.width - 1, 16), high, fill=(0, 0, 0), font=font, anchor="ra")
    if note:
        draw.text((out.width // 4, 16), note, fill=(90, 90, 90), font=font, anchor="ma")
    return out


KEY_ENTRIES = (("kept", "kept"), ("dropped", "dropped (dimmed)"), ("merged", "merged (a colour per group)"),
               ("evidence", "evidence kept"), ("lost", "evidence dropped"))


def kept_key(width: int, entries: Sequence[str] = ("kept", "dropped", "merged", "evidence", "lost")) -> Image.Image:
    """The key of ``kept_overlay``: a swatch and a word for each mark it draws."""
    font = _font(11)
    labels = dict(KEY_ENTRIES)
    rows, x, y, line = [], 2, 2, 16
    for name in entries:
        text_width = int(font.getlength(labels[name]))
        if x > 2 and x + 18 + text_width > width:
            x, y = 2, y + line
        rows.append((name, x, y))
        x += 18 + text_width + 12
    out = Image.new("RGB", (max(width, 120), y + line + 2), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for name, x, y in rows:
        box = (x, y + 1, x + 12, y + 13)
        if name == "kept":
            draw.rectangle(box, fill=(200, 200, 200), outline=(120, 120, 120))
        elif name == "dropped":
            draw.rectangle(box, fill=(50, 50, 50))
        elif name == "merged":
            draw.rectangle(box, outline=MERGE_COLOURS[0], width=2)
            draw.rectangle((x + 3, y + 4, x + 9, y + 10), outline=MERGE_COLOURS[1], width=1)
        else:
            draw.rectangle(box, outline=EVIDENCE if name == "evidence" else DROPPED_EVIDENCE, width=2)
        draw.text((x + 16, y), labels[name], fill=(0, 0, 0), font=font)
    return out


def no_signal(image: Image.Image, scale: float, text: str = "no signal: every value is the same") -> Image.Image:
    """The image greyed out with ``text`` across it: a map with nothing to show, said so."""
    base = scaled(image, scale).convert("L").convert("RGB")
    out = Image.blend(base, Image.new("RGB", base.size, (255, 255, 255)), 0.6)
    draw = ImageDraw.Draw(out)
    font = _font(max(11, out.width // 24))
    draw.text((out.width // 2, out.height // 2), text, fill=(60, 60, 60), font=font, anchor="mm")
    return out


def stacked(images: Sequence[Image.Image], gap: int = 4, background=(255, 255, 255)) -> Image.Image:
    """Images one under the other (an overlay above its key or colour bar)."""
    width = max(im.width for im in images)
    out = Image.new("RGB", (width, sum(im.height for im in images) + gap * (len(images) - 1)), background)
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out


def captioned(image: Image.Image, text: str, colour=(0, 0, 0), bar=None) -> Image.Image:
    """``image`` under a one-line caption (``bar``: an RGB swatch before the text, e.g. a method's colour)."""
    font = _font(12)
    head = Image.new("RGB", (image.width, 18), (255, 255, 255))
    draw = ImageDraw.Draw(head)
    x = 1
    if bar is not None:
        draw.rectangle((1, 3, 6, 15), fill=bar)
        x = 10
    draw.text((x, 2), text, fill=colour, font=font)
    return stacked([head, image], gap=0)


def grid(images: Sequence[Image.Image], per_row: int, gap: int = 8) -> Image.Image:
    """Images in rows of ``per_row`` (a contact sheet)."""
    rows = [side_by_side(list(images[i:i + per_row]), gap=gap) for i in range(0, len(images), per_row)]
    return stacked(rows, gap=gap)
