"""AIM parity: the official bipartite merging before the LLM against the pre-LLM stage of
``AIM().select``.

Official code: LaVi-Lab/AIM (HEAD)
- llava/model/token_merge.py lines 5-49 (bipartite_soft_matching_merge): ``r = min(r, t // 2)``;
  unit metric, sources ``a = [::2]``, destinations ``b = [1::2]``; each source's best destination;
  sources by ``argsort(descending=True)`` of that similarity; the first r merged into their
  destination by ``scatter_reduce(mean)`` (the destination included), the rest unmerged; the result
  ``[unmerged (in that order), destinations]``;
- llava/model/llava_arch.py lines 194-198 (get_2dPool): ``r = orig_num // 2`` then ``orig_num // 4``
  (25 % kept, the default); ``// 8`` (12.5 %) is the next commented-out step; the metric is the
  features themselves (merged features in the second step); it returns the merged tokens in the
  last step's order, which ``prepare_inputs_labels_for_multimodal`` concatenates with the text as is
  (lines 449-560: the image features spliced in as they come; ``position_ids`` stays None, so the
  decoder numbers the new sequence 0..L-1).
The reference tracks every merged token's weights over the original tokens (a one-hot block carried
through the same op), its place (its destination's original index) and its order in the sequence the
LLM gets (the default ``order="code"``; ``order="layout"`` puts every token at its place instead).
``argsort`` ties: stable.
The in-LLM PageRank stages are not covered here. The code merges only video frames; the method
applies the same merging to the image (the paper's description), as does this reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import case, eager_forward, labels, n_keep, visual_positions, workbench_plan
from workbench.pruning.methods.aim import AIM


def official_merge(metric: torch.Tensor, r: int, x: torch.Tensor):
    t = metric.shape[0]
    r = min(r, t // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[::2], metric[1::2]
    node_max, node_idx = (a @ b.T).max(dim=-1)
    edge_idx = torch.sort(-node_max, stable=True).indices
    unm_idx, src_idx = edge_idx[r:], edge_idx[:r]
    dst_idx = node_idx[src_idx]
    src, dst = x[::2], x[1::2]
    unm = src[unm_idx]
    dst = dst.scatter_reduce(0, dst_idx[:, None].expand(r, x.shape[1]), src[src_idx], reduce="mean")
    return torch.cat([unm, dst])


def official_aim_merge(adapter, prepared, steps):
    """{place: weights over the original tokens} of the tokens entering the LLM."""
    features = eager_forward(adapter, prepared).hidden_states[0][0].double()[
        torch.as_tensor(visual_positions(prepared))]
    n, d = features.shape
    x = torch.cat([features, torch.eye(n, dtype=features.dtype), torch.arange(n, dtype=features.dtype)[:, None]], 1)
    for r in steps:
        # the place column rides along; after a mean it is wrong for destinations, so restore it from
        # the destinations' own (unmerged) place
        places = x[:, -1].clone()
        merged = official_merge(x[:, :d], r, x)
        t = x.shape[0]
        n_unm = (t + 1) // 2 - min(r, t // 2)
        merged[n_unm:, -1] = places[1::2]
        x = merged
    return {int(p): w.numpy() for p, w in zip(x[:, -1], x[:, d:-1])}


def workbench_weights(stage, n):
    out = {}
    merges = {m.target: m for m in stage.folds}
    for t in stage.kept:
        w = np.zeros(n)
        if t in merges:
            m = merges[t]
            w[[t, *m.sources]] = m.weights
        else:
            w[t] = 1.0
        out[t] = w
    return out


@pytest.mark.parametrize("label", labels(("llava",)))
def test_merging_equals_the_official_rule(label):
    adapter, prepared = case(label)
    n = prepared.layout.n_tokens
    cases = [(AIM(reference_steps=2), 0.5, (n // 2, n // 4)),  # the code's two steps, whatever the budget
             (AIM(), 0.5, (n // 2,)),                             # the budget's steps: 50 %
             (AIM(), 0.25, (n // 2, n // 4)),                     # 25 %: the code's default
             (AIM(), 0.125, (n // 2, n // 4, n // 8)),           # 12.5 %: its next commented-out step
             # budgets between the code's steps: the last step merges fewer than half, so unmerged
             # sources exist and their order (by similarity) feeds the next step
             (AIM(), 0.75, (n - n_keep(prepared, 0.75),)),
             (AIM(), 0.3, (n // 2, n - n // 2 - n_keep(prepared, 0.3)))]
    for method, budget, steps in cases:
        stage = workbench_plan(method, adapter, prepared, budget).stages[0]
        reference = official_aim_merge(adapter, prepared, steps)
        assert set(stage.kept) == set(reference), (label, budget, steps)
        # the LLM gets them in the code's order: every kept token appended at the end of the visual
        # block, in that order (one-axis positions, re-numbered)
        assert stage.position == "reindex" and not stage.merges
        assert [a.token for a in stage.appends] == list(reference), (label, budget, steps)
        assert all(a.after is None for a in stage.appends)
        ours = workbench_weights(stage, n)
        for place, weights in reference.items():
            np.testing.assert_allclose(ours[place], weights, atol=1e-12, err_msg=f"{label} {budget} {place}")
        # order="layout": the same tokens and weights, each merged in place (no token moves)
        layout = workbench_plan(AIM(order="layout", reference_steps=method.reference_steps), adapter, prepared,
                                budget).stages[0]
        assert layout.kept == stage.kept and not layout.appends
        assert workbench_weights(layout, n).keys() == ours.keys()
        for place in reference:
            np.testing.assert_allclose(workbench_weights(layout, n)[place], ours[place], atol=0)
