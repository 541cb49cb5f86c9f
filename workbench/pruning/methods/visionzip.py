"""VisionZip: dominant tokens by [CLS] attention, contextual tokens by merging the rest into a few
uniformly spaced targets (key similarity), on the tower's projector-feed features, before the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.cls_attention import (REFERENCE_FEED_LAYER, ClsAttentionMethod, check_crop_rule,
                                                     check_tower_layer, cls_need, group_members, per_view_count,
                                                     row_scores, size_shares, tower_layer)
from workbench.layout import VisualLayout
from workbench.pruning.padded_grid import PaddedGrid, code_sequence, padded_grid_for
from workbench.pruning.plan import PRE_LLM, Append, KeepPlan, Merge, Stage, cls_token, padded_patch, tower_where
from workbench.pruning.ranking import cosine_matrix, head_mean, top_k
from workbench.pruning.registry import register_method
from workbench.pruning.tower_output import cls_before, tower_output_stages
from workbench.pruning.tower_stages import in_tower_reason
from workbench.tower_map import tower_features, tower_views

MERGE_RULES = ("reference", "mean")
# What fills the dominant slot the code gives the [CLS]: "reference", the [CLS] itself, passed to the LLM
# (the code); "empty", nothing (one patch fewer, no [CLS]); "patch", one more patch.
CLS_SLOTS = ("reference", "empty", "patch")
# Where a contextual token goes: "end", after its group's dominant tokens (clip_encoder.py line 83
# concatenates [dominant, contextual]); "target", merged into its target at the target's own place.
CONTEXTUAL_PLACES = ("end", "target")
# Where the contextual tokens are merged: "tower", on the tower's hidden states at the projector-feed
# layer, before the projector (the code); "embedding", on the projected embeddings at the LLM input.
MERGE_PLACES = ("tower", "embedding")


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
    for every budget.

    Multi-crop layouts (LLaVA-NeXT), ``crops="reference"`` (the default), as the code: every view (the
    base image, each crop) runs both steps on its own patches, padding patches included, with the same
    count T (the budget's ratio of a view, ``per_view_count``; ``encode_images_visionzip_multi`` on the
    concatenated views), and the LLM gets the code's sequence (llava_arch.py lines 107-121,
    ``restore_image_features_sorted`` lines 42-80): the base view's [CLS, dominant, contextual]; the
    crops' dominant patches in raster order of the PADDED stitched grid, no unpadding, no newline (the
    layout's newlines are left out, ``separators="dropped"``; a padding patch enters as its projected
    tower feature, ``padded_patch``, at its raster place); every crop's [CLS]; every crop's contextual
    tokens, crop by crop. A crop's contextual tokens may be made of padding patches, which are no rows
    before the LLM, so the pre-LLM stage brings every chosen patch in and a second stage, before decoder
    layer 0 (on the same embeddings: no layer computes the rows between), makes those tokens and
    appends them at the end of the visual block (``kept_counts`` gives both stages; the last is what the
    LLM computes). ``crops="budget"`` (the old rule): the layout's groups (base view, stitched unpadded
    tiles) each do this with their share of exactly the budget by size, on the layout's tokens. In a
    composition (``visionzip+...``) both stages are the first method's: the second acts among the
    survivors from decoder layer 1 on.

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
    ``n_keep`` visual tokens, the [CLS] among them (``kept_counts``). Under ``crops="budget"`` a group
    stitched from several AnyRes crops loses one patch per crop and passes their [CLS] tokens after its
    patches, before its contextual tokens (the code's [crop patches, [CLS]s, contextual] order).
    "empty" leaves the slot empty (one patch fewer per view, no [CLS]); "patch" spends it on one more
    patch (exactly ``n_keep`` patches).

    Where the merges act (``merge_at``): "tower" (default, as the code, clip_encoder.py lines 58-83)
    merges on the tower's hidden states at the projector-feed layer, BEFORE the projector: a
    ``"tower:<feed layer>"`` stage keeps the dominant patches and the targets and folds each target's
    sources into it (``target + mean(sources)`` on the tower's features; the projector then runs on the
    merged vectors), and a ``pre_llm`` stage brings the [CLS] in before the first kept patch and moves
    the contextual tokens behind the dominant ones in target order (``tower_output``; under
    ``position="original"`` the [CLS] takes the first kept patch's position id, the contextual tokens
    the image's last patch's, as with "embedding"). ``kept_counts`` gives both
    stages: the tower's patches, then the LLM's tokens, the [CLS] included. "embedding" (the old
    behaviour) merges the projected embeddings at the LLM input in one ``pre_llm`` stage (the projector
    is nonlinear, so the vectors differ). Tower stages need a single-view [CLS] tower whose patches
    are the LLM's visual tokens one to one (``tower_stages.in_tower_reason``), the code's own domain.
    On the multi-crop code path (``crops="reference"`` on a multi-view tower, whose padding patches are
    no tower-stage tokens) "tower" makes each contextual token as the code does all the same: an
    ``Append`` on the tower's features (``space="tower"``), the projector on target + mean(sources) of
    the view's feed-layer patches, padding included; "embedding" merges the projected rows there too.

    Deviations (documented): (a) ``crops="budget"`` on multi-view towers, and ``contextual_at="target"``
    on the multi-crop path, merge the contextual tokens from the projected embeddings at the LLM
    input, not from the tower's hidden states (see ``merge_at``). (b) ``crops="budget"`` only: the crops' [CLS] tokens follow the
    stitched group, whose patches are the layout's (unpadded) tokens, not the code's padded grid, and
    the groups of our layout (base, stitched tiles) stand in for the crops, read through the layout's
    tower map. (c) The reference's similarity metric is the head-MEAN of the layer's keys ([N, d]), as
    here (the recording's [N, H*d] keys averaged over the tower's heads).
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
        "at its target). Multi-crop: per view with one count T and the code's LLM sequence (visionzip/llava_arch.py "
        "lines 107-121, restore_image_features_sorted lines 42-80: base [CLS, dominant, contextual], the crops' dominant "
        "patches on the padded stitched grid in raster order, padding included, no newline, every crop's [CLS], every "
        "crop's contextual tokens; crops=budget: per-group shares on the layout's tokens). Merges on the tower's "
        "feed-layer hidden states before the projector, as the code, on the multi-crop path too (merge_at=embedding: on "
        "the projected embeddings; crops=budget on multi-view towers always merges there).")

    contextual_ratio: float = 10 / 64
    merge: str = "reference"
    reference_layer: int = REFERENCE_FEED_LAYER
    cls_slot: str = "reference"
    contextual_at: str = "end"
    crops: str = "reference"
    merge_at: str = "tower"

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
        if self.merge_at not in MERGE_PLACES:
            raise ValueError(f"visionzip: merge_at must be one of {MERGE_PLACES}, got {self.merge_at!r}")
        check_tower_layer("visionzip", self.reference_layer)
        check_crop_rule("visionzip", self.crops)

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

    def weights(self, sources) -> tuple[float, ...]:
        """A contextual token's weights: the code's target + mean(sources), or the plain mean."""
        if self.merge == "mean":
            return (1.0 / (len(sources) + 1),) * (len(sources) + 1)
        return (1.0,) + (1.0 / max(len(sources), 1),) * len(sources)

    def view_choice(self, row: np.ndarray, keys: np.ndarray, count: int):
        """One view's code rule (clip_encoder.py lines 50-80) on its own patches, for ``count`` tokens:
        (dominant patches sorted, whether its [CLS] takes a dominant slot, [(target, sources)] in target
        order), all patch indices of the view, padding patches included."""
        n_dominant, n_contextual = self.split(count)
        slot = self.cls_slot != "patch" and n_dominant > 0
        dominant = top_k(row, n_dominant - slot)
        remaining = np.setdiff1d(np.arange(len(row)), dominant)
        if n_contextual == 0 or len(remaining) == 0:
            return dominant, slot, []
        targets = remaining[::max(1, len(remaining) // n_contextual)][:n_contextual]
        sources = np.setdiff1d(remaining, targets)
        assigned = (np.argmax(cosine_matrix(keys[sources], keys[targets]), axis=1) if len(sources)
                    else np.zeros(0, dtype=np.int64))
        return dominant, slot, [(int(t), sources[assigned == i]) for i, t in enumerate(targets)]

    def code_grid(self, context: SelectionContext) -> PaddedGrid | None:
        """The padded stitched grid the code's multi-crop sequence is built on (``crops="reference"`` on
        a multi-view layout), None where the layout's groups stand in for the crops."""
        if self.crops != "reference" or len(context.layout.tower_owner) < 2:
            return None
        return padded_grid_for(context.layout, "visionzip", "visionzip:crops=budget")

    def select_views(self, context: SelectionContext, grid: PaddedGrid, attention: np.ndarray) -> KeepPlan:
        """The code's multi-crop sequence (llava_arch.py lines 107-121 and ``restore_image_features_sorted``):
        the base view's [CLS, dominant, contextual], then the crops' dominant patches in raster order of
        the padded stitched grid (padding patches included, no newline), every crop's [CLS], then every
        crop's contextual tokens, crop by crop. The pre-LLM stage brings every chosen patch in (a crop's
        contextual members at their raster places) and makes the base view's contextual tokens; the
        stage before decoder layer 0 (on the same embeddings) makes the crops' and moves them to the end.
        Under ``merge_at="tower"`` each contextual token is made on the tower's features (``Append``
        ``space="tower"``: the projector on the weighted sum of its patches at the feed layer)."""
        layout, model = context.layout, context.require_model()
        layer, n = self.layer(model), context.n_visual
        owner, sizes = layout.tower_owner, [len(o) for o in layout.tower_owner]
        rows = tower_views(context.recording, layout, "attention", layer, "cls")
        keys = [head_mean(k, model.vision_heads) for k in tower_views(context.recording, layout, "visual_keys", layer, "tokens")]
        choices = [self.view_choice(rows[v].reshape(-1), keys[v],
                                    min(per_view_count(layout, context.n_keep, sizes[v]), sizes[v]))
                   for v in range(len(sizes))]

        def name(view: int, patch: int) -> int:
            token = int(owner[view][int(patch)])
            return token if token >= 0 else padded_patch(n, sizes, view, int(patch))

        base, tiles = owner[0], np.flatnonzero(layout.group == grid.group)
        dominant, slot, contextual = choices[0]
        passes = self.cls_slot == "reference"
        space = "tower" if self.merge_at == "tower" else "embedding"  # the code merges the feed layer's states
        kept = [name(0, p) for p in dominant] + ([cls_token(n, 0)] if slot and passes else [])
        appends = [Append(cls_token(n, 0), (), (1.0,), before=int(base.min()))] if slot and passes else []
        merges = []
        for target, sources in contextual:
            kept.append(name(0, target))
            members = tuple(name(0, p) for p in sources)
            if self.contextual_at == "end":
                appends.append(Append(name(0, target), members, self.weights(members), after=int(base.max()),
                                      space=space))
            elif members:
                merges.append(Merge(name(0, target), members, self.weights(members)))
        chosen = {v: list(d) + [p for t, srcs in c for p in (t, *srcs)] for v, (d, _, c) in enumerate(choices) if v}
        crop_kept, crop_appends = code_sequence(layout, grid, chosen)
        kept += crop_kept
        appends += crop_appends
        crop_cls = [cls_token(n, v) for v, (_, s, _) in enumerate(choices) if v and s and passes]
        kept += crop_cls
        appends += [Append(token, (), (1.0,), after=int(tiles[-1])) for token in crop_cls]
        entry = Stage(PRE_LLM, tuple(sorted(kept)), tuple(attention), tuple(merges), position=self.entry_position(context),
                      appends=tuple(appends), separators="dropped")
        made, folded, dropped = [], [], set()
        for view, (_, _, crop_contextual) in enumerate(choices):
            for target, sources in crop_contextual if view else ():
                members = tuple(name(view, p) for p in sources)
                dropped.update(members)
                if self.contextual_at == "end":
                    made.append(Append(name(view, target), members, self.weights(members), space=space))
                elif members:
                    folded.append(Merge(name(view, target), members, self.weights(members)))
        if not made and not folded:
            return self.plan(context, [entry])
        crops = Stage(0, tuple(k for k in entry.kept if k not in dropped), None, tuple(folded),
                      position=self.entry_position(context), appends=tuple(made))
        return self.plan(context, [entry, crops])

    def merges_in_tower(self, context: SelectionContext) -> bool:
        """Whether the plan merges on the tower's features at the projector-feed layer, as the code:
        ``merge_at="tower"`` on a single-view [CLS] tower whose patches are the LLM's visual tokens
        (``in_tower_reason`` None), outside the multi-crop code path (``code_grid``)."""
        return (self.merge_at == "tower" and in_tower_reason(context.require_model()) is None
                and self.code_grid(context) is None)

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        """The visual tokens the LLM receives, the [CLS] tokens passed included; under tower merging
        the tower stage's patches first, then what the ``pre_llm`` stage passes on (when it exists)."""
        if self.code_grid(context) is not None:
            return tuple(len(stage.kept) for stage in self.select(context).stages)
        kept = passed = contextual = 0
        for share, views in zip(size_shares(context.layout, context.n_keep), group_views(context.layout)):
            if share:
                n_dominant, n_contextual = self.split(share)
                kept += n_dominant + n_contextual
                contextual += n_contextual
                slots = len(self.cls_views(n_dominant, views))
                if self.cls_slot == "empty":
                    kept -= slots
                elif self.cls_slot == "reference":
                    passed += slots
        if not self.merges_in_tower(context):
            return (kept,)
        moved = self.contextual_at == "end" and contextual > 0
        return (kept - passed,) + ((kept,) if passed or moved else ())

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        layer = self.layer(model)
        attention = row_scores(context, cls_need(layer))
        grid = self.code_grid(context)
        if grid is not None:
            return self.select_views(context, grid, attention)
        # Per-view tower keys folded onto the layout (mean of each token's patches; the identity on
        # LLaVA-1.5-style towers), like the [CLS] scores (see cls_attention.row_scores).
        keys = head_mean(tower_features(context.recording, context.layout, "visual_keys", layer), model.vision_heads)
        patches, cls, contextual = [], [], []  # contextual: (target, sources, weights, the group's last token)
        n = context.n_visual
        for members, share, views in zip(group_members(context.layout), size_shares(context.layout, context.n_keep),
                                         group_views(context.layout)):
            if share == 0:
                continue
            n_dominant, n_contextual = self.split(share)
            cls_views = self.cls_views(n_dominant, views)
            dominant = top_k(attention, n_dominant - len(cls_views), among=members)
            patches += [int(i) for i in dominant]
            if self.cls_slot == "reference":
                # One view: its [CLS] is the first dominant token (clip_encoder.py line 58); stitched
                # crops: their [CLS] tokens follow the crops' patches (llava_arch.py).
                place = {"before": int(members[0])} if len(views) == 1 else {"after": int(members[-1])}
                cls += [Append(cls_token(n, v), (), (1.0,), **place) for v in cls_views]
            remaining = np.setdiff1d(members, dominant)  # sorted, index order
            if n_contextual == 0:
                continue
            step = max(1, len(remaining) // n_contextual)
            targets = remaining[::step][:n_contextual]
            patches += [int(i) for i in targets]
            sources = np.setdiff1d(remaining, targets)
            assigned = (np.argmax(cosine_matrix(keys[sources], keys[targets]), axis=1) if len(sources)  # first max wins
                        else np.zeros(0, dtype=np.int64))
            for t, target in enumerate(targets):
                group = tuple(int(i) for i in sources[assigned == t])
                contextual.append((int(target), group, self.weights(group), int(members[-1])))
        position = self.entry_position(context)
        if self.merges_in_tower(context):
            # The code's own place: the merges on the feed layer's hidden states, before the projector
            # (clip_encoder.py lines 75-80), then [CLS, dominant, contextual] (lines 58, 83).
            merges = [Merge(t, group, w) for t, group, w, _ in contextual if group]
            moved = [t for t, *_ in contextual] if self.contextual_at == "end" else []
            return self.plan(context, tower_output_stages(
                tower_where(model.projector_feed_tower_layer), patches, tuple(attention), merges, position,
                cls_before(n, patches) if cls else (), moved))
        if self.contextual_at == "end":
            merges, appends = [], cls + [Append(t, group, w, after=last) for t, group, w, last in contextual]
        else:
            merges, appends = [Merge(t, group, w) for t, group, w, _ in contextual if group], cls
        kept = tuple(sorted(patches + [a.token for a in cls]))
        stage = Stage(PRE_LLM, kept, tuple(attention), tuple(merges), appends=tuple(appends), position=position)
        return self.plan(context, [stage])
