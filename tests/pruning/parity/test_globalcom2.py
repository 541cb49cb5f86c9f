"""GlobalCom² parity: the official thumbnail-commanded rule against ``GlobalCom2().select``.

Official code: xuyang-liu16/GlobalCom2 (HEAD)
- llava/model/multimodal_encoder/apply_customvit.py lines 34-48 (``CustomCLIPAttention.forward``):
  ``query_states = q_proj(h) * scale``, ``attn_weights = bmm(q, k^T)`` and ``attn_scores =
  attn_weights.view(bsz, heads, tgt, src).mean(dim=1)`` -- the head mean of the PRE-softmax scores,
  returned per layer as ``attn_maps``;
- llava/model/llava_arch.py line 403: ``cls_attn_scores = attn_maps[-1][:, 0, 1:]`` (last tower layer,
  [CLS] row, patch keys), view 0 = the thumbnail, then the crops;
- lines 285-295 (``compress_thumbnail``): ``argsort(descending=True)[:int(N * retention_ratio)]``;
- lines 103-135 (``generate_scale_for_crop_features``): the thumbnail's scores summed over equal integer
  bands (``side // num_patch_width``, the last band taking the rest), ``softmax((s - max) / 10)`` with
  ``+ 1e-8``, ``scale = ratio * (1 + p - mean p)`` clipped at 1;
- lines 297-347 (``compress_crops``): the unpadding mask from the original size (``int`` of the scaled
  side, padding ``// 2`` on both ends), each crop's unpadded scores; the thumbnail map bilinearly resized
  (``align_corners=False``) to the unpadded stitched grid and split into the crops (lines 197-236);
- lines 239-268 (``select_topk_crop_features``): ``topk(l2norm(crop scores) + l2norm(thumbnail map),
  int(N_i * scale_i))``.
The code's ratio is the constant 0.25; the reference takes it as a parameter, set to n_keep / N as the
method does (at budget 0.25 of these layouts both are 0.25). The crop grid is the processor's
(``get_anyres_image_grid_shape`` as transformers' LLaVA-NeXT calls it). Reference indices are mapped to
the layout's tokens by geometry (thumbnail row-major; a crop patch at its stitched cell minus the
unpadded rows/columns), not by the layout's tower map. The shipped model shows a single view: the code's
single-image branch (line 447) compresses nothing, and the method declares itself not applicable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.pruning.parity.common import case, eager_model, facts, jaccard, n_keep, workbench_plan
from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter
from workbench.models.base import encoder_layers
from workbench.pruning.method import MethodNotApplicable
from workbench.pruning.methods.globalcom2 import GlobalCom2

BUDGETS = (0.125, 0.25, 0.5)
SIZES = ((90, 60), (48, 100), (100, 100))  # wide (padded rows), tall (padded columns), square


@torch.no_grad()
def official_cls_logits(adapter, prepared) -> torch.Tensor:
    """[views, P] ``attn_maps[-1][:, 0, 1:]``: the last tower layer's head-mean pre-softmax [CLS] scores,
    from its own q/k projections caught by forward hooks on the eager copy."""
    model = eager_model(adapter)
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    attention = encoder_layers(tower)[-1].self_attn
    caught = {}
    hooks = [getattr(attention, name).register_forward_hook(
        lambda m, a, out, name=name: caught.setdefault(name, out.detach().clone())) for name in ("q_proj", "k_proj")]
    try:
        tower(prepared.inputs["pixel_values"].flatten(0, 1))
    finally:
        for h in hooks:
            h.remove()
    bsz, tgt, _ = caught["q_proj"].shape
    heads = attention.num_heads
    q = (caught["q_proj"] * attention.scale).view(bsz, tgt, heads, -1).transpose(1, 2)      # line 34
    k = caught["k_proj"].view(bsz, tgt, heads, -1).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)).mean(dim=1)                                         # lines 44-48
    return scores[:, 0, 1:].double()                                                        # line 403


def official_scales(base, npw, nph, ratio, temperature=10.0):                               # lines 103-135
    side = int(base.shape[0] ** 0.5)
    pw, ph = max(side // npw, 1), max(side // nph, 1)
    sums = np.zeros(npw * nph)
    for idx, score in enumerate(base.tolist()):
        i, j = divmod(idx, side)
        sums[min(i // ph, nph - 1) * npw + min(j // pw, npw - 1)] += score
    e = np.exp((sums - sums.max()) / temperature)
    p = e / (e.sum() + 1e-8)
    return np.clip(ratio * (1 + p - p.mean()), None, 1.0)


def official_globalcom2(adapter, prepared, ratio, temperature=10.0):
    """{(kind, index)}: kept ("base", thumbnail patch) and ("crop", (crop, patch)) of the official rule,
    and the unpadding offsets (top rows, left columns) of the stitched grid."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    cls = official_cls_logits(adapter, prepared)
    base = cls[0]
    kept = {("base", int(i)) for i in torch.argsort(base, descending=True)[:int(base.shape[0] * ratio)]}
    config = adapter.model.config
    height_px, width_px = (int(v) for v in prepared.inputs["image_sizes"][0])
    nph, npw = get_anyres_image_grid_shape((height_px, width_px), config.image_grid_pinpoints,
                                           config.vision_config.image_size)
    scales = official_scales(base, npw, nph, ratio, temperature)
    h = w = int(cls.shape[1] ** 0.5)
    cur_h, cur_w = nph * h, npw * w                                                         # line 304
    mask = torch.zeros(cur_h, cur_w, dtype=torch.bool)
    if width_px / height_px > cur_w / cur_h:                                                # lines 312-321
        pad = (cur_h - int(height_px * (cur_w / width_px))) // 2
        mask[pad:cur_h - pad, :] = True
        top, left = pad, 0
    else:
        pad = (cur_w - int(width_px * (cur_h / height_px))) // 2
        mask[:, pad:cur_w - pad] = True
        top, left = 0, pad
    rows, cols = torch.any(mask, 1).nonzero()[:, 0], torch.any(mask, 0).nonzero()[:, 0]
    act_h, act_w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    crops = mask.view(nph, h, npw, w).permute(0, 2, 1, 3)                                   # line 324
    guide = F.interpolate(base.view(1, 1, int(base.shape[0] ** 0.5), -1), size=(act_h, act_w), mode="bilinear",
                          align_corners=False)[0, 0]                                        # lines 200-209
    at_h = 0
    for i in range(nph):                                                                    # lines 213-234
        at_w = 0
        for j in range(npw):
            c = i * npw + j
            valid = crops[i, j].flatten()
            nz = crops[i, j].nonzero()
            ch, cw = (int(nz[:, 0].max() - nz[:, 0].min() + 1), int(nz[:, 1].max() - nz[:, 1].min() + 1)) \
                if len(nz) else (0, 0)
            own = cls[1 + c][valid]
            global_ = guide[at_h:at_h + ch, at_w:at_w + cw].flatten()
            combined = F.normalize(own[None], dim=-1)[0] + F.normalize(global_[None], dim=-1)[0]   # lines 255-258
            order = torch.topk(combined, int(len(own) * scales[c])).indices                 # lines 251, 260
            patches = valid.nonzero()[:, 0]
            kept |= {("crop", (c, int(patches[t]))) for t in order}
            at_w += cw
        at_h += crops[i, 0].nonzero()[:, 0].unique().numel()
    return kept, (nph, npw, h, w, top, left)


def to_layout(prepared, kept, grid) -> np.ndarray:
    """Layout token indices of the official kept set, located by group and cell."""
    layout = prepared.layout
    nph, npw, h, w, top, left = grid
    base_group = next(g for g, grp in enumerate(layout.groups) if grp.is_base_view)
    side = layout.groups[base_group].cols
    where = {(int(layout.group[t]), int(layout.cell[t, 0]), int(layout.cell[t, 1])): t
             for t in range(layout.n_tokens)}
    out = []
    for kind, index in kept:
        if kind == "base":
            out.append(where[(base_group, index // side, index % side)])
        else:
            c, patch = index
            row = (c // npw) * h + patch // w - top
            col = (c % npw) * w + patch % w - left
            out.append(where[(1 - base_group, row, col)])
    return np.sort(out)


@pytest.mark.parametrize("size", SIZES)
def test_default_equals_the_official_rule_on_llava_next(size):
    adapter = tiny_adapter("llava_next")
    prepared = adapter.prepare(noise_image(size), QUESTION)
    method = GlobalCom2()
    assert method.layer(facts(adapter)) == facts(adapter).vision_layers - 1  # attn_maps[-1]
    for budget in BUDGETS:
        k = n_keep(prepared, budget)
        ratio = k / prepared.layout.n_tokens
        (stage,) = workbench_plan(method, adapter, prepared, budget).stages
        kept, grid = official_globalcom2(adapter, prepared, ratio)
        reference = to_layout(prepared, kept, grid)
        assert len(stage.kept) == len(reference) <= k
        assert jaccard(stage.kept, reference) == 1.0, (size, budget)


@pytest.mark.parametrize("size", SIZES)
def test_temperature_follows_the_same_rule(size):
    """The tiny tower's logits are small: at the code's temperature 10 the crop ratios hardly differ, so
    a sharp temperature exercises the thumbnail's command of the per-crop budgets."""
    adapter = tiny_adapter("llava_next")
    prepared = adapter.prepare(noise_image(size), QUESTION)
    for temperature in (0.02, 0.2):
        for budget in BUDGETS:
            ratio = n_keep(prepared, budget) / prepared.layout.n_tokens
            (stage,) = workbench_plan(GlobalCom2(temperature=temperature), adapter, prepared, budget).stages
            reference = to_layout(prepared, *official_globalcom2(adapter, prepared, ratio, temperature))
            assert jaccard(stage.kept, reference) == 1.0, (size, temperature, budget)


def test_the_tiny_family_size_is_among_the_cases():
    assert TINY_SPECS["llava_next"].image_size in SIZES


@pytest.mark.parametrize("label", ["shipped-0", "tiny-llava"])
def test_single_view_models_are_not_compressed_by_the_code_and_refused(label):
    adapter, prepared = case(label)
    assert len(prepared.layout.groups) == 1  # one view: the code's line-447 branch keeps every token
    with pytest.raises(MethodNotApplicable, match="no thumbnail"):
        GlobalCom2().check_applies(facts(adapter))
