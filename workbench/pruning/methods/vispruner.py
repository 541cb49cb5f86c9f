"""VisPruner: important tokens by [CLS] attention, then diverse tokens by removing near-duplicates
from the rest in rounds of bipartite matching, all before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import SelectionContext
from workbench.pruning.methods.cls_attention import (REFERENCE_FEED_LAYER, ClsAndFeaturesMethod, check_tower_layer,
                                                     cls_need, group_members, row_scores, size_shares)
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import normalized
from workbench.pruning.registry import register_method

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
    LLaVA's 24-layer CLIP tower; here ``projector_feed_tower_layer``), for each token group (crop) with
    its share ``k`` of the budget (by size; the reference gives every crop the same count):

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
    ``ceil(R / 2)`` even positions and cap a round at the size of A. Multi-crop layouts: the groups of
    our layout (base view, stitched tiles) stand in for the reference's crops, each keeping its share
    of the budget by size instead of the same count per crop.
    """

    reference: ClassVar[str] = (
        "Zhang et al., 'Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in "
        "VLMs' (VisPruner), arXiv:2412.01818. Code: github.com/Theia-4869/VisPruner, llava/model/llava_arch.py "
        "(encode_images: head-mean [CLS] row, argsort, important = int(T * r); duplicate removal in rounds of "
        "r = min(8, R - T_div) by max cosine of even to odd positions) and "
        "llava/model/multimodal_encoder/clip_encoder.py (feature_select: attentions/hidden_states[-2]); default "
        "important_ratio 0.5 from llava/eval/model_vqa_loader.py. Paper and code agree; we follow the code, "
        "generalised to odd residual counts and tiny budgets, per group by size instead of per crop.")

    important_ratio: float = 0.5
    reference_layer: int = REFERENCE_FEED_LAYER

    def __post_init__(self):
        if isinstance(self.important_ratio, bool) or not isinstance(self.important_ratio, (int, float)) \
                or not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner: important_ratio must be a number in [0, 1], got {self.important_ratio!r}")
        check_tower_layer("vispruner", self.reference_layer)

    def split(self, n_keep: int) -> tuple[int, int]:
        """(important, diverse) for a budget of ``n_keep`` tokens: ``int(T * r)`` as the reference."""
        important = int(n_keep * self.important_ratio)
        return important, n_keep - important

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        attention = row_scores(context, cls_need(self.layer(model)))
        features = context.features(self._feature_need(model))
        kept = []
        for members, share in zip(group_members(context.layout), size_shares(context.layout, context.n_keep)):
            if share == 0:
                continue
            n_important, n_diverse = self.split(share)
            ordered = attention_order(attention, members)
            kept += [int(i) for i in ordered[:n_important]]
            if n_diverse > 0:
                kept += [int(i) for i in remove_duplicates(features, ordered[n_important:], n_diverse)]
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), tuple(attention))])
