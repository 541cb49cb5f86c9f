"""Flow signals on hand-built cases, with numbers worked out by hand."""

from __future__ import annotations

import math

import torch

from probes.capture import AttentionCall, LayerCapture, TokenRoles, value_output_norms
from probes.flow import FlowProbe, RolloutProbe, contributions, flowcut_score, rollout_step
from probes.registry import ProbeOptions


def linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer


def uniform_call(value: torch.Tensor, causal: bool = False) -> AttentionCall:
    heads, length, dim = value.shape
    zeros = torch.zeros(heads, length, dim)  # q = k = 0: every key gets the same logit
    return AttentionCall(zeros, zeros, value, scaling=1.0, causal=causal, query_norope=zeros, key_norope=zeros)


def test_value_output_norms_by_hand():
    # head 0: W_O^0 maps (a, b) -> (a, 2b, 0); head 1: (a, b) -> (0, 0, 3a)
    slices = torch.tensor([[[1.0, 0], [0, 2], [0, 0]], [[0, 0], [0, 0], [3, 0]]])
    value = torch.tensor([[[1.0, 1], [2, 0]], [[1.0, 1], [0, 5]]])
    norms = value_output_norms(value, slices)
    torch.testing.assert_close(norms, torch.tensor([[math.sqrt(5), 2.0], [3.0, 0.0]]))


def test_kobayashi_on_uniform_attention_by_hand():
    # 2 heads, 3 tokens (token 0 "system", tokens 1 and 2 visual), attention 1/3 everywhere.
    value = torch.tensor([[[0.0, 0], [3, 4], [0, 1]], [[0.0, 0], [1, 0], [0, 2]]])
    out_proj = linear(torch.eye(4))  # W_O^0 = first two output dims, W_O^1 = last two
    roles = TokenRoles(3, torch.tensor([1, 2]), torch.zeros(0, dtype=torch.long), torch.tensor([0]),
                       torch.ones(3, dtype=torch.bool))
    state = LayerCapture("llm", 0, 0, roles, {"last": torch.tensor([2])}, uniform_call(value), out_proj=out_proj)
    probe = FlowProbe(frozenset({"kobayashi"}), ProbeOptions(per_head=True))
    (observation,) = list(probe.observe(state))
    # alpha = 1/3; ||v W_O||: head 0 -> 5 and 1, head 1 -> 1 and 2
    torch.testing.assert_close(observation.value, torch.tensor([[[5 / 3, 1 / 3]], [[1 / 3, 2 / 3]]]))


def test_contributions_by_hand():
    # One head, two keys, W_O = I: parts 0.5*(2,0) = (1,0) and 0.5*(0,2) = (0,1); residual (1,1).
    probs = torch.tensor([[[0.5, 0.5]]])
    value = torch.tensor([[[2.0, 0], [0, 2]]])
    resid = torch.tensor([[1.0, 1.0]])
    whole = resid + torch.tensor([[1.0, 1.0]])  # y = (2, 2), ||y||_1 = 4
    parts, residual = contributions(probs, value, torch.eye(2)[None], resid, whole)
    # ||y - p_k||_1 = 3 -> c = 1 each; ||y - x||_1 = 2 -> c_res = 2; normalised by 4
    torch.testing.assert_close(parts, torch.tensor([[[0.25, 0.25]]]))
    torch.testing.assert_close(residual, torch.tensor([0.5]))


def test_rollout_of_identity_attention_is_identity():
    length, visual = 5, torch.tensor([1, 2, 3])
    eye_mask = torch.full((1, length, length), -math.inf)
    eye_mask[0, range(length), range(length)] = 0.0  # each token attends only to itself
    zeros = torch.zeros(2, length, 4)
    call = AttentionCall(zeros, zeros, zeros, 1.0, mask=eye_mask, query_norope=zeros, key_norope=zeros)
    roles = TokenRoles(length, visual, torch.tensor([4]), torch.tensor([0]), torch.ones(length, dtype=torch.bool))
    probe = RolloutProbe(frozenset({"rollout"}), ProbeOptions())
    for layer in range(3):
        state = LayerCapture("llm", layer, 0, roles, {"visual": visual, "last": torch.tensor([4])}, call)
        observed = {o.rows: o.value for o in probe.observe(state)}
        torch.testing.assert_close(observed["visual"], torch.eye(3))
        torch.testing.assert_close(observed["last"], torch.zeros(1, 3))
    torch.testing.assert_close(rollout_step(torch.eye(4), torch.eye(4)), torch.eye(4))


def test_rollout_mixes_half_attention_half_residual():
    head_mean = torch.tensor([[1.0, 0], [0.5, 0.5]])
    carried = torch.eye(2)
    torch.testing.assert_close(rollout_step(carried, head_mean), torch.tensor([[1.0, 0], [0.25, 0.75]]))


def test_flowcut_score_by_hand():
    # [CLS] + 2 patches, one head, uniform attention: relation shares (1/2, 1/2).
    value = torch.tensor([[[1.0, 0], [2, 0], [0, 1]]])
    # semantic: softmax over v_cls . v_j = (1, 2, 0) -> patch shares e^2/(e^2+1), 1/(e^2+1);
    # ||v||_1 = 2 and 1.
    e2 = math.exp(2)
    want = torch.tensor([(0.5 + e2 / (e2 + 1)) * 2, (0.5 + 1 / (e2 + 1)) * 1])
    torch.testing.assert_close(flowcut_score(uniform_call(value), 0, torch.tensor([1, 2])), want)


def test_head_means_agree_across_computation_paths(shipped):
    """Per-head values (chunked rows), head means read from the full sweep, and head means of the
    rows alone (no sweep) are the same numbers."""
    from workbench.recorder import record
    from workbench.recording import CaptureRequest

    adapter, prepared = shipped
    signals = ("attention", "attention_norope", "attention_mass", "kobayashi")
    common = dict(signals=signals, stacks=("llm",), layers=(1,))
    per_head = record(adapter, prepared, CaptureRequest(rows=("last", "text", "mean"), per_head=True, **common))
    swept = record(adapter, prepared, CaptureRequest(rows=("last", "text", "mean"), **common))
    rows_only = record(adapter, prepared, CaptureRequest(rows=("last", "text"), **common))
    for signal in signals:
        for kind in ("last", "text", "mean"):
            want = per_head.get(signal, 1, kind)
            torch.testing.assert_close(swept.get(signal, 1, kind), want, atol=1e-6, rtol=1e-5)
            if kind != "mean":
                torch.testing.assert_close(rows_only.get(signal, 1, kind), want, atol=1e-6, rtol=1e-5)
