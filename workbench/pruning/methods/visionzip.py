"""VisionZip: dominant tokens by [CLS] attention, contextual tokens by merging the rest into a few
uniformly spaced targets (key similarity), all before the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.cls_attention import (REFERENCE_FEED_LAYER, ClsAttentionMethod, check_tower_layer,
                                                     cls_need, group_members, row_scores, size_shares, tower_layer)
from workbench.layout import VisualLayout
from workbench.pruning.plan import PRE_LLM, Append, KeepPlan, Merge, Stage, cls_token
from workbench.pruning.ranking import cosine_matrix, head_mean, top_k
from workbench.pruning.registry import register_method
from workbench.tower_map import tower_features

MERGE_RULES = ("reference", "mean")
# What fills the dominant slot the code gives the [CLS]: "reference", the [CLS] itself, passed to the LLM
# (the code); "empty", nothing (one patch fewer, no [CLS]); "patch", one more patch.
CLS_SLOTS = ("reference", "empty", "patch")
# Where a contextual token goes: "end", after its group's dominant tokens (clip_encoder.py line 83
# concatenates [dominant, contextual]); "target", merged into its target at the target's own place.
CONTEXTUAL_PLACES = ("end", "target")


def group_views(layout: VisualLayout) -> list[list[int]]:
    """Per token group, the tower views (in tower order) whose patches feed it: one view per group on
    LLaVA-1.5 (and the base view of LLaVA-NeXT), several for a group stitched from AnyRes crops. A
    layout without a tower map is one view feeding its first group."""
    out: list[list[int]] = [[] for _ in layout.groups]
    if not layout.tower_owner:
        return [[0]] + out[1:] if out else out
    for view, owner in enumerate(layout.tower_owner):
        fed = owner[owner >= 0]
        if len(fed):
            out[int(np.bincount(layout.group[fed]).argmax())].append(view)
    return out


@register_method("visionzip")
@dataclass(frozen=True)
class VisionZip(ClsAttentionMethod):
    """VisionZip. At the projector-feed tower layer (``attentions[-2]`` = layer 22 of LLaVA's CLIP tower):

    1. Dominant tokens: the top [CLS]-attention tokens (the reference sums the [CLS] row over heads;
       we read the head mean, the same ranking).
    2. Contextual tokens: among the remaining tokens, in index order, targets at a uniform stride
       ``max(1, R // C)`` (the first C of them); every other remaining token joins the target whose
       key is most similar (cosine; ties to the earlier target) and is merged into it.

    Budget split: the reference's 54+10, 108+20, 162+30 for 64/128/192 tokens are one ratio, so
    ``contextual = round(n_keep * contextual_ratio)`` (10/64) and ``dominant = n_keep - contextual``
    for every budget. Each token group (crop) does this with its share of the budget by size, as the
    reference does per crop.

    Merge rule (``merge``): "reference" follows the code, ``contextual = target + mean(sources)``
    (weights 1 for the target and 1/c for each of its c sources; a target nothing joined stays as it
    is); "mean" averages target and sources.

    Contextual tokens' place (``contextual_at``): "end" (default, as the code, which concatenates
    ``[dominant, contextual]``, line 83) appends them after the group's dominant tokens, in target
    order (the plan's ``Append``, named by the target, inserted after the group's last patch; the
    LLM numbers the kept sequence contiguously, as after the code's concatenation, and under
    ``position="original"`` each takes that patch's position id). "target" writes each into
    its target at the target's own place among the dominant ones.

    [CLS] slot (``cls_slot``): the reference's dominant set includes the [CLS] token itself
    (visionzip/main.py line 7 passes ``dominant_num = dominant - 1`` to the top-k, clip_encoder.py
    lines 53-54 add index 0), so ``dominant=54`` is [CLS] + 53 patches, and the LLM receives the
    [CLS] output (projected, like the patches) as the first of the dominant tokens (masked_select
    keeps sequence order, line 58; line 83 concatenates [dominant, contextual]). "reference"
    (default) does the same: ``dominant - 1`` patches per view, the contextual targets strided over
    the ``N - dominant + 1`` remaining patches, and the plan passes the [CLS] (``Append`` of the
    reserved token ``cls_token(N)``, placed before the group's first patch), so the LLM gets exactly
    ``n_keep`` visual tokens, the [CLS] among them (``kept_counts``). A group stitched from several
    AnyRes crops loses one patch per crop and passes their [CLS] tokens after its patches, before its
    contextual tokens (llava_arch.py ``restore_image_features_sorted``: [crop patches, [CLS]s,
    contextual]). "empty" leaves the slot empty (one patch fewer per view, no [CLS]); "patch" spends
    it on one more patch (exactly ``n_keep`` patches).

    Deviations (documented): (a) the reference merges the tower's hidden states BEFORE the projector;
    our executor merges the projected embeddings at the LLM input (the projector is nonlinear, so
    this is not the same vector). (b) Multi-crop: see (d); the crops' [CLS] tokens follow the
    stitched group, whose patches are the layout's (unpadded) tokens, not the code's padded grid.
    (c) The reference's similarity metric is the
    head-MEAN of the layer's keys ([N, d]), as here (the recording's [N, H*d] keys averaged over
    the tower's heads).
    (d) Multi-crop towers (LLaVA-NeXT) are read per crop and folded onto the layout's tokens by the
    layout's tower map; the groups of our layout (base, stitched tiles) stand in for the crops.
    """

    reference: ClassVar[str] = (
        "Yang et al., 'VisionZip: Longer is Better but Not Necessary in Vision Language Models', "
        "arXiv:2412.04467. Code: github.com/dvlab-research/VisionZip, visionzip/clip_encoder.py "
        "(CLIPVisionTower_VisionZip.forward: attentions[-2] [CLS] row summed over heads, topk dominant; "
        "uniform-stride targets, argmax cosine of the layer's head-mean keys, target + mean of assigned), "
        "visionzip/utils.py (metric = head-mean keys), README (54+10 / 108+20 / 162+30). "
        "visionzip/main.py line 7 (dominant_num = dominant - 1: [CLS] fills one dominant slot and is passed to "
        "the LLM first, as the code; cls_slot='empty' leaves the slot empty, cls_slot='patch' gives it to a patch). "
        "Contextual tokens appended after the dominant ones (line 83; contextual_at='target' merges each in place "
        "at its target). Deviation: merge after the projector.")

    contextual_ratio: float = 10 / 64
    merge: str = "reference"
    reference_layer: int = REFERENCE_FEED_LAYER
    cls_slot: str = "reference"
    contextual_at: str = "end"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.contextual_ratio, bool) or not isinstance(self.contextual_ratio, (int, float)) \
                or not 0.0 <= self.contextual_ratio <= 1.0:
            raise ValueError(f"visionzip: contextual_ratio must be a number in [0, 1], got {self.contextual_ratio!r}")
        if self.merge not in MERGE_RULES:
            raise ValueError(f"visionzip: merge must be one of {MERGE_RULES}, got {self.merge!r}")
        if self.cls_slot not in CLS_SLOTS:
            raise ValueError(f"visionzip: cls_slot must be one of {CLS_SLOTS}, got {self.cls_slot!r}")
        if self.contextual_at not in CONTEXTUAL_PLACES:
            raise ValueError(f"visionzip: contextual_at must be one of {CONTEXTUAL_PLACES}, got {self.contextual_at!r}")
        check_tower_layer("visionzip", self.reference_layer)

    def layer(self, model: ModelFacts) -> int:
        return tower_layer(self.reference_layer, model)

    def cls_layers(self, model: ModelFacts) -> tuple[int, ...]:
        return (self.layer(model),)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        if self.applicability(model) is not None:
            return ()
        return (cls_need(self.layer(model)), SignalNeed("visual_keys", "tower", self.layer(model)))

    def split(self, n_keep: int) -> tuple[int, int]:
        """(dominant, contextual) for a budget of ``n_keep`` tokens."""
        contextual = min(int(math.floor(n_keep * self.contextual_ratio + 0.5)), n_keep)
        return n_keep - contextual, contextual

    def cls_views(self, n_dominant: int, views: list[int]) -> list[int]:
        """The views whose [CLS] fills a dominant slot (one each, as many as there are slots); none
        under ``cls_slot="patch"``."""
        return [] if self.cls_slot == "patch" else views[:n_dominant]

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        """The visual tokens the LLM receives, the [CLS] tokens passed included."""
        kept = 0
        for share, views in zip(size_shares(context.layout, context.n_keep), group_views(context.layout)):
            if share:
                n_dominant, n_contextual = self.split(share)
                kept += n_dominant + n_contextual
                if self.cls_slot == "empty":
                    kept -= len(self.cls_views(n_dominant, views))
        return (kept,)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        layer = self.layer(model)
        attention = row_scores(context, cls_need(layer))
        # Per-view tower keys folded onto the layout (mean of each token's patches; the identity on
        # LLaVA-1.5-style towers), like the [CLS] scores (see cls_attention.row_scores).
        keys = head_mean(tower_features(context.recording, context.layout, "visual_keys", layer), model.vision_heads)
        kept, merges, appends = [], [], []
        n = context.n_visual
        for members, share, views in zip(group_members(context.layout), size_shares(context.layout, context.n_keep),
                                         group_views(context.layout)):
            if share == 0:
                continue
            n_dominant, n_contextual = self.split(share)
            cls_views = self.cls_views(n_dominant, views)
            dominant = top_k(attention, n_dominant - len(cls_views), among=members)
            kept += [int(i) for i in dominant]
            if self.cls_slot == "reference":
                # One view: its [CLS] is the first dominant token (clip_encoder.py line 58); stitched
                # crops: their [CLS] tokens follow the crops' patches (llava_arch.py).
                place = {"before": int(members[0])} if len(views) == 1 else {"after": int(members[-1])}
                appends += [Append(cls_token(n, v), (), (1.0,), **place) for v in cls_views]
                kept += [cls_token(n, v) for v in cls_views]
            remaining = np.setdiff1d(members, dominant)  # sorted, index order
            if n_contextual == 0:
                continue
            step = max(1, len(remaining) // n_contextual)
            targets = remaining[::step][:n_contextual]
            kept += [int(i) for i in targets]
            sources = np.setdiff1d(remaining, targets)
            assigned = (np.argmax(cosine_matrix(keys[sources], keys[targets]), axis=1) if len(sources)  # first max wins
                        else np.zeros(0, dtype=np.int64))
            for t, target in enumerate(targets):
                group = tuple(int(i) for i in sources[assigned == t])
                weights = ((1.0 / (len(group) + 1),) * (len(group) + 1) if self.merge == "mean"
                           else (1.0,) + (1.0 / max(len(group), 1),) * len(group))
                if self.contextual_at == "end":
                    appends.append(Append(int(target), group, weights, after=int(members[-1])))
                elif group:
                    merges.append(Merge(int(target), group, weights))
        stage = Stage(PRE_LLM, tuple(sorted(kept)), tuple(attention), tuple(merges), appends=tuple(appends),
                      position=self.entry_position(context))
        return self.plan(context, [stage])
