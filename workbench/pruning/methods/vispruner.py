"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing near-duplicates
from the rest in rounds of bipartite matching, all before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import SelectionContext, check_choice
from workbench.pruning.methods.cls_attention import (REFERENCE_FEED_LAYER, ClsAndFeaturesMethod, check_crop_rule,
                                                     check_tower_layer, cls_need, group_members, per_view_count,
                                                     row_scores, size_shares)
from workbench.pruning.padded_grid import PaddedGrid, code_sequence, padded_grid_for
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import normalized
from workbench.pruning.registry import register_method
from workbench.tower_map import owners, tower_views

REFERENCE_ROUND = 8  # tokens the reference removes per matching round at most
# The LLM sequence on multi-view layouts: "code", the code's (padding patches passed, no newlines);
# "layout", the model's own unpadded arrangement with its newlines (padding patches lost).
SEQUENCES = ("code", "layout")


def attention_order(scores: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``members`` by descending score (ties: lower index first; NaN last)."""
    values = np.nan_to_num(np.asarray(scores, dtype=np.float64)[members], nan=-np.inf)
    return members[np.lexsort((members, -values))]


def remove_duplicates(features: np.ndarray, residual: np.ndarray, keep: int,
                      per_round: int = REFERENCE_ROUND) -> np.ndarray:
    """VisPruner's de-duplication: while more than ``keep`` tokens remain, split the ordered
    ``residual`` alternately into A (positions 0, 2, ...) and B (1, 3, ...), score each A token by its
    highest cosine to any B token, drop the ``r = min(per_round, len - keep, len(A))`` highest-scoring
    A tokens (ties: earlier in A first), and continue with the rest of A (by descending score) followed
    by B. Returns the remaining tokens in that order."""
    unit = normalized(features)
    residual = np.asarray(residual, dtype=np.int64)
    while keep > 0:
        a, b = residual[0::2], residual[1::2]
        r = min(per_round, len(residual) - keep, len(a))
        if r <= 0 or len(b) == 0:
            break
        best = (unit[a] @ unit[b].T).max(axis=1)
        order = np.lexsort((np.arange(len(a)), -best))  # descending similarity, stable
        residual = np.concatenate([a[order[r:]], b])
    return residual


@register_method("vispruner")
@dataclass(frozen=True)
class VisPruner(ClsAndFeaturesMethod):
    """VisPruner. At the projector-feed tower layer (``attentions[-2]`` / ``hidden_states[-2]``, layer 22 of
    LLaVA's 24-layer CLIP tower; here ``projector_feed_tower_layer``), for ``k`` tokens (the budget on a
    single view; on a multi-view layout every view with the same count, see below):

    1. Important tokens: the ``int(k * important_ratio)`` tokens with the highest [CLS] attention
       (head mean; the reference means over heads too). Ties: lower index first.
    2. Diverse tokens: the remaining tokens, ordered by descending [CLS] attention, are de-duplicated
       in rounds until ``k - important`` are left: the ordered list is split alternately into A and B,
       each A token is scored by its highest cosine similarity to a B token (features: the tower's
       hidden states at that layer, patch tokens), the ``min(8, remaining - wanted)`` most similar A
       tokens are dropped, and the list becomes the rest of A (most similar first) followed by B.

    ``Stage.scores`` holds the [CLS] attention.

    Deviations: the reference breaks ties of ``argsort`` arbitrarily (torch); we take the lower index.
    It indexes A and B with fixed widths ``R // 2``, which fails (a broadcast error) when the residual
    count R is odd or when a round would drop more than A holds (tiny budgets); we let A hold the
    ``ceil(R / 2)`` even positions and cap a round at the size of A.

    Multi-view (AnyRes) layouts, ``crops="reference"`` (the default): as the code, every view (the base
    image, each crop) runs both steps on its own patches -- its own [CLS] row and features -- with the
    same count T (``encode_images`` on the concatenated views), T the budget's ratio of a view's
    patches (``per_view_count``). ``crops="budget"`` (the old rule): the layout's groups (base view,
    stitched tiles) each keep their share of exactly n_keep by size.

    The LLM sequence on multi-view layouts, ``sequence="code"`` (the default): the code's LLaVA-NeXT
    branch drops ``_unpad`` from the merge type (llava_arch.py line 207), so it stitches the crops'
    chosen patches on the PADDED grid (lines 246-250: ``permute(0, 2, 1, 3, 4).flatten(0, 3)``, raster
    order across crops) and puts the base view's chosen patches first (lines 251-252), with no image
    newline; the sequence is renumbered 0..L'-1 (``position``). We give the LLM that sequence: a chosen
    crop patch in the padding, which has no token in the model's unpadded layout, enters as its tower
    feature through the projector (``padded_patch``, placed at its raster place), and the layout's
    newlines are left out (``separators="dropped"``). Every such patch counts in ``kept_counts``, every
    layer's tokens and the FLOPs; it has no box on the image. ``sequence="layout"`` (the former
    default): the model's own unpadded arrangement with its newlines, where a chosen padding patch has
    no token and is lost (``kept_counts`` says how many survive). With ``crops="budget"`` (no padding patch
    is chosen) ``sequence`` only says whether the newlines are left out ("code") or kept ("layout").
    """

    reference: ClassVar[str] = (
        "Zhang et al., 'Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in "
        "VLMs' (VisPruner), arXiv:2412.01818. Code: github.com/Theia-4869/VisPruner, llava/model/llava_arch.py "
        "(encode_images: head-mean [CLS] row, argsort, important = int(T * r); duplicate removal in rounds of "
        "r = min(8, R - T_div) by max cosine of even to odd positions) and "
        "llava/model/multimodal_encoder/clip_encoder.py (feature_select: attentions/hidden_states[-2]); default "
        "important_ratio 0.5 from llava/eval/model_vqa_loader.py. Paper and code agree; we follow the code, "
        "generalised to odd residual counts and tiny budgets; per view with one count T on multi-view layouts, the LLM "
        "getting the code's sequence (lines 207, 246-252: base view first, then the crops' chosen patches on the padded "
        "stitched grid in raster order, padding patches included, no newlines); sequence=layout: the model's unpadded "
        "arrangement, where a chosen padding patch is lost; crops=budget: per-group shares.")

    important_ratio: float = 0.5
    reference_layer: int = REFERENCE_FEED_LAYER
    crops: str = "reference"
    sequence: str = "code"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.important_ratio, bool) or not isinstance(self.important_ratio, (int, float)) \
                or not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio must be a number in [0, 1], got {self.important_ratio!r}")
        check_tower_layer("vispruner", self.reference_layer)
        check_crop_rule("vispruner", self.crops)
        check_choice("vispruner", "sequence", self.sequence, SEQUENCES)

    def split(self, n_keep: int) -> tuple[int, int]:
        """(important, diverse) for a budget of ``n_keep`` tokens: ``int(T * r)`` as the reference."""
        important = int(n_keep * self.important_ratio)
        return important, n_keep - important

    def choose(self, attention: np.ndarray, features: np.ndarray, members: np.ndarray, count: int) -> list[int]:
        """Both steps on ``members`` for ``count`` tokens: the important ones, then the de-duplicated rest."""
        if count == 0:
            return []
        n_important, n_diverse = self.split(count)
        ordered = attention_order(attention, members)
        kept = [int(i) for i in ordered[:n_important]]
        if n_diverse > 0:
            kept += [int(i) for i in remove_duplicates(features, ordered[n_important:], n_diverse)]
        return kept

    def per_view(self, context: SelectionContext) -> bool:
        return self.crops == "reference" and len(context.layout.tower_owner) > 1

    def code_grid(self, context: SelectionContext) -> PaddedGrid | None:
        """The padded stitched grid the code's sequence is built on (``sequence="code"`` on a multi-view
        layout), None where the layout's own arrangement is used."""
        if self.sequence != "code" or len(context.layout.tower_owner) < 2:
            return None
        return padded_grid_for(context.layout, "vispruner", "vispruner:sequence=layout")

    def entry_stage(self, context: SelectionContext, kept, attention, grid, appends=()) -> Stage:
        """The pre-LLM stage; on the code's sequence the layout's newlines are left out, as the code packs none."""
        return Stage(PRE_LLM, tuple(sorted(kept)), tuple(attention), position=self.entry_position(context),
                     appends=tuple(appends), separators="kept" if grid is None else "dropped")

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        if self.per_view(context):
            return (len(self.select(context).final_kept),)
        return (context.n_keep,)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        layout, need = context.layout, cls_need(self.layer(model))
        attention = row_scores(context, need)
        grid = self.code_grid(context)
        if self.per_view(context):
            rows = tower_views(context.recording, layout, need.signal, need.layer, need.rows)
            feature = self._feature_need(model)
            views = tower_views(context.recording, layout, feature.signal, feature.layer, feature.rows)
            chosen = {}
            for v, (row, view) in enumerate(zip(rows, views)):
                count = min(per_view_count(layout, context.n_keep, len(view)), len(view))
                chosen[v] = self.choose(row.reshape(-1), view, np.arange(len(view)), count)
            if grid is not None:
                kept, appends = code_sequence(layout, grid, chosen)
                return self.plan(context, [self.entry_stage(context, kept, attention, grid, appends)])
            owner = owners(layout, [len(v) for v in views])
            kept = {int(owner[v][p]) for v, patches in chosen.items() for p in patches if owner[v][p] >= 0}
            return self.plan(context, [self.entry_stage(context, kept, attention, grid)])
        features = context.features(self._feature_need(model))
        kept = []
        for members, share in zip(group_members(layout), size_shares(layout, context.n_keep)):
            kept += self.choose(attention, features, members, share)
        return self.plan(context, [self.entry_stage(context, kept, attention, grid)])
