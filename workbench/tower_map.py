"""Fold vision-tower values (one per tower patch, per tower view) onto the LLM's visual tokens.

A recording's tower entries are per tower view (``Recording.get(..., "tower", view=v)``) and index
that view's patch tokens in the tower's own order ([CLS] excluded), which is the layout's token order
only for LLaVA-1.5-style models (one view, one patch per token). ``VisualLayout.tower_owner`` says,
for every patch of every view, which layout token it feeds (-1: none); the functions here use it:

- ``tower_to_layout(layout, per_view_values, reduce)``: per-patch scores -> [N] per-token scores
  ("mean", "sum" or "max" over the patches a token owns; NaN where a token owns none).
- ``tower_features_to_layout(layout, per_view_features)``: per-patch features [P, D] -> [N, D] by mean.
- ``tower_scores`` / ``tower_features``: the same, read straight from a recording (every view).

A layout without a map (``tower_owner == ()``: hand-made layouts, recordings made before the field)
is taken as the identity when the tower has one view whose patch count is the token count, and
refused otherwise ("no map from tower patches to layout tokens").
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from workbench.layout import VisualLayout

REDUCTIONS = ("mean", "sum", "max")
NO_MAP = "no map from tower patches to layout tokens"


def identity_owner(n: int) -> tuple[np.ndarray, ...]:
    """The map of a one-view tower whose patch i is layout token i (LLaVA-1.5, the shipped model)."""
    return (np.arange(n, dtype=np.int64),)


def owners(layout: VisualLayout, view_sizes: Sequence[int]) -> tuple[np.ndarray, ...]:
    """The layout's ``tower_owner``, checked against the patch count of each view; the identity for a
    map-less layout whose tower has one view of ``n_tokens`` patches; ``ValueError`` otherwise."""
    sizes = [int(s) for s in view_sizes]
    owner = layout.tower_owner
    if not owner:
        if len(sizes) == 1 and sizes[0] == layout.n_tokens:
            return identity_owner(layout.n_tokens)
        raise ValueError(f"the tower has {len(sizes)} view(s) of {sizes} patches for {layout.n_tokens} visual "
                         f"tokens, and the layout carries {NO_MAP} (tower_owner is empty)")
    if len(sizes) != len(owner) or any(s != len(o) for s, o in zip(sizes, owner)):
        raise ValueError(f"tower values of {len(sizes)} view(s) of {sizes} patches do not match the layout's "
                         f"tower map ({len(owner)} view(s) of {[len(o) for o in owner]} patches)")
    return owner


def _flat(layout: VisualLayout, per_view: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(owner [P_total], values [P_total, ...]) over every view's patches that feed a token."""
    arrays = [np.asarray(v, dtype=np.float64) for v in per_view]
    owner = np.concatenate(owners(layout, [len(a) for a in arrays]))
    values = np.concatenate(arrays, axis=0)
    fed = owner >= 0
    return owner[fed], values[fed]


def tower_to_layout(layout: VisualLayout, per_view_values: Sequence[np.ndarray], reduce: str = "mean") -> np.ndarray:
    """[N] per-token values from per-patch tower values ``per_view_values[v]`` [P_v] (a [1, P_v] row
    is accepted): the ``reduce`` of the patches each token owns; NaN for a token that owns none."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    per_view = [np.asarray(v, dtype=np.float64).reshape(-1) for v in per_view_values]
    owner, values = _flat(layout, per_view)
    n = layout.n_tokens
    count = np.bincount(owner, minlength=n).astype(np.float64)
    if reduce == "max":
        out = np.full(n, -np.inf)
        np.maximum.at(out, owner, values)
    else:
        out = np.bincount(owner, weights=values, minlength=n)
        if reduce == "mean":
            out = out / np.maximum(count, 1)
    out[count == 0] = np.nan
    return out


def tower_features_to_layout(layout: VisualLayout, per_view_features: Sequence[np.ndarray]) -> np.ndarray:
    """[N, D] per-token features: the mean of the [P_v, D] patch features each token owns (NaN rows
    for a token that owns none)."""
    owner, values = _flat(layout, [np.asarray(f, dtype=np.float64) for f in per_view_features])
    n = layout.n_tokens
    out = np.zeros((n, values.shape[1]))
    np.add.at(out, owner, values)
    count = np.bincount(owner, minlength=n).astype(np.float64)
    out /= np.maximum(count, 1)[:, None]
    out[count == 0] = np.nan
    return out


def tower_views(recording, layout: VisualLayout, signal: str, layer: int, rows: str) -> list:
    """Every view's recorded tower entry of (signal, layer, rows) as float64 numpy arrays: as many
    views as the layout's map has (view 0 alone for a map-less layout)."""
    if recording is None:
        raise ValueError(f"this method reads {signal!r} but the context carries no recording")
    n_views = max(len(layout.tower_owner), 1)
    return [recording.get(signal, layer, rows, "tower", view=v).double().numpy() for v in range(n_views)]


def tower_scores(recording, layout: VisualLayout, signal: str, layer: int, rows: str,
                 reduce: str = "mean") -> np.ndarray:
    """[N] per-token scores from a recorded tower row (each view's [1, P_v] entry), folded by ``reduce``.
    ``ValueError`` when a token owns no patch (the map does not cover the layout)."""
    views = tower_views(recording, layout, signal, layer, rows)
    for v, values in enumerate(views):
        if values.ndim != 2 or values.shape[0] != 1:
            raise ValueError(f"{signal} at tower layer {layer} ({rows}), view {v}: shape {values.shape}, "
                             "expected one row [1, patches]")
    scores = tower_to_layout(layout, [v[0] for v in views], reduce)
    if np.isnan(scores).any():
        raise ValueError(f"{signal} at tower layer {layer}: {int(np.isnan(scores).sum())} visual tokens own no "
                         "tower patch in the layout's tower map")
    return scores


def tower_features(recording, layout: VisualLayout, signal: str, layer: int) -> np.ndarray:
    """[N, D] per-token features from a recorded tower feature entry (each view's [P_v, D]), by mean."""
    views = tower_views(recording, layout, signal, layer, "tokens")
    features = tower_features_to_layout(layout, views)
    if np.isnan(features).any():
        raise ValueError(f"{signal} at tower layer {layer}: some visual tokens own no tower patch in the "
                         "layout's tower map")
    return features
