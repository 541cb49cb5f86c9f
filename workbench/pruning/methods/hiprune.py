"""HiPrune: anchors from an object-centric middle tower layer, their spatial neighbours as buffers, and
registers from a deep layer's global attention; everything else is dropped before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.methods.cls_attention import group_members, row_scores, size_shares, tower_layer
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

# The reference configurations: (1-based object layer, tower depth, 0-based projector-feed layer).
CLIP_REFERENCE = (9, 24, 22)  # LLaVA-1.5 / LLaVA-NeXT: CLIP ViT-L/14-336, deep = attentions[-2]
QWEN_REFERENCE = (16, 32, 31)  # Qwen2.5-VL: 32-layer tower, deep = its last layer


NEIGHBOUR_RULES = ("flat", "grid")


def _neighbours(layout, members: np.ndarray) -> dict[int, list[int]]:
    """Token -> its up/down/left/right neighbours inside the same group grid."""
    at = {(int(layout.cell[i, 0]), int(layout.cell[i, 1])): int(i) for i in members}
    out = {}
    for i in members:
        r, c = int(layout.cell[i, 0]), int(layout.cell[i, 1])
        out[int(i)] = [at[p] for p in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)) if p in at]
    return out


def _flat_neighbours(layout, members: np.ndarray) -> dict[int, list[int]]:
    """Token -> the reference's flat "neighbours": row-major index -1, +1, -W, +W within its group
    (W = the group's columns), each clamped to the group's first..last token (LLaVA/llava/model/
    llava_arch.py, encode_images: ``cat([i, i-1, i+1, i-24, i+24]).clamp(0, 575)``), so a row's last
    token takes the next row's first, and clamping can add the group's first or last token."""
    order = sorted((int(layout.cell[i, 0]), int(layout.cell[i, 1]), int(i)) for i in members)
    flat = [i for _, _, i in order]
    local = {i: n for n, i in enumerate(flat)}
    cols = int(layout.groups[int(layout.group[flat[0]])].cols) if flat else 1
    last = len(flat) - 1
    out = {}
    for i in flat:
        n = local[i]
        out[i] = [flat[min(max(n + d, 0), last)] for d in (-1, 1, -cols, cols)]
    return out


@register_method("hiprune")
@dataclass(frozen=True)
class HiPrune(PreLLMMethod):
    """HiPrune, per token group (crop) with its share of the budget ``k`` (by size; the reference gives
    every crop ``budget / crops``):

    1. Anchors: the ``round(k * alpha / 5)`` tokens (Python rounding, as the reference) with the highest
       mean received attention at the object layer.
    2. Buffers: the up/down/left/right grid neighbours of the anchors (anchors + buffers <= 5 per anchor).
    3. Registers: the rest of the budget, the highest mean received attention at the deep layer among
       the tokens not yet chosen.

    Attention is the "global" score of the reference code: head mean, then mean over every query row
    (our tower rows "mean"; on CLIP that includes the [CLS] query, as in the reference), on the patch
    keys. It needs no [CLS], so HiPrune runs on every tower (the reference ships LLaVA and Qwen2.5-VL).

    Layers: object layer ``object_layer`` (1-based) of a 24-layer CLIP tower (9) for towers with a
    [CLS], ``object_layer_no_cls`` of a 32-layer Qwen2.5-VL tower (16) for the others; the deep layer
    is the projector-feed layer (CLIP: attentions[-2]; Qwen2.5-VL: the last layer). A reference layer
    keeps its relative depth on this tower (``tower_layer``): on the shipped 3-layer tower, object layer
    9 of 24 -> 0-based layer 1, deep -> layer 2.

    Tower patches are folded onto the layout's tokens by the layout's tower map (mean over the patches
    a token owns: the 2x2 merge block on Qwen2-VL/2.5-VL, where the reference code also scores
    merged tokens; every crop of a LLaVA-NeXT image; see ``cls_attention.row_scores``).

    Buffers (``neighbours``): "flat" (default, the reference code) takes row-major indices +-1 and
    +-row width within the group, clamped to the group, so a token at a row's end gets the next row's
    first token as a "neighbour" and clamping can add the group's first or last token; "grid" takes
    true grid neighbours within the group (the paper's "spatial neighbours").

    Deviations: when anchors + buffers exceed ``k``
    (tiny budgets, large ``alpha``) we keep anchors first, then buffers by object-layer attention (the
    reference would fail there). ``Stage.scores`` holds the deep-layer attention.
    """

    scored_by: ClassVar[str] = "visual_attention"

    reference: ClassVar[str] = (
        "Liu et al., 'HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision "
        "Encoders' (arXiv 2025; id not checked here). Code: github.com/Danielement321/HiPrune, LLaVA/llava/model/llava_arch.py "
        "(encode_images: global attention = head mean then query mean, shallow = attentions[OBJECT_LAYER-1], "
        "deep = attentions[mm_vision_select_layer=-2], anchors round(N*alpha/5), +-1/+-24 neighbours, deep top-k "
        "for the rest) and Qwen2_5_VL/qwen2_5_vl_HiPrune.py (object layer 16, deep = last layer); defaults "
        "alpha=0.1, object layer 9 (README). The paper says 'spatial neighbours'; the code's flat +-1 wraps "
        "across rows and clamps: we follow the code (neighbours='flat'); neighbours='grid' is the paper's.")

    alpha: float = 0.1
    object_layer: int = CLIP_REFERENCE[0]
    object_layer_no_cls: int = QWEN_REFERENCE[0]
    neighbours: str = "flat"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"hiprune: alpha must be a number in [0, 1], got {self.alpha!r}")
        for name, depth in (("object_layer", CLIP_REFERENCE[1]), ("object_layer_no_cls", QWEN_REFERENCE[1])):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= depth:
                raise ValueError(f"hiprune: {name} must be a 1-based layer in 1..{depth}, got {value!r}")
        check_choice("hiprune", "neighbours", self.neighbours, NEIGHBOUR_RULES)

    def layers(self, model: ModelFacts) -> tuple[int, int]:
        """(object layer, deep layer), 0-based on this model's tower."""
        if model.has_cls_token:
            layer, depth, feed = self.object_layer, CLIP_REFERENCE[1], CLIP_REFERENCE[2]
        else:
            layer, depth, feed = self.object_layer_no_cls, QWEN_REFERENCE[1], QWEN_REFERENCE[2]
        obj = tower_layer(layer - 1, model, reference_depth=depth, reference_feed=feed)
        return obj, model.projector_feed_tower_layer

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return tuple(SignalNeed("attention", "tower", layer, "mean") for layer in sorted(set(self.layers(model))))

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        obj_layer, deep_layer = self.layers(model)
        shallow = row_scores(context, SignalNeed("attention", "tower", obj_layer, "mean"))
        deep = row_scores(context, SignalNeed("attention", "tower", deep_layer, "mean"))
        kept = []
        for members, k in zip(group_members(context.layout), size_shares(context.layout, context.n_keep)):
            if k == 0:
                continue
            n_anchor = min(int(round(k * self.alpha / 5)), k)
            anchors = top_k(shallow, n_anchor, among=members)
            near = (_flat_neighbours if self.neighbours == "flat" else _neighbours)(context.layout, members)
            buffers = sorted({j for a in anchors for j in near[int(a)]} - {int(a) for a in anchors})
            if n_anchor + len(buffers) > k:
                buffers = list(top_k(shallow, k - n_anchor, among=buffers))
            chosen = [int(a) for a in anchors] + [int(b) for b in buffers]
            rest = np.setdiff1d(members, chosen)
            registers = top_k(deep, k - len(chosen), among=rest)
            kept += chosen + [int(r) for r in registers]
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), tuple(deep), position=self.entry_position(context))])
