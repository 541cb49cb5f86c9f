"""VFlowOpt parity: the official inference-time rule against ``VFlowOpt().select`` (every stage).

Official code: sihany077/VFlowOpt (HEAD)
- src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py lines 458-482
  (``SigLipEncoderLayer.forward`` at ``illava_vit_k``, the projector's feed layer): head mean of the
  attention probabilities, ``received_attn = A.mean(0)``, ``global_token_indice = received_attn > t *
  mean``, ``combined_attn = A[global].mean(0)``, ``+= alpha_v * softmax(entropy)``; every searched setting
  has ``alpha_v = 0``, so the patch-entropy term adds 0 by default;
- src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py
  - lines 500-552 (AnyRes branch): the tiles' maps stitched, unpadded (``unpad_image_and_attn_map``,
    lines 74-111), a newline column scored 1 appended, ``local_w`` counting it; the base map in front;
  - lines 566-630: ``reduce_tokens = round(L * (1 - vit_r))``, ``num_merged = int(L / (a * a))`` with
    ``a = vit_m`` as is, ``low_k = sort(map)[:reduce + num_merged]``, grouped by ``floor(point / a)`` per
    grid (base: ``// 27``, tiles: ``// local_w``), each group's weighted mean written into its argmax,
    which is kept;
  - lines 645-672 (flat branch, a single view): ``topk(map, 729 - round(729 * (1 - vit_r)))``, no merge;
- src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py lines 1038-1055
  (``forward_illava``): at the first of ``illava_llm_k``, for each ratio in turn, the lowest
  ``round(M * (1 - r))`` of the remaining map (M counting the newline entries) are removed.
The budget stands in for ``vit_r``: ``reduce = N - n_keep`` (N: visual tokens). Ties: stable sorts
(the lower index first), as the method documents. The reference maps its indices to the layout's tokens
by geometry (base row-major; a tile entry at (j // local_w, j % local_w), the newline column skipped).

Cases: the shipped model and the tiny LLaVA (single view: the flat branch) and the tiny LLaVA-NeXT (base
+ tiles, one patch per token: the AnyRes branch). The tiny LLaVA-OneVision resizes its tiles' grid
(``anyres_max``), which the layout folds by its tower map instead of the code's bilinear resize: not a
parity case. Where ``reduce + int(L / m^2)`` exceeds the visual tokens the code's ``low_k`` reaches the
newline entries (dropping and merging them); the method stops at the visual tokens, and those settings
are left out. On these small grids no token receives more than ``t = 39.26`` times the mean (at most
P = 144 patches; the largest ratio here is about 3.2), so the code's default importance is the mean of an
empty set (NaN): the test shows it, the method's documented stand-in (the most attended token) is the
reference's too for the default, and the rule itself is compared at thresholds that select global tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.pruning.parity.common import case, eager_tower, facts, jaccard, labels, n_keep, workbench_plan
from workbench.pruning.methods.vflowopt import VFlowOpt

BUDGETS = (0.125, 0.25, 0.5)
THRESHOLDS = (0.0, 1.05, 2.0)  # every token global; some; (shipped) a few


def tower_maps(adapter, prepared) -> torch.Tensor:
    """[views, P, P] head-mean attention probabilities among the patches at the projector's feed layer."""
    pixels = prepared.inputs["pixel_values"]
    pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels
    attentions = eager_tower(adapter, prepared, pixels).attentions[facts(adapter).projector_feed_tower_layer]
    start = 1 if adapter.has_cls_token else 0  # the code's SigLIP has no [CLS]; the patch block
    return attentions.float().mean(1)[:, start:, start:]


def official_importance(a: torch.Tensor, t: float) -> torch.Tensor:
    received = a.mean(0)                                                     # line 465
    chosen = torch.nonzero(received > t * received.mean(), as_tuple=True)[0]  # lines 467-468
    if len(chosen) == 0:  # the code averages an empty set (NaN); the method's stand-in
        chosen = received.argmax()[None]
    return a[chosen].mean(0).double()                                        # line 470


def stable_ascending(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values, stable=True).indices


def llm_stages(scores: torch.Tensor, ids: list, ratios) -> list:
    """modeling_qwen2.py lines 1043-1054: for each ratio, drop the lowest round(M (1 - r)) of the map."""
    out = []
    for r_val in ratios:
        r = round(len(scores) * (1 - r_val))
        keep = torch.ones(len(scores), dtype=torch.bool)
        keep[stable_ascending(scores)[:r]] = False
        scores, ids = scores[keep], [i for i, k in zip(ids, keep) if k]
        out.append(ids)
    return out


def official_flat(a: torch.Tensor, t: float, n_keep: int, ratios) -> list:
    """Lines 645-672 then the LLM stages: [kept after the tower, after each LLM ratio] (patch indices)."""
    scores = official_importance(a, t)
    kept = sorted(int(i) for i in torch.sort(-scores, stable=True).indices[:n_keep])
    ids = kept
    return [kept] + [sorted(s) for s in llm_stages(scores[kept], ids, ratios)]


def official_anyres(maps: torch.Tensor, image_size, grid, t: float, n_keep: int, m: float, ratios):
    """Lines 500-630 then the LLM stages. ``image_size`` (width, height); ``grid`` (rows, cols) of tiles.
    Ids: ("base", i) or ("tile", (row, col)); newline entries are ("nl", row)."""
    scores = [official_importance(a, t) for a in maps]
    side = int(math.isqrt(len(scores[0])))
    nph, npw = grid
    tiles = torch.stack(scores[1:]).view(nph, npw, side, side).permute(0, 2, 1, 3).flatten(0, 1).flatten(1, 2)
    width, height = image_size                                               # unpad, lines 86-109
    cur_h, cur_w = tiles.shape
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(height * (cur_w / width))) // 2
        tiles, top, left = tiles[pad:cur_h - pad, :], pad, 0
    else:
        pad = (cur_w - int(width * (cur_h / height))) // 2
        tiles, top, left = tiles[:, pad:cur_w - pad], 0, pad
    tiles = torch.cat([tiles, torch.ones(tiles.shape[0], 1, dtype=tiles.dtype)], dim=-1)   # newline column
    local_w = tiles.shape[1]
    ids = [("base", i) for i in range(len(scores[0]))] + [
        ("nl", j // local_w) if j % local_w == local_w - 1 else ("tile", (j // local_w, j % local_w))
        for j in range(tiles.numel())]
    attn = torch.cat([scores[0], tiles.flatten()])
    n_base = len(scores[0])
    length = len(attn)
    n_visual = sum(1 for i in ids if i[0] != "nl")
    reduce = n_visual - n_keep                                               # the budget's vit_r
    num_merged = int(length / (m * m))                                       # line 576
    low_k = stable_ascending(attn)[:reduce + num_merged]                     # lines 578-579
    keep = torch.ones(length, dtype=torch.bool)
    keep[low_k] = False
    groups = {}
    for j in low_k.tolist():                                                 # lines 585-611
        point = (j // side, j % side) if j < n_base else divmod(j - n_base, local_w)
        key = (j >= n_base, math.floor(point[0] / m), math.floor(point[1] / m))
        groups.setdefault(key, []).append(j)
    for members in groups.values():                                          # lines 613-622
        members = torch.tensor(sorted(members))
        keep[members[attn[members].argmax()]] = True
    kept_ids = [ids[j] for j in range(length) if keep[j]]
    stages = [kept_ids] + llm_stages(attn[keep], kept_ids, ratios)
    return stages, (top, left)


def to_layout(prepared, ids, offset) -> list:
    layout = prepared.layout
    base = next(g for g, grp in enumerate(layout.groups) if grp.is_base_view)
    side = layout.groups[base].cols
    where = {(int(layout.group[t]), int(layout.cell[t, 0]), int(layout.cell[t, 1])): t for t in range(layout.n_tokens)}
    out = []
    for kind, index in ids:
        if kind == "base":
            out.append(where[(base, index // side, index % side)])
        elif kind == "tile":
            out.append(where[(1 - base, index[0], index[1])])
    return sorted(out)


def stages_by_ratio(method, f, plan):
    """The method's kept set after each reference ratio: stages folded onto one layer report the last."""
    kept = [plan.stages[0].kept]
    for (layer, ratios), stage in zip(method.llm_schedule(f), plan.stages[1:]):
        kept += [None] * (len(ratios) - 1) + [stage.kept]
    return kept


def compare(method, adapter, prepared, budget, reference):
    plan = workbench_plan(method, adapter, prepared, budget)
    got = stages_by_ratio(method, facts(adapter), plan)
    assert len(got) == len(reference)
    for i, (mine, theirs) in enumerate(zip(got, reference)):
        if mine is not None:
            assert len(mine) == len(theirs) and jaccard(mine, theirs) == 1.0, (budget, i)


def test_the_default_threshold_selects_no_global_token_on_these_grids():
    for label in labels(("llava", "llava_next")):
        adapter, prepared = case(label)
        for a in tower_maps(adapter, prepared):
            received = a.mean(0)
            assert not (received > VFlowOpt().vit_t * received.mean()).any()


@pytest.mark.parametrize("label", labels(("llava",)))
def test_single_view_follows_the_flat_branch(label):
    adapter, prepared = case(label)
    (a,) = tower_maps(adapter, prepared)
    for t in (VFlowOpt().vit_t,) + THRESHOLDS:
        method = VFlowOpt(vit_t=t)
        for budget in BUDGETS:
            reference = official_flat(a, t, n_keep(prepared, budget), method.llm_ratios)
            compare(method, adapter, prepared, budget, reference)


@pytest.mark.parametrize("size", [(90, 60), (48, 100), (100, 100)])
def test_llava_next_follows_the_anyres_branch(size):
    from tests.tiny_models import QUESTION, noise_image, tiny_adapter
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    adapter = tiny_adapter("llava_next")
    prepared = adapter.prepare(noise_image(size), QUESTION)
    maps = tower_maps(adapter, prepared)
    height, width = (int(v) for v in prepared.inputs["image_sizes"][0])
    config = adapter.model.config
    grid = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, config.vision_config.image_size)
    merged = compared = 0
    length = prepared.layout.n_tokens + len(prepared.layout.separators)
    for t in (VFlowOpt().vit_t,) + THRESHOLDS:
        for m in (VFlowOpt().vit_m, 2.0, 1.5):  # the code's a; small ones make several cells and merged extras
            method = VFlowOpt(vit_t=t, vit_m=m)
            for budget in BUDGETS:
                if prepared.layout.n_tokens - n_keep(prepared, budget) + int(length / (m * m)) \
                        > prepared.layout.n_tokens:
                    continue  # the code would drop and merge newline entries too; the method stops at the visual
                compared += 1
                stages, offset = official_anyres(maps, (width, height), grid, t, n_keep(prepared, budget), m,
                                                 method.llm_ratios)
                compare(method, adapter, prepared, budget, [to_layout(prepared, s, offset) for s in stages])
                merged += len(workbench_plan(method, adapter, prepared, budget).stages[0].merges)
    assert merged > 0 and compared >= 20
