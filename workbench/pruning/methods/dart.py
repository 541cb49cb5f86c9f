"""DART: keep the visual tokens least similar to a few pivot tokens, inside the LLM at layer K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.layers import scaled_layer
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext, SignalNeed
from workbench.pruning.plan import KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix, top_k
from workbench.pruning.registry import register_method

COUNT_RULES = ("budget", "reference")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@register_method("dart")
@dataclass(frozen=True)
class DART(PruningMethod):
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More"): before decoder layer ``layer`` (K=2 on LLaVA-1.5-7B's 32 layers,
    scaled to this decoder), pick pivot tokens -- the ``image_pivots`` visual tokens and the
    ``text_pivots`` text tokens (after the image) with the largest L1 norm of their layer-(K-1)
    attention keys (``visual_keys`` / ``text_keys``: RoPE applied, heads side by side, as in the
    code) -- then, pivot by pivot, keep the not-yet-kept visual tokens LEAST cosine-similar to the
    pivot in the hidden states entering layer K. Image pivots are kept too; text pivots only
    guide. Position ids keep their original values (the code passes the kept indices).

    Deviations: (1) Cosines use the residual stream entering layer K; the code applies the final
    RMSNorm first (its per-token scale cancels in a cosine, its learned per-dimension gain does
    not). (2) The code iterates the pivots in Python-set order; we go image pivots then text
    pivots, each by ascending index. (3) ``count="budget"`` (default) keeps exactly the budget:
    image pivots plus (budget - image pivots) tokens shared over the pivots, the first pivots
    taking the remainder; ``count="reference"`` keeps the code's count, image pivots +
    pivots * (budget // (image_pivots + text_pivots)) (132 for the code's 128 on LLaVA-1.5)."""

    scored_by: ClassVar[str] = "similarity"

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    count: str = "budget"

    reference: ClassVar[str] = (
        "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More "
        "(arXiv 2502.11494); ZichenWen1/DART (read from the fork xqy1111111/DART), "
        "llava/model/language_model/modeling_llama_self.py (get_retained_image_token) and "
        "llava/eval/model_vqa_loader.py (defaults: pruned_layer K=2, pivot_image_token=4, pivot_text_token=4, "
        "max_num_trunction=128). Code: pivots = top L1 norm of layer K-1 keys (RoPE applied, heads concatenated) "
        "among image tokens and among all tokens after the image; each pivot takes max_num_trunction // 8 tokens "
        "least cosine-similar to it in norm(output of layer K-1); image pivots kept, text pivots not; per-pivot "
        "picks exclude earlier picks. Paper describes the same pivot/duplication rule at layer 2. We follow the "
        "code (image and text pivots by L1 norm of the layer K-1 keys) except: cosines without the final "
        "RMSNorm gain, pivot order image-then-text ascending (code: set order), and by default exactly the budget "
        "kept (count='reference' gives the code's count)."
    )

    def __post_init__(self):
        if not _is_int(self.layer) or self.layer < 1:
            raise ValueError(f"dart: layer must be an int >= 1 (a 32-layer reference index), got {self.layer!r}")
        for name in ("image_pivots", "text_pivots"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"dart: {name} must be a non-negative int, got {value!r}")
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("dart: needs at least one pivot (image_pivots + text_pivots > 0)")
        if self.count not in COUNT_RULES:
            raise ValueError(f"dart: count must be one of {COUNT_RULES}, got {self.count!r}")

    # --- where it acts ------------------------------------------------------------------------
    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return f"DART prunes inside the LLM and needs at least 2 decoder layers, this one has {model.decoder_layers}"
        return None

    def prune_layer(self, model: ModelFacts) -> int:
        return scaled_layer(self.layer, model.decoder_layers)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        k = self.prune_layer(model)
        needs = [SignalNeed("visual_keys", "llm", k - 1), SignalNeed("visual_states", "llm", k)]
        if self.text_pivots:
            needs += [SignalNeed("text_keys", "llm", k - 1), SignalNeed("text_states", "llm", k)]
        return tuple(needs)

    # --- the schedule -------------------------------------------------------------------------
    def _pivot_counts(self, context: SelectionContext) -> tuple[int, int]:
        k = self.prune_layer(context.require_model())
        n_image = min(self.image_pivots, context.n_keep, context.n_visual)
        n_text = 0
        if self.text_pivots:
            n_text = min(self.text_pivots, context.signal(SignalNeed("text_keys", "llm", k - 1)).shape[0])
        return n_image, n_text

    def _quotas(self, context: SelectionContext, n_image: int, n_text: int) -> list[int]:
        pivots = n_image + n_text
        if pivots == 0:
            return []
        if self.count == "reference":
            return [context.n_keep // (self.image_pivots + self.text_pivots)] * pivots
        rest = context.n_keep - n_image
        return [rest // pivots + (1 if i < rest % pivots else 0) for i in range(pivots)]

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        n_image, n_text = self._pivot_counts(context)
        picked = sum(self._quotas(context, n_image, n_text))
        return (min(context.n_visual, n_image + picked),)

    # --- the selection ------------------------------------------------------------------------
    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        k = self.prune_layer(model)
        n = context.n_visual
        keys = context.signal(SignalNeed("visual_keys", "llm", k - 1))
        visual = context.signal(SignalNeed("visual_states", "llm", k))
        if keys.shape[0] != n or visual.shape[0] != n:
            raise ValueError(f"dart: recorded {keys.shape[0]} keys / {visual.shape[0]} states for {n} visual tokens")
        n_image, n_text = self._pivot_counts(context)
        image_pivots = top_k(np.abs(keys).sum(axis=1), n_image)
        pivot_states = [visual[i] for i in image_pivots]
        if n_text:
            text_keys = context.signal(SignalNeed("text_keys", "llm", k - 1))
            text = context.signal(SignalNeed("text_states", "llm", k))
            pivot_states += [text[j] for j in top_k(np.abs(text_keys).sum(axis=1), n_text)]
        candidates = np.setdiff1d(np.arange(n), image_pivots)
        scores = np.full(n, np.nan)
        kept = set(int(i) for i in image_pivots)
        for state, quota in zip(pivot_states, self._quotas(context, n_image, n_text)):
            quota = min(quota, len(candidates))
            if quota == 0:
                continue
            dissimilarity = -cosine_matrix(state[None, :], visual)[0]
            chosen = top_k(dissimilarity, quota, among=candidates)
            scores[chosen] = dissimilarity[chosen]
            kept.update(int(i) for i in chosen)
            candidates = np.setdiff1d(candidates, chosen)
        return self.plan(context, [Stage(k, tuple(sorted(kept)), tuple(scores))])
