"""DART: keep the visual tokens least similar to a few pivot tokens, inside the LLM at layer K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix, top_k
from workbench.pruning.registry import register_method

COUNT_RULES = ("budget", "reference")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


NORMS = ("final", "off")
PIVOT_ORDERS = ("set", "index")


def _descending(scores: np.ndarray, k: int) -> list[int]:
    """The ``k`` highest scores' indices, highest first (ties: lower index first), as ``topk`` lists them."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores, dtype=np.float64)))
    return [int(i) for i in order[:k]]


def official_pivot_order(image: list[int], text: list[int], layout) -> list[tuple[str, int]]:
    """The pivots in the order the official code visits them: it puts their absolute sequence
    positions, image pivots then text pivots each by descending key norm, into a Python ``set`` and
    loops over it. CPython iterates a set of ints in an order fixed by the values and their
    insertion order (ints hash to themselves, with no randomisation), so building the same set
    reproduces that order exactly and deterministically."""
    first_text = int(layout.positions.max()) + 1  # the text after the image starts right after it
    by_position = {int(layout.positions[i]): ("image", i) for i in image}
    by_position.update({first_text + j: ("text", j) for j in text})
    return [by_position[p] for p in set(by_position)]


@register_method("dart")
@dataclass(frozen=True)
class DART(PruningMethod):
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More"): before decoder layer ``layer`` (K=2 on LLaVA-1.5-7B's 32 layers,
    scaled to this decoder), pick pivot tokens -- the ``image_pivots`` visual tokens and the
    ``text_pivots`` text tokens (after the image) with the largest L1 norm of their layer-(K-1)
    attention keys (``visual_keys`` / ``text_keys``: RoPE applied, heads side by side, as in the
    code) -- then, pivot by pivot, keep the not-yet-kept visual tokens LEAST cosine-similar to the
    pivot in the hidden states entering layer K after the decoder's final norm. Image pivots are
    kept too; text pivots only guide. Position ids keep their original values (the code passes the
    kept indices).

    Defaults are the official code's behaviour: ``norm="final"`` compares the states after the final
    RMSNorm (``self.norm(last_layer_state)``); ``pivot_order="set"`` visits the pivots in the order
    the code's Python set of absolute positions yields (reproduced deterministically, see
    ``official_pivot_order``); ``count="reference"`` keeps the code's count, image pivots + pivots x
    (budget // (image_pivots + text_pivots)) (20 for a budget of 16 with 4 + 4 pivots, 132 for the
    code's 128 on LLaVA-1.5). Variants, never the default: ``norm="off"`` (the residual stream as it
    is: the norm's per-token scale cancels in a cosine, its learned gain does not),
    ``pivot_order="index"`` (image pivots then text pivots, each by ascending index) and
    ``count="budget"`` (exactly the budget: image pivots plus the rest shared over the pivots, the
    first pivots taking the remainder). Ties between equal cosines go to the lower index (the
    code's ``topk`` leaves them unspecified)."""

    scored_by: ClassVar[str] = "similarity"

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4
    count: str = "reference"
    norm: str = "final"
    pivot_order: str = "set"

    reference: ClassVar[str] = (
        "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More "
        "(arXiv 2502.11494); ZichenWen1/DART (read from the fork xqy1111111/DART), "
        "llava/model/language_model/modeling_llama_self.py (get_retained_image_token, lines 397-449; the call "
        "at lines 336-356) and llava/eval/model_vqa_loader.py (defaults: pruned_layer K=2, pivot_image_token=4, "
        "pivot_text_token=4, max_num_trunction=128). Code: pivots = top L1 norm of layer K-1 keys (RoPE applied, "
        "heads concatenated) among image tokens and among all tokens after the image; looping over the set of "
        "pivot positions, each pivot takes max_num_trunction // 8 tokens least cosine-similar to it in "
        "norm(output of layer K-1); image pivots kept, text pivots not; per-pivot picks exclude earlier picks. "
        "Paper describes the same pivot/duplication rule at layer 2. We follow the code by default; variants: "
        "norm='off', pivot_order='index', count='budget'."
    )

    def __post_init__(self):
        if not _is_int(self.layer) or self.layer < 1:
            raise ValueError(f"dart: layer must be an int >= 1 (a 32-layer reference index), got {self.layer!r}")
        check_reference_layers("dart", "layer", int(self.layer))
        for name in ("image_pivots", "text_pivots"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"dart: {name} must be a non-negative int, got {value!r}")
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("dart: needs at least one pivot (image_pivots + text_pivots > 0)")
        check_choice("dart", "count", self.count, COUNT_RULES)
        check_choice("dart", "norm", self.norm, NORMS)
        check_choice("dart", "pivot_order", self.pivot_order, PIVOT_ORDERS)

    # --- where it acts ------------------------------------------------------------------------
    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return f"DART prunes inside the LLM and needs at least 2 decoder layers, this one has {model.decoder_layers}"
        return None

    def prune_layer(self, model: ModelFacts) -> int:
        return scaled_layer(self.layer, model.decoder_layers)

    def _states(self, kind: str) -> str:
        return f"{kind}_states_normed" if self.norm == "final" else f"{kind}_states"

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        k = self.prune_layer(model)
        needs = [SignalNeed("visual_keys", "llm", k - 1), SignalNeed(self._states("visual"), "llm", k)]
        if self.text_pivots:
            needs += [SignalNeed("text_keys", "llm", k - 1), SignalNeed(self._states("text"), "llm", k)]
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
        visual = context.signal(SignalNeed(self._states("visual"), "llm", k))
        if keys.shape[0] != n or visual.shape[0] != n:
            raise ValueError(f"dart: recorded {keys.shape[0]} keys / {visual.shape[0]} states for {n} visual tokens")
        n_image, n_text = self._pivot_counts(context)
        image_pivots = _descending(np.abs(keys).sum(axis=1), n_image)
        text_pivots, text = [], None
        if n_text:
            text_keys = context.signal(SignalNeed("text_keys", "llm", k - 1))
            text = context.signal(SignalNeed(self._states("text"), "llm", k))
            text_pivots = _descending(np.abs(text_keys).sum(axis=1), n_text)
        if self.pivot_order == "set":
            pivots = official_pivot_order(image_pivots, text_pivots, context.layout)
        else:
            pivots = [("image", i) for i in sorted(image_pivots)] + [("text", j) for j in sorted(text_pivots)]
        candidates = np.setdiff1d(np.arange(n), image_pivots)
        scores = np.full(n, np.nan)
        kept = set(image_pivots)
        for (kind, index), quota in zip(pivots, self._quotas(context, n_image, n_text)):
            quota = min(quota, len(candidates))
            if quota == 0:
                continue
            state = visual[index] if kind == "image" else text[index]
            dissimilarity = -cosine_matrix(state[None, :], visual)[0]
            chosen = top_k(dissimilarity, quota, among=candidates)
            scores[chosen] = dissimilarity[chosen]
            kept.update(int(i) for i in chosen)
            candidates = np.setdiff1d(candidates, chosen)
        return self.plan(context, [Stage(k, tuple(sorted(kept)), tuple(scores))])
