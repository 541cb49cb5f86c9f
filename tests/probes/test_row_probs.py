"""One query row of each of several batch rows in one product (``SiteReading.row_probs``): each is
that batch row's own call's probabilities of the row, under a boolean or additive 4-D mask, a
mask shared by the batch, or none (causal), with grouped key heads; other calls row by row."""

from __future__ import annotations

import math

import pytest
import torch

from probes.capture import SiteReading


def _reading(mask, heads: int = 4, kv_heads: int = 2, batch: int = 3, length: int = 7) -> SiteReading:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, heads, length, 8, generator=generator)
    key, value = (torch.randn(batch, kv_heads, length, 8, generator=generator) for _ in range(2))
    module = torch.nn.Module()
    module.is_causal = True
    return SiteReading(module, [((module, query, key, value, mask), {"scaling": 0.3})])


def _left_padded(batch: int = 3, length: int = 7) -> torch.Tensor:
    """[B, 1, S, S] bool: sample b's rows after its 2b padding rows, causal; a padding row sees itself."""
    mask = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        start = 2 * b
        mask[b, 0, start:, start:] = torch.ones(length - start, length - start, dtype=torch.bool).tril()
        mask[b, 0, range(start), range(start)] = True
    return mask


MASKS = {
    "bool": _left_padded(),
    "additive": torch.zeros(3, 1, 7, 7).masked_fill(~_left_padded(), -math.inf),
    "shared": torch.ones(7, 7, dtype=torch.bool).tril()[None, None],
    "causal": None,
}


@pytest.mark.parametrize("kind", MASKS)
def test_each_row_is_its_batch_rows_own_probabilities(kind):
    reading = _reading(MASKS[kind])
    views, rows = [0, 2, 1, 2], [6, 5, 3, 6]
    probs = reading.row_probs(views, rows)
    assert probs.shape == (4, 4, 7)
    for i, (view, row) in enumerate(zip(views, rows)):
        own = reading.call(view).probs(torch.tensor([row]))[:, 0]
        torch.testing.assert_close(probs[i], own, atol=1e-6, rtol=1e-6)
    if kind in ("bool", "additive"):  # sample 1's row 3 sees its rows 2-3: not its padding, nor a later key
        assert torch.all(probs[2, :, :2] == 0) and torch.all(probs[2, :, 4:] == 0)
    if kind in ("causal", "shared"):  # no later key
        assert torch.all(probs[2, :, 4:] == 0) and torch.all(probs[2, :, :4] > 0)


def test_rows_of_a_towers_blocks_or_under_a_2d_mask_are_each_their_calls_own():
    """What one product does not take (the blocks of a tower; a 2-D mask) is read row by row."""
    tower = _reading(None)
    tower.module.is_causal = False  # a tower's blocks attend both ways, each within itself
    blocks = SiteReading(tower.module, tower.calls * 2)
    (module, query, key, value, _), kwargs = _reading(None).calls[0]
    square = SiteReading(module, [((module, query, key, value, torch.ones(7, 7, dtype=torch.bool).tril()), kwargs)])
    for made in (blocks, square):
        probs = made.row_probs([1, 2], [3, 6])
        for i, (view, row) in enumerate(([1, 3], [2, 6])):
            torch.testing.assert_close(probs[i], made.call(view).probs(torch.tensor([row]))[:, 0])
