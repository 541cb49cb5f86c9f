"""VScan parity: the official global + local scans and token merging against the pre-LLM stage of
``VScan().select``.

Official code: Tencent/SelfEvolvingAgent (HEAD), VScan/llava/model/llava_arch.py
- lines 254-257 (encode_images): the tower's [CLS] rows, head mean per layer;
- lines 268-283: shallow = ``image_attentions[5]``, deep = ``image_attentions[-2]``, ``global_ratio
  0.5``; local tokens by ``window_cls_selection(shallow, int(T * 0.5), window_size=6)``; the local
  tokens' deep scores set to 0, global = ``topk(deep, T - int(T * 0.5))``;
- lines 199-249 (window_cls_selection): ``H // ws`` x ``W // ws`` windows, ``k = n // windows``,
  ``topk(window, k)`` in each;
- lines 142-197 (token_merging, scaling 1): every unkept projected token to the kept token of highest
  cosine (``argmax``), each kept token = (itself + its merged tokens) / (1 + count).
Placement (the method's, written for other grids and towers): layer 5 of 24 by relative depth
(at most the deep layer), the 6-wide window at the same relative size of the grid, T = 96 scaled by
n_keep / 64. Ties: the lower index. The LLM stage is PyramidDrop's last-token rule (see
test_pyramiddrop.py) and is not repeated here. Single-image layouts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.pruning.parity.common import (case, eager_forward, eager_tower, facts, jaccard, labels, torch_topk,
                                         visual_positions, workbench_plan)
from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.vscan import VScan

BUDGETS = (0.125, 0.25, 0.5)


def official_vscan(adapter, prepared, visual_token_num: int, shallow: int, deep: int, window_size: int):
    """(kept, {target: sources}) of the tower side."""
    attentions = eager_tower(adapter, prepared).attentions
    rows, cols = prepared.layout.groups[0].rows, prepared.layout.groups[0].cols
    shallow_attn = attentions[shallow][0, :, 0, 1:].double().mean(0)
    deep_attn = attentions[deep][0, :, 0, 1:].double().mean(0).clone()
    n_local = int(visual_token_num * 0.5)
    attn_map = shallow_attn.view(rows, cols)
    k = n_local // ((rows // window_size) * (cols // window_size))
    local = []
    for i in range(rows // window_size):
        for j in range(cols // window_size):
            window = attn_map[i * window_size:(i + 1) * window_size, j * window_size:(j + 1) * window_size]
            for idx in torch_topk(window.reshape(-1), k):
                dy, dx = divmod(int(idx), window_size)
                local.append((i * window_size + dy) * cols + j * window_size + dx)
    deep_attn[torch.as_tensor(local, dtype=torch.long)] = 0
    global_ = torch_topk(deep_attn, visual_token_num - n_local)
    kept = np.union1d(local, global_)
    embeds = eager_forward(adapter, prepared).hidden_states[0][0].double()[torch.as_tensor(visual_positions(prepared))]
    others = np.setdiff1d(np.arange(len(embeds)), kept)
    cosine = torch.nn.functional.cosine_similarity(embeds[others][:, None], embeds[kept][None], dim=2)
    nearest = kept[cosine.argmax(dim=1).numpy()]
    merges = {int(t): sorted(int(s) for s in others[nearest == t]) for t in kept if (nearest == t).any()}
    return kept, merges


@pytest.mark.parametrize("label", labels(("llava",)))
def test_tower_side_equals_the_official_rule(label):
    adapter, prepared = case(label)
    f = facts(adapter)
    method = VScan()
    shallow, deep = method.tower_layers(f)
    assert deep == f.projector_feed_tower_layer  # image_attentions[-2]
    group = prepared.layout.groups[0]
    window = max(1, round(6 * min(group.rows, group.cols) / 24))
    for budget in BUDGETS:
        tower, _ = method.counts(SelectionContext(prepared.layout, budget, None, f))
        stage = workbench_plan(method, adapter, prepared, budget).stages[0]
        kept, merges = official_vscan(adapter, prepared, tower, shallow, deep, window)
        assert len(stage.kept) == len(kept)  # the official count (the windows floor their share)
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)
        assert {m.target: sorted(m.sources) for m in stage.merges} == merges
        for m in stage.merges:  # (kept + sum(merged)) / (1 + count)
            assert m.weights == pytest.approx((1 / (1 + len(m.sources)),) * (1 + len(m.sources)))
