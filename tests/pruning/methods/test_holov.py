"""HoloV: crops, crop scores and the allocation worked out by hand, the shipped model, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.methods.test_vispruner import feed_tensors, shipped_eager, workbench_kept
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import SignalNeed
from workbench.pruning.methods.holov import PROJECTED, HoloV, allocate, chunk_count, chunks, crop_score

CLS22 = SignalNeed("attention", "tower", 22, "cls")


def test_crop_count_and_runs_follow_the_reference():
    assert chunk_count(576, 64) == 16  # the LLaVA code's num_patches=16 at 64 tokens
    assert (chunk_count(576, 128), chunk_count(576, 192), chunk_count(144, 32)) == (8, 5, 8)
    assert chunk_count(10, 100) == 1
    assert [len(c) for c in chunks(10, 4)] == [3, 3, 2, 2]  # the first N % n runs one longer
    assert [c.tolist() for c in chunks(3, 5)] == [[0], [1], [2]]  # empty runs dropped


def test_crop_score_is_attention_plus_rescaled_variance():
    rng = np.random.default_rng(0)
    attention = np.array([0.3, 0.1, 0.05, 0.05])
    # the variance is rescaled to the crop's mean scaled attention: the score is (1 + alpha) * 1e3 * mean
    assert crop_score(rng.normal(size=(4, 5)), attention, 0.09) == pytest.approx(1.09 * 1e3 * 0.125, rel=1e-4)
    assert crop_score(rng.normal(size=(4, 5)), attention, 0.0) == pytest.approx(1e3 * 0.125, rel=1e-9)
    assert crop_score(np.zeros((4, 5)), attention, 0.09) == pytest.approx(1e3 * 0.125)  # no variance
    assert crop_score(np.ones((1, 5)), np.array([0.2]), 0.09) == pytest.approx(0.2)  # one token: plain attention


def test_allocation_by_hand():
    # weights .75, .25 of 4 -> floor 3, 1
    assert allocate([3.0, 1.0], 4, [4, 4]) == [3, 1]
    # .69, .31 of 4 -> floor 2, 1; the one left goes to the higher weight
    assert allocate([0.2275, 0.1], 4, [4, 4]) == [3, 1]
    # 10, 1, 1 of 5: floor 4, 0, 0 + 1 -> crop 0 gets 5 but holds 2; its 3 go to crops 1 and 2 (1.5 each ->
    # 1, 1, the one left to the earlier crop)
    assert allocate([10.0, 1.0, 1.0], 5, [2, 4, 4]) == [2, 2, 1]
    # the reference drops the overflow instead (the default): crop 0 keeps its 2, the others 0 + 0
    assert allocate([10.0, 1.0, 1.0], 5, [2, 4, 4], "drop") == [2, 0, 0]


def test_select_spreads_the_budget_over_the_crops():
    # 8 tokens, 2 crops of 4 (num_patches=2), budget 4. Crop means .2275 and .105: weights .684, .316 ->
    # floor 2, 1, +1 to crop 0 -> 3 + 1. Crop 0 keeps 0, 1, 2; crop 1 keeps 5. Global top-4 would be 0, 1, 5, 4.
    layout = grid_layout((2, 4))
    attention = [[0.5, 0.4, 0.01, 0.0, 0.1, 0.12, 0.1, 0.1]]
    features = np.random.default_rng(1).normal(size=(8, 6))
    plan = HoloV(num_patches=2).select(handmade_context(layout, 4, {CLS22: attention, PROJECTED: features}))
    assert plan.final_kept == (0, 1, 2, 5)
    assert plan.stages[0].scores[5] == pytest.approx(0.12)
    # one crop: the plain [CLS] top-k
    plan = HoloV(num_patches=1).select(handmade_context(layout, 4, {CLS22: attention, PROJECTED: features}))
    assert plan.final_kept == (0, 1, 4, 5)


def test_signals_with_and_without_cls():
    assert HoloV().needs(LLAVA_FACTS) == tuple(sorted({CLS22, PROJECTED}))
    assert SignalNeed("attention", "tower", 31, "mean") in HoloV().needs(NO_CLS_FACTS)  # last layer, received
    assert HoloV().applicability(NO_CLS_FACTS) is None


def test_invalid_hyper_parameters():
    assert (HoloV().alpha, HoloV().num_patches, HoloV().overflow) == (0.09, None, "drop")
    with pytest.raises(ValueError, match="holov: overflow must be one of"):
        HoloV(overflow="pad")
    with pytest.raises(ValueError, match="holov: alpha must be a finite number >= 0, got -0.1"):
        HoloV(alpha=-0.1)
    with pytest.raises(ValueError, match="holov: num_patches must be None .* or an int >= 1, got 0"):
        HoloV(num_patches=0)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_runs_on_tiny_families(family):
    adapter, prepared = tiny_input(family)
    execution, context = run_checked(adapter, prepared, HoloV(), 0.5, max_new_tokens=2)
    assert len(execution.plan.final_kept) == context.n_keep


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(HoloV())
    assert [len(st.kept) for st in execution.plan.stages] == [32]


def official_holov(k: int, num_patches: int) -> set[int]:
    # obananas/HoloV llava/model/utils.py HoloV() with llava_arch.py's inputs (head-mean [CLS] row of
    # attentions[-2], projected features), transliterated for one image; returns None on overflow (the
    # reference then pads with zero embeddings)
    _, prepared, _, _, embeds = shipped_eager()
    _, cls = feed_tensors()
    attention = cls.mean(dim=0)
    tokens = embeds[torch.as_tensor(prepared.layout.positions)]
    n = len(tokens)
    size, extra = divmod(n, num_patches)
    runs, start = [], 0
    for p in range(num_patches):
        end = start + size + (1 if p < extra else 0)
        runs.append(torch.arange(start, end))
        start = end
    scores = []
    for run in runs:
        f = tokens[run] / (tokens[run].norm(dim=1, keepdim=True) + 1e-6)
        s = (f @ f.T) * (1 - torch.eye(len(run), dtype=f.dtype))
        mean = s.sum(dim=1) / (len(run) - 1)
        var = ((s - mean[:, None]) ** 2).sum(dim=1) / (len(run) - 1)
        a = attention[run] * 1e3
        var = var * (a.abs().mean() / (var.abs().mean() + 1e-6))
        scores.append((a + 0.09 * var).mean())
    weights = torch.stack(scores) / (torch.stack(scores).sum() + 1e-6)
    allocated = (weights * k).floor().long()
    remaining = k - int(allocated.sum())
    for idx in torch.topk(weights, k=min(remaining, len(weights))).indices[:remaining]:
        allocated[idx] += 1
    kept = set()
    for run, alloc in zip(runs, allocated):
        if alloc > len(run):
            return None
        kept |= {int(run[i]) for i in torch.topk(attention[run], k=int(alloc)).indices}
    return kept


@pytest.mark.parametrize("k", [16, 32, 48])
def test_parity_with_the_official_rule_on_the_shipped_model(k):
    official = official_holov(k, chunk_count(144, k))
    assert official is not None and len(official) == k  # no crop overflows at these budgets
    assert set(workbench_kept(HoloV(), k)) == official
    assert set(workbench_kept(HoloV(num_patches=16), k)) == official_holov(k, 16)
