"""Token budgets: a count, or a fraction of the visual tokens, resolved to a count in one place."""

from __future__ import annotations

import math
import numbers

import numpy as np

Budget = int | float


def resolve_budget(budget: Budget, n_visual: int) -> int:
    """An int is a count (0..n); a float in [0, 1] is a fraction of ``n_visual``, rounded half up
    (so 0.25 of 144 is 36 and every method given the same fraction keeps the same count)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a token count (int) or a fraction (float in [0, 1]), got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if not 0 <= budget <= n_visual:
            raise ValueError(f"budget of {budget} tokens is outside 0..{n_visual} visual tokens")
        return int(budget)
    if not (math.isfinite(budget) and 0.0 <= budget <= 1.0):
        raise ValueError(f"fractional budget must be in [0, 1], got {budget}; pass an int for a token count")
    return int(math.floor(budget * n_visual + 0.5))


def check_budget(budget: Budget) -> Budget:
    """A budget that can be asked for before the model is known: a count of at least 1 token, or a
    fraction in (0, 1]. Whether a count fits the model's visual tokens is checked by
    ``resolve_budget`` once they are known."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget {budget!r}: must be a token count (integer >= 1) or a fraction in (0, 1]")
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget {budget}: a token count must be at least 1")
    elif not (math.isfinite(budget) and 0.0 < budget <= 1.0):
        raise ValueError(f"budget {budget}: a fraction must be in (0, 1]; give a whole number for a token count")
    return budget


def split_budget(total: int, sizes) -> list[int]:
    """Share ``total`` tokens among groups in proportion to their ``sizes`` (largest remainder,
    ties to the earlier group), never more than a group holds."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if total > sizes.sum():
        raise ValueError(f"cannot keep {total} tokens out of {sizes.sum()}")
    if total == 0 or len(sizes) == 0:
        return [0] * len(sizes)
    exact = total * sizes / sizes.sum()
    shares = np.floor(exact).astype(np.int64)
    order = sorted(range(len(sizes)), key=lambda g: (-(exact[g] - shares[g]), g))
    for g in order[: total - shares.sum()]:
        shares[g] += 1
    return [int(s) for s in shares]
