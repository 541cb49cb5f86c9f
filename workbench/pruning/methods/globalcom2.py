"""GlobalCom²: the thumbnail (base view) of an AnyRes image commands the compression of its crops:
its [CLS] attention sets each crop's retention ratio and guides which of the crop's tokens stay."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.layout import VisualLayout
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.cls_attention import (REFERENCE_TOWER_DEPTH, ClsAttentionMethod, check_tower_layer,
                                                     row_scores, weighted_split)
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import normalized, top_k
from workbench.pruning.registry import register_method

# Adapters whose layouts hold a thumbnail (base view) followed by the stitched AnyRes crops.
SINGLE_VIEW_REASON = ("its layouts have no thumbnail (base view) plus crops: GlobalCom² only re-allocates the budget "
                      "of AnyRes crops (the reference compresses nothing on a single view)")
# scores: the recorded signal the [CLS] row is read from. "logits": the head mean of the pre-softmax scores,
# as the code (apply_customvit.py); "probabilities": the head mean of the softmax, as the paper's wording.
SCORE_SIGNALS = {"logits": "attention_logits", "probabilities": "attention"}
# regions: which crop a thumbnail patch counts for. "bands": the code's equal integer bands of the thumbnail
# grid; "pixels": the crop whose unpadded token boxes contain the patch's pixel-box centre.
REGION_RULES = ("bands", "pixels")
# count: "reference": int(N * ratio) per view, as the code (fewer than the budget); "budget": exactly n_keep.
COUNT_RULES = ("reference", "budget")
LAYOUT_REASON = "globalcom2: this sample's layout has no base view plus crops with a tower map to tell the crops apart"


def crop_scales(region_scores, retention: float, temperature: float) -> np.ndarray:
    """The reference's per-crop retention ratios: ``retention * (1 + p - mean(p))`` clipped at 1, with
    ``p = softmax((s - max s) / temperature)`` (denominator + 1e-8) of the thumbnail's summed scores ``s``
    over each crop's region."""
    s = np.asarray(region_scores, dtype=np.float64)
    e = np.exp((s - s.max()) / temperature)
    p = e / (e.sum() + 1e-8)
    return np.minimum(retention * (1.0 + p - p.mean()), 1.0)


def crop_grid(layout: VisualLayout, crops) -> tuple[list[tuple[int, int]], int, int]:
    """(grid (row, col) of each crop, grid rows, grid cols): crops ordered by their first stitched row and
    column (unpadding removes rows or columns at the edges, not whole crops' order)."""
    tops = [int(layout.cell[t, 0].min()) for t in crops]
    lefts = [int(layout.cell[t, 1].min()) for t in crops]
    rows, cols = sorted(set(tops)), sorted(set(lefts))
    return [(rows.index(t), cols.index(c)) for t, c in zip(tops, lefts)], len(rows), len(cols)


def bilinear(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``grid`` [h, w] resized to [rows, cols] by bilinear interpolation with half-pixel centres
    (``F.interpolate(mode="bilinear", align_corners=False)``, as the reference)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(grid, dtype=np.float64))[None, None]
    return F.interpolate(t, size=(rows, cols), mode="bilinear", align_corners=False)[0, 0].numpy()


def _crops(layout: VisualLayout) -> tuple[int, int, list[np.ndarray]]:
    """(base group, crop group, the crop tokens of each tower view after the first), or
    MethodNotApplicable when the layout is not one base view + one group of stitched crops with a map."""
    bases = [g for g, grp in enumerate(layout.groups) if grp.is_base_view]
    if len(layout.groups) != 2 or len(bases) != 1 or len(layout.tower_owner) < 2:
        raise MethodNotApplicable(LAYOUT_REASON)
    base = bases[0]
    crop_group = 1 - base
    crops = []
    for owner in layout.tower_owner:
        tokens = np.unique(owner[owner >= 0])
        if len(tokens) and np.all(layout.group[tokens] == crop_group):
            crops.append(tokens)
        elif len(tokens) and not np.all(layout.group[tokens] == base):
            raise MethodNotApplicable(LAYOUT_REASON)
    if not crops:
        raise MethodNotApplicable(LAYOUT_REASON)
    return base, crop_group, crops


@register_method("globalcom2")
@dataclass(frozen=True)
class GlobalCom2(ClsAttentionMethod):
    """GlobalCom² (LLaVA-NeXT AnyRes: a thumbnail + crops), before the LLM, with R = budget / visual tokens:

    1. Thumbnail: keeps ``int(N_base * R)`` tokens by its [CLS] attention (top-k).
    2. Crop ratios: the thumbnail's [CLS] attention summed over the region each crop covers gives
       ``scale_i = R * (1 + p_i - mean(p))`` (clipped at 1), ``p = softmax((s - max s) / temperature)``
       (``crop_scales``); crop i keeps ``int(N_i * scale_i)`` (N_i: the crop's tokens after unpadding).
    3. Within each crop: top-k of ``l2norm(crop [CLS] attention) + l2norm(thumbnail [CLS] attention
       bilinearly resized to the unpadded stitched grid, at the crop's cells)``.

    [CLS] attention: the head mean of the LAST tower layer's [CLS] row (the reference reads
    ``attn_maps[-1]``, not the projector-feed layer), per tower view (view 0 = thumbnail, then one per
    crop), folded onto the layout's tokens by its tower map; ``reference_layer`` is 0-based on the
    24-layer reference tower (23 = last) and keeps its relative depth on other towers.

    Applicability: needs a tower with [CLS] and layouts with a thumbnail plus crops (LLaVA-NeXT); on
    other models it declares itself not applicable, and a sample whose layout is not a base view plus
    mapped crops is refused (MethodNotApplicable).

    As the code by default: (a) ``scores="logits"``: the "attention" is the head mean of the
    pre-softmax scores ``q.k x scale`` (the code's custom CLIP attention averages them before the
    softmax; the recorded ``attention_logits``). ``scores="probabilities"`` reads the head-mean softmax
    instead, as the paper describes [CLS] attention; with probabilities (summing to 1 over the
    thumbnail) and the code's temperature 10 the crop ratios are close to equal. (b) ``regions="bands"``:
    thumbnail patch (i, j) counts for crop (min(i // (side // rows), rows - 1), likewise j), the code's
    equal integer bands; ``regions="pixels"`` assigns it to the crop whose unpadded token boxes contain
    its pixel-box centre (the region it shows). (c) ``count="reference"``: the thumbnail keeps
    ``int(N_base R)`` and crop i ``int(N_i scale_i)``, the code's floors, so fewer than the budget stay
    (``kept_counts`` says how many); ``count="budget"`` keeps exactly the budget (the crops share the rest
    by largest remainders). The one deviation left: R is the budget's ratio n_keep / N where the code
    fixes 0.25 (R = 0.25 is the code). Crops are found from the layout's tower map; a crop that
    unpadding removes entirely holds no tokens and no band.
    ``Stage.scores``: the thumbnail's [CLS] attention on thumbnail tokens, the combined score on crop tokens.
    """

    reference: ClassVar[str] = (
        "Liu et al., 'Compression with Global Guidance: Towards Training-free High-Resolution MLLMs Acceleration' "
        "(GlobalCom², 'Global Compression Commander'), arXiv:2501.05179. Code: github.com/xuyang-liu16/GlobalCom2, "
        "llava/model/llava_arch.py (retention_ratio 0.25, generate_scale_for_crop_features: temperature 10, "
        "compress_thumbnail, interpolate_and_split_cls_attn_scores, select_topk_crop_features: l2-normalised crop "
        "+ thumbnail scores) and llava/model/multimodal_encoder/apply_customvit.py (head-mean pre-softmax scores, "
        "attn_maps[-1]). Defaults follow the code (logits, integer bands, int(N x ratio) counts) with the ratio "
        "set by the budget; scores='probabilities', regions='pixels', count='budget' are the named deviations.")

    temperature: float = 10.0
    reference_layer: int = REFERENCE_TOWER_DEPTH - 1
    scores: str = "logits"
    regions: str = "bands"
    count: str = "reference"

    def __post_init__(self):
        super().__post_init__()
        for name, allowed in (("scores", tuple(SCORE_SIGNALS)), ("regions", REGION_RULES), ("count", COUNT_RULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"globalcom2: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"globalcom2: temperature must be a finite number > 0, got {self.temperature!r}")
        check_tower_layer("globalcom2", self.reference_layer)

    def applicability(self, model: ModelFacts) -> str | None:
        reason = super().applicability(model)
        if reason is None and not model.multi_view:
            reason = SINGLE_VIEW_REASON
        return reason

    def layer(self, model: ModelFacts) -> int:
        """The reference's last layer is this tower's last layer; others keep their relative depth."""
        if self.reference_layer == REFERENCE_TOWER_DEPTH - 1:
            return model.vision_layers - 1
        return min(int(round(self.reference_layer * model.vision_layers / REFERENCE_TOWER_DEPTH)),
                   model.vision_layers - 1)

    def cls_layers(self, model: ModelFacts) -> tuple[int, ...]:
        return (self.layer(model),)

    def cls_need(self, model: ModelFacts) -> SignalNeed:
        return SignalNeed(SCORE_SIGNALS[self.scores], "tower", self.layer(model), "cls")

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        if self.applicability(model) is not None:
            return ()  # select() raises MethodNotApplicable; a sweep's shared recording needs nothing
        return (self.cls_need(model),)

    def crop_ratios(self, layout: VisualLayout, cls: np.ndarray, base: int, crops, retention: float) -> np.ndarray:
        """Each crop's retention ratio from the thumbnail's scores summed over the crop's region."""
        base_tokens = np.flatnonzero(layout.group == base)
        if self.regions == "bands":
            places, rows, cols = crop_grid(layout, crops)
            grp = layout.groups[base]
            band_rows, band_cols = max(grp.rows // rows, 1), max(grp.cols // cols, 1)
            cells = layout.cell[base_tokens]
            band = (np.minimum(cells[:, 0] // band_rows, rows - 1) * cols
                    + np.minimum(cells[:, 1] // band_cols, cols - 1))
            sums = np.bincount(band, weights=cls[base_tokens], minlength=rows * cols)
            return crop_scales(sums, retention, self.temperature)[[r * cols + c for r, c in places]]
        boxes = layout.boxes[base_tokens]
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
        region = []
        for tokens in crops:
            b = layout.boxes[tokens]
            x0, y0, x1, y1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
            inside = (centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)
            region.append(float(cls[base_tokens[inside]].sum()))
        return crop_scales(region, retention, self.temperature)

    def shares(self, layout: VisualLayout, n_keep: int, cls: np.ndarray, base: int, crops) -> tuple[int, list[int]]:
        """(thumbnail count, count of each crop) for ``n_keep`` tokens."""
        n_base = int(np.sum(layout.group == base))
        sizes = [len(c) for c in crops]
        retention = n_keep / layout.n_tokens
        base_keep = min(int(n_base * retention), n_base)
        scales = self.crop_ratios(layout, cls, base, crops, retention)
        if self.count == "reference":
            return base_keep, [int(n * s) for n, s in zip(sizes, scales)]
        base_keep = max(base_keep, n_keep - sum(sizes))
        weights = [n * s for n, s in zip(sizes, scales)]
        return base_keep, weighted_split(n_keep - base_keep, weights, sizes)

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return (len(self.select(context).final_kept),)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        layout = context.layout
        base, crop_group, crops = _crops(layout)
        cls = row_scores(context, self.cls_need(model))
        base_keep, crop_keep = self.shares(layout, context.n_keep, cls, base, crops)
        base_tokens = np.flatnonzero(layout.group == base)
        scores = cls.copy()
        kept = [int(i) for i in top_k(cls, base_keep, among=base_tokens)]
        grp = layout.groups[base]
        thumbnail = np.full((grp.rows, grp.cols), np.nan)
        thumbnail[layout.cell[base_tokens, 0], layout.cell[base_tokens, 1]] = cls[base_tokens]
        stitched = layout.groups[crop_group]
        guide = bilinear(thumbnail, stitched.rows, stitched.cols)
        for tokens, k in zip(crops, crop_keep):
            own = normalized(cls[tokens][None])[0]
            global_ = normalized(guide[layout.cell[tokens, 0], layout.cell[tokens, 1]][None])[0]
            scores[tokens] = own + global_
            kept += [int(i) for i in top_k(scores, k, among=tokens)]
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), tuple(scores), position=self.entry_position(context))])
