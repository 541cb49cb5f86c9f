"""Small numeric rules the methods share: top-k with a fixed tie order, cosine similarities."""

from __future__ import annotations

import numpy as np


def top_k(scores, k: int, among=None) -> np.ndarray:
    """Sorted indices of the ``k`` highest ``scores`` (ties: the lower index wins; NaN ranks last).
    ``among``: restrict the choice to these indices."""
    scores = np.asarray(scores, dtype=np.float64)
    candidates = np.arange(len(scores)) if among is None else np.asarray(among, dtype=np.int64)
    if not 0 <= k <= len(candidates):
        raise ValueError(f"cannot keep {k} of {len(candidates)} tokens")
    values = np.nan_to_num(scores[candidates], nan=-np.inf)
    order = np.lexsort((candidates, -values))  # by score descending, then index ascending
    return np.sort(candidates[order[:k]])


def normalized(features) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def cosine_matrix(a, b=None) -> np.ndarray:
    """[len(a), len(b)] cosine similarities (``b`` defaults to ``a``)."""
    a = normalized(a)
    return a @ (a if b is None else normalized(b)).T


def head_mean(keys, heads: int) -> np.ndarray:
    """[N, H*d] keys with the heads side by side -> [N, d], their mean over the heads."""
    keys = np.asarray(keys, dtype=np.float64)
    if heads < 1 or keys.shape[-1] % heads:
        raise ValueError(f"cannot split {keys.shape[-1]} key dimensions into {heads} heads")
    return keys.reshape(keys.shape[0], heads, -1).mean(1)
