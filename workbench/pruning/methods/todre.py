"""ToDRE: a diverse subset of the visual tokens before the LLM (greedy k-center), then the
task-relevant part of it inside the LLM (attention from the text tokens)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import MethodNotApplicable, ModelFacts, PreLLMMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.methods.divprune import cosine_distance, greedy_max_min
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method
from workbench.tower_map import tower_scores

FEATURE_SPACES = ("tower", "llm")
FIRST_PICKS = ("isolated", "cls")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def diverse_count(n_keep: int, n_visual: int, relevance_keep: float) -> int:
    """Stage 1's count: enough diverse tokens that stage 2, keeping the ``relevance_keep`` share of
    them, ends at ``n_keep`` -- ``ceil(n_keep / relevance_keep)``, at most ``n_visual``."""
    return min(n_visual, int(math.ceil(n_keep / relevance_keep - 1e-9)))


@register_method("todre")
@dataclass(frozen=True)
class ToDRE(PreLLMMethod):
    """ToDRE (Li, Yang, Lu, arXiv 2505.18757 v1, "ToDRE: Visual Token Pruning via Diversity and
    Task Awareness for Efficient Large Vision-Language Models"). No official code could be found
    (searched GitHub code, docs and web pages); this follows the paper's description and every
    detail the paper text available to us does not fix is our choice, exposed as a parameter.

    Stage 1, before the LLM (paper: "after the vision encoder"): greedy k-center selection of a
    diverse subset of the visual tokens -- the greedy max-min rule of DivPrune, reused from
    ``divprune.greedy_max_min`` with the distance 1 - cosine similarity (``cosine_distance``).
    ``features="tower"`` (default) runs it on the vision encoder's output as the projector receives
    it (``visual_states_out`` at the projector feed layer), read per tower view and folded onto the
    LLM's visual tokens by the layout's tower map (the mean of the patches each token owns: tiles of
    LLaVA-NeXT/OneVision, Qwen2-VL's merged patches, Idefics3's pixel shuffle; the identity on
    LLaVA-1.5); ``"llm"`` on the projected tokens at the LLM input. The first centre:
    ``first="isolated"`` (default) the token farthest from its nearest other token (DivPrune's rule,
    ``greedy_max_min(first=None)``); ``"cls"`` the token the tower's [CLS] attends most at the
    projector feed layer (head mean, folded onto the tokens by the tower map as a mean; passed as
    ``first=``; needs a [CLS]). The LLM numbers the kept sequence contiguously, as LLaVA does with
    image features pruned before they join the text (``position``; "original" on M-RoPE models).

    Stage 2, inside the LLM before decoder layer ``layer`` (reference index on a 32-layer decoder,
    default 2, after the shallow layers where the paper locates the "information migration" from
    visual to text tokens; placed with ``scaled_layer``): the task relevance of each surviving visual
    token is the attention it receives from the text/instruction tokens after the image, averaged
    over heads and text rows, recomputed by a layer callback with ``LayerState.attention`` on the
    live, already pruned sequence (the unpruned recording would rank tokens in a sequence stage 1
    changed); the ``n_keep`` most relevant survive, original position ids kept.

    Schedule (our choice; the paper reports ~90% pruned after the encoder and further in-LLM
    pruning but no rule tying the two to one budget): stage 1 keeps
    ``ceil(n_keep / relevance_keep)`` tokens (at most N), stage 2 keeps ``n_keep``; ``kept_counts``
    returns both. Not implemented: the paper's pruning of ALL visual tokens in deeper layers (it
    would end below the budget)."""

    scored_by: ClassVar[str] = "text_attention"

    layer: int = 2
    relevance_keep: float = 0.5
    features: str = "tower"
    first: str = "isolated"

    reference: ClassVar[str] = (
        "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models "
        "(arXiv 2505.18757 v1; v2 retitled 'Effective Visual Token Pruning via Token Diversity and Task Relevance'). "
        "NO reference code was available (GitHub code/docs/pages searched): implemented from the paper's description "
        "-- stage 1 greedy k-center diverse subset after the vision encoder, stage 2 removal of task-irrelevant visual "
        "tokens inside the LLM. Our choices (parameters): k-center = DivPrune's greedy max-min with 1 - cosine distance "
        "(reused), on the tower output fed to the projector (features='tower'|'llm'), first centre = most isolated token "
        "(first='isolated'|'cls'); relevance = head- and text-row-mean attention from the text after the image on the "
        "live pruned sequence before decoder layer 2 of 32 (scaled); schedule: stage 1 keeps ceil(n_keep/relevance_keep) "
        "(default 0.5), stage 2 keeps n_keep; v2's max-sum diversification and the paper's pruning of all visual tokens "
        "in deep layers are not implemented."
    )

    def __post_init__(self):
        super().__post_init__()
        if not _is_int(self.layer) or self.layer < 1:
            raise ValueError(f"todre: layer must be an int >= 1 (a 32-layer reference index), got {self.layer!r}")
        check_reference_layers("todre", "layer", int(self.layer))
        if isinstance(self.relevance_keep, bool) or not isinstance(self.relevance_keep, (int, float)) \
                or not 0 < self.relevance_keep <= 1:
            raise ValueError(f"todre: relevance_keep (share of stage-1 tokens stage 2 keeps) must be in (0, 1], "
                             f"got {self.relevance_keep!r}")
        check_choice("todre", "features", self.features, FEATURE_SPACES)
        check_choice("todre", "first", self.first, FIRST_PICKS)

    # --- where it acts ------------------------------------------------------------------------
    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return (f"ToDRE's second stage prunes inside the LLM and needs at least 2 decoder layers, "
                    f"this one has {model.decoder_layers}")
        if self.first == "cls" and not model.has_cls_token:
            return "first='cls' picks the first k-center by [CLS] attention and its vision tower has no [CLS] token " \
                   "(use first='isolated')"
        return None

    def prune_layer(self, model: ModelFacts) -> int:
        return scaled_layer(self.layer, model.decoder_layers)

    def _feature_need(self, model: ModelFacts) -> SignalNeed:
        if self.features == "tower":
            return SignalNeed("visual_states_out", "tower", model.projector_feed_tower_layer)
        return SignalNeed("visual_states", "llm", 0)

    def _cls_need(self, model: ModelFacts) -> SignalNeed:
        return SignalNeed("attention", "tower", model.projector_feed_tower_layer, "cls")

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        needs = [self._feature_need(model)]
        if self.first == "cls":
            needs.append(self._cls_need(model))
        return tuple(needs)

    # --- the schedule -------------------------------------------------------------------------
    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return diverse_count(context.n_keep, context.n_visual, self.relevance_keep), context.n_keep

    # --- stage 1: diversity, before the LLM ---------------------------------------------------
    def _features(self, context: SelectionContext, model: ModelFacts) -> np.ndarray:
        """[N, D] stage-1 features. The tower's are read per tower view (crop, tile, frame) and folded onto
        the layout's tokens by its tower map (the mean of the patches each token owns; the identity on
        LLaVA-1.5-style towers)."""
        try:
            return context.features(self._feature_need(model))
        except ValueError as error:
            raise ValueError(f"todre: the tower features cannot be placed on the {context.n_visual} visual "
                             f"tokens ({error}); use features='llm'") from error

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        n = context.n_visual
        features = self._features(context, model)
        if features.shape[0] != n:
            raise ValueError(f"todre: the {self.features} features have {features.shape[0]} rows for {n} visual "
                             "tokens")
        first = None
        if self.first == "cls":
            need = self._cls_need(model)
            cls = tower_scores(context.recording, context.layout, need.signal, need.layer, need.rows)
            first = int(top_k(cls, 1)[0]) if n else None
        count = diverse_count(context.n_keep, n, self.relevance_keep)
        picks, scores = greedy_max_min(cosine_distance(features), count, first=first)
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(int(i) for i in picks)), tuple(scores), position=self.entry_position(context))])

    # --- stage 2: task relevance, inside the LLM ----------------------------------------------
    def layer_callback(self, context: SelectionContext):
        layer = self.prune_layer(context.require_model())
        n_keep, n_visual = context.n_keep, context.n_visual

        def callback(k, state):
            if k != layer:
                return None
            if len(state.text_rows) == 0:
                raise MethodNotApplicable("todre: no text token after the image to rate task relevance with")
            probs = state.attention(state.text_rows)  # [H, T, S]
            relevance = probs.mean(dim=(0, 1))[state.visual_rows.to(probs.device)]
            alive = np.asarray(state.visual_indices, dtype=np.int64)
            scores = np.full(n_visual, np.nan)
            scores[alive] = relevance.double().cpu().numpy()
            kept = top_k(scores, min(n_keep, len(alive)), among=alive)
            return Stage(k, tuple(int(i) for i in kept), tuple(scores))

        return callback
