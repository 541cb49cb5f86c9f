"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing near-duplicates
from the rest in rounds of bipartite matching, all before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.cls_attention import (REFERENCE_FEED_LAYER, ClsAndFeaturesMethod, check_crop_rule,
                                                     check_tower_layer, cls_need, group_members, per_view_count,
                                                     row_scores, size_shares)
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import normalized
from workbench.pruning.registry import register_method
from workbench.tower_map import owners, tower_views

REFERENCE_ROUND = 8  # tokens the reference removes per matching round at most


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
    patches (``per_view_count``). The code's LLaVA-NeXT branch then drops ``_unpad`` from the merge
    type (llava_arch.py line 211), so it passes every crop patch on, padding included, without
    newlines; our layouts are the model's own unpadded arrangement, where a chosen patch in the padding
    has no token and is lost (``kept_counts`` says how many survive). ``crops="budget"`` (the old
    rule): the layout's groups (base view, stitched tiles) each keep their share of exactly n_keep by
    size.
    """

    reference: ClassVar[str] = (
        "Zhang et al., 'Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in "
        "VLMs' (VisPruner), arXiv:2412.01818. Code: github.com/Theia-4869/VisPruner, llava/model/llava_arch.py "
        "(encode_images: head-mean [CLS] row, argsort, important = int(T * r); duplicate removal in rounds of "
        "r = min(8, R - T_div) by max cosine of even to odd positions) and "
        "llava/model/multimodal_encoder/clip_encoder.py (feature_select: attentions/hidden_states[-2]); default "
        "important_ratio 0.5 from llava/eval/model_vqa_loader.py. Paper and code agree; we follow the code, "
        "generalised to odd residual counts and tiny budgets; per view with one count T on multi-view layouts, where a "
        "chosen padded crop patch has no token in the model's unpadded layout (crops=budget: per-group shares).")

    important_ratio: float = 0.5
    reference_layer: int = REFERENCE_FEED_LAYER
    crops: str = "reference"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.important_ratio, bool) or not isinstance(self.important_ratio, (int, float)) \
                or not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio must be a number in [0, 1], got {self.important_ratio!r}")
        check_tower_layer("vispruner", self.reference_layer)
        check_crop_rule("vispruner", self.crops)

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

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        if self.per_view(context):
            return (len(self.select(context).final_kept),)
        return (context.n_keep,)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        layout, need = context.layout, cls_need(self.layer(model))
        attention = row_scores(context, need)
        if self.per_view(context):
            rows = tower_views(context.recording, layout, need.signal, need.layer, need.rows)
            feature = self._feature_need(model)
            views = tower_views(context.recording, layout, feature.signal, feature.layer, feature.rows)
            kept = set()
            for row, view, owner in zip(rows, views, owners(layout, [len(v) for v in views])):
                patches = np.arange(len(view))
                count = min(per_view_count(layout, context.n_keep, len(view)), len(view))
                kept.update(int(owner[p]) for p in self.choose(row.reshape(-1), view, patches, count) if owner[p] >= 0)
            return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), tuple(attention), position=self.entry_position(context))])
        features = context.features(self._feature_need(model))
        kept = []
        for members, share in zip(group_members(layout), size_shares(layout, context.n_keep)):
            kept += self.choose(attention, features, members, share)
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), tuple(attention), position=self.entry_position(context))])
