"""SCOPE: greedy selection by saliency x coverage gain ([CLS] attention times the facility-location
gain of covering every token by its most similar kept token), before the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import SelectionContext, check_choice
from workbench.pruning.methods.cls_attention import (REFERENCE_FEED_LAYER, ClsAndFeaturesMethod, check_tower_layer,
                                                     cls_need, group_members, row_scores, size_shares)
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix
from workbench.pruning.registry import register_method

COMBINATIONS = ("multi", "add")


def saliency_coverage(similarity, saliency, k: int, alpha: float = 1.0, combine: str = "multi"):
    """SCOPE's greedy rule on one crop. ``similarity`` [n, n] (cosine), ``saliency`` [n] (>= 0).
    Every token i is covered by its most similar selected token (``covered[i]``, 0 before any pick);
    the gain of candidate j is ``sum_i max(0, similarity[i, j] - covered[i])`` over all n tokens, and
    its score ``gain * saliency**alpha`` ("multi") or ``gain + saliency**alpha`` ("add"). Each step
    picks the unselected candidate with the highest score (ties: lower index). Returns (picks in
    order, [n] score of each pick when it was picked, NaN for the others)."""
    s = np.asarray(similarity, dtype=np.float64)
    n = len(s)
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} tokens")
    weight = np.asarray(saliency, dtype=np.float64) ** alpha
    covered = np.zeros(n)
    taken = np.zeros(n, dtype=bool)
    scores = np.full(n, np.nan)
    picks = []
    for _ in range(k):
        gain = np.clip(s - covered[:, None], 0.0, None).sum(axis=0)
        score = gain * weight if combine == "multi" else gain + weight
        pick = int(np.argmax(np.where(taken, -np.inf, score)))
        picks.append(pick)
        scores[pick] = score[pick]
        taken[pick] = True
        covered = np.maximum(covered, s[pick])
    return np.array(picks, dtype=np.int64), scores


@register_method("scope")
@dataclass(frozen=True)
class Scope(ClsAndFeaturesMethod):
    """SCOPE. At the projector-feed tower layer (``attentions[-2]`` / ``hidden_states[-2]`` = layer 22 of
    LLaVA's CLIP tower; here ``projector_feed_tower_layer``), for each token group (crop) with its share
    of the budget (by size; the reference gives every crop ``budget // crops``): greedy selection by
    ``coverage gain x saliency**alpha`` (``saliency_coverage``), with the cosine similarity of the
    tower's hidden states (patch tokens) and the saliency = the [CLS] attention SUMMED over heads, as in
    the reference (the recorded head mean times the tower's head count). ``combine="add"`` is the
    reference's additive variant (``COMBINED=add``). ``Stage.scores``: each kept token's score when it
    was picked (NaN for the dropped ones).

    Deviations: none in the rule (ties: lower index, as ``torch.argmax``); multi-crop layouts use our
    layout's groups (base view, stitched tiles) with shares by size in place of per-crop equal counts.
    """

    reference: ClassVar[str] = (
        "Deng et al., 'SCOPE: Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs' "
        "(NeurIPS 2025), arXiv:2510.24214. Code: github.com/kinredon/SCOPE, scope/clip_encoder.py (CLIPVisionTower_SCOPE.forward: "
        "attentions[-2] [CLS] row summed over heads, hidden_states[-2] patches; SCOPE(): gain = sum over tokens of "
        "max(0, cos - covered), times cls_attn**ALPHA for COMBINED=multi), scope/main.py; defaults ALPHA=1.0 "
        "(run_scope_llava.sh) and COMBINED=multi (code default). Paper and code agree; we follow the code, per "
        "layout group by size instead of an equal count per crop.")

    alpha: float = 1.0
    combine: str = "multi"
    reference_layer: int = REFERENCE_FEED_LAYER

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha < 0:
            raise ValueError(f"scope: alpha must be a finite number >= 0, got {self.alpha!r}")
        check_choice("scope", "combine", self.combine, COMBINATIONS)
        check_tower_layer("scope", self.reference_layer)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        # head sum; a token that owns no tower patch (NaN) has no saliency
        saliency = np.nan_to_num(row_scores(context, cls_need(self.layer(model))), nan=0.0) * model.vision_heads
        features = context.features(self._feature_need(model))
        scores = np.full(context.n_visual, np.nan)
        kept = []
        for members, share in zip(group_members(context.layout), size_shares(context.layout, context.n_keep)):
            if share == 0:
                continue
            picks, picked = saliency_coverage(cosine_matrix(features[members]), saliency[members], share,
                                              self.alpha, self.combine)
            kept += [int(members[p]) for p in picks]
            scores[members] = np.where(np.isnan(picked), scores[members], picked)
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), tuple(scores), position=self.entry_position(context))])
