"""The recording's shortcuts equal what they stand for: causal sweeps that skip the keys a row
cannot see, and contributions taken in closed form where no part can outweigh the output."""

from __future__ import annotations

import math

import pytest
import torch

from probes.capture import AttentionCall, LayerCapture, TokenRoles
from probes.flow import EPS, contributions


def random_call(kind: str, heads: int = 3, length: int = 50, dim: int = 8) -> AttentionCall:
    torch.manual_seed(0)
    query, key, value = (torch.randn(heads, length, dim) for _ in range(3))
    mask = None
    if kind == "mask":
        mask = torch.zeros(1, length, length)
        mask[0, :, 40:] = -math.inf
        mask[0, 45] = -math.inf  # a padding query: it attends nowhere
    return AttentionCall(query, key, value, 0.35, mask=mask, causal=kind == "causal",
                         query_norope=query, key_norope=key)


@pytest.mark.parametrize("kind", ["causal", "mask", "full"])
def test_row_blocks_hold_the_probabilities_of_every_row(kind):
    call = random_call(kind)
    want = call.probs(torch.arange(call.n_queries))  # every row at once, every key
    got = torch.full_like(want, math.nan)
    widths = []
    for rows, probs in call.row_blocks(budget=3 * 4 * call.heads * 200):  # ~200 scores a block
        seen = probs.shape[-1]
        got[:, rows, :seen], got[:, rows, seen:] = probs, 0.0
        widths.append(seen)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert len(widths) > 3
    # A causal block stops at the keys its last row sees; other calls see every key.
    assert (min(widths) < call.n_keys) == (kind == "causal")


def test_a_full_sweep_in_blocks_equals_the_means_of_every_row():
    call = random_call("causal")
    heads, length, dim = call.query.shape
    valid = torch.ones(length, dtype=torch.bool)
    valid[:3] = False  # rows left out of the received attention
    roles = TokenRoles(length, torch.arange(10, 40), torch.arange(40, length), torch.arange(10), valid)
    out_proj = torch.nn.Linear(heads * dim, 16, bias=False)
    rows = {"last": torch.tensor([length - 1]), "text": torch.arange(40, length), "cls": torch.tensor([7]),
            "mean": torch.arange(3, length)}
    state = LayerCapture("llm", 0, 0, roles, rows, call, out_proj=out_proj, sweep=True, weighted=True,
                         chunk_bytes=3 * 4 * heads * 200)
    probs = call.probs(torch.arange(length))
    swept = state.full_pass
    torch.testing.assert_close(swept.head_mean, probs.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(swept.received, probs[:, valid].mean(1), atol=1e-6, rtol=0)
    # Weighted rows: those of the non-aggregate row kinds, the only ones read.
    asked = torch.zeros(length, dtype=torch.bool)
    asked[7], asked[40:] = True, True
    want = (probs * state.value_norms[:, None, :]).mean(0) * asked[:, None]
    torch.testing.assert_close(swept.weighted, want, atol=1e-6, rtol=0)


def defined_contributions(probs, value, out_slices, resid, whole):
    """The transparency tool's definition, every part formed, in float64."""
    probs, value, out_slices, resid, whole = (t.double() for t in (probs, value, out_slices, resid, whole))
    per_key = torch.einsum("hkv,hdv->hkd", value, out_slices)  # v_k^h W_O^h
    parts = probs[..., None] * per_key[:, None]  # [H, R, S, D]
    norm = whole.abs().sum(-1)
    c = (norm[None, :, None] - (whole[None, :, None] - parts).abs().sum(-1)).clamp(min=EPS)
    c_residual = (norm - (whole - resid).abs().sum(-1)).clamp(min=EPS)
    total = c.sum((0, 2)) + c_residual
    return c / total[None, :, None], c_residual / total, parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contributions_equal_their_definition(dtype):
    torch.manual_seed(0)
    heads, rows, keys, dv, hidden = 4, 2, 60, 8, 32
    value = torch.randn(heads, keys, dv) * 3
    out_slices = (torch.randn(heads, hidden, dv) * 0.3).to(dtype)
    out_slices[1, 5] = 0  # an output dimension head 1 never writes
    logits = torch.randn(heads, rows, keys) * 2
    logits[..., 0] += 5  # a key that takes most of the attention
    probs = torch.softmax(logits, -1)
    resid = torch.randn(rows, hidden)
    whole = resid + torch.einsum("hrk,hkv,hdv->rd", probs, value, out_slices.float())
    whole[0, :4] = 0.0  # output dimensions that are exactly 0
    want, want_residual, parts = defined_contributions(probs, value, out_slices, resid, whole)
    # Parts that outweigh the output somewhere, where the closed form alone would be wrong.
    assert (parts.abs() > whole.double().abs()[None, :, None]).any(-1).sum() > 10
    for budget in (8 * 2**20, 2000):  # one block; then a head at a time, in blocks of keys
        got, got_residual = contributions(probs, value, out_slices, resid, whole, budget)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(got_residual.double(), want_residual, atol=1e-6, rtol=1e-4)
