"""PyramidDrop: rank and drop visual tokens at the end of every stage of the decoder, geometrically."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from workbench.pruning.layer_state import LayerState, row_attention
from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import MethodNotApplicable, ModelFacts, PruningMethod, SelectionContext, check_choice
from workbench.pruning.plan import KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

BUDGET_MODES = ("final", "fixed")
POSITIONS = ("reindex", "original")


def pyramid_schedule(layers, depth: int, n_visual: int, n_keep: int, ratio: float,
                     budget_mode: str) -> tuple[tuple[int, int], ...]:
    """((decoder layer, visual tokens kept there), ...) for reference ``layers`` on a decoder of
    ``depth`` layers. Reference stage s (1-based) keeps ``int(N * lam**s)`` (the code's floor);
    ``lam`` is ``ratio`` ("fixed") or ``(n_keep / N) ** (1 / len(layers))`` ("final": the last
    stage keeps exactly ``n_keep``). Reference stages that land on the same scaled layer fold
    into one stage keeping the deepest one's count."""
    mapped = [scaled_layer(k, depth) for k in layers]
    lam = ratio if budget_mode == "fixed" else (n_keep / n_visual if n_visual else 0.0) ** (1.0 / len(layers))
    counts: dict[int, int] = {}
    for s, layer in enumerate(mapped, start=1):
        counts[layer] = int(math.floor(n_visual * lam ** s + 1e-9))
    schedule = sorted(counts.items())
    if budget_mode == "final":
        last = schedule[-1][0]
        schedule = [(k, max(c, n_keep)) for k, c in schedule[:-1]] + [(last, n_keep)]
    return tuple(schedule)


def rank_stage(layer: int, alive: np.ndarray, alive_scores: np.ndarray, count: int, n_visual: int,
               position: str) -> Stage:
    """Keep the ``count`` best of the ``alive`` original indices by ``alive_scores``."""
    scores = np.full(n_visual, np.nan)
    scores[alive] = alive_scores
    kept = top_k(scores, min(count, len(alive)), among=alive)
    return Stage(layer, tuple(kept), tuple(scores), position=position)


@dataclass(frozen=True, eq=False)
class LastTokenRanking:
    """A layer callback that, before each scheduled layer, keeps ``schedule[layer]`` of the live
    visual tokens by the last instruction token's head-mean attention in that layer, on the pruned
    sequence (PyramidDrop's rule; VScan's LLM stage). M-RoPE models keep their original positions.
    The samples of a batch are answered together: their attention rows in one product."""

    method: str
    schedule: dict[int, int]  # decoder layer -> visual tokens kept before it
    n_visual: int
    position: str

    def __call__(self, layer: int, state: LayerState) -> Stage | None:
        return self.answer_together(layer, [(self, state)])[0]

    @staticmethod
    def answer_together(layer: int, asked: Sequence[tuple["LastTokenRanking", LayerState]]) -> list[Stage | None]:
        due = [i for i, (ranking, _) in enumerate(asked) if layer in ranking.schedule]
        states = [asked[i][1] for i in due]
        for i, state in zip(due, states):
            if len(state.text_rows) == 0:
                raise MethodNotApplicable(f"{asked[i][0].method}: no text token after the image to rank with")
        rows = row_attention(states, [int(state.text_rows[-1]) for state in states])
        visual = [probs.mean(0)[state.visual_rows.to(probs.device)] for probs, state in zip(rows, states)]
        # One copy to the host for all samples (on a GPU, one synchronisation per layer).
        scores = np.split(torch.cat(visual).double().cpu().numpy(), np.cumsum([len(v) for v in visual])[:-1]) \
            if visual else []
        out: list[Stage | None] = [None] * len(asked)
        for i, state, alive_scores in zip(due, states, scores):
            ranking = asked[i][0]
            position = ranking.position if state.position_ids.dim() == 2 else "original"
            out[i] = rank_stage(layer, np.asarray(state.visual_indices), alive_scores, ranking.schedule[layer],
                                ranking.n_visual, position)
        return out


@register_method("pyramiddrop")
@dataclass(frozen=True)
class PyramidDrop(PruningMethod):
    """PyramidDrop (Xing et al., arXiv 2410.17247; code Cooperx521/PyramidDrop,
    ``llava/model/modeling_llama_pdrop.py``: ``pdrop_forward`` / ``pdrop_rank_drop``).

    After layers 7, 15, 23 -- i.e. before layers 8, 16, 24 (``layer_list``; placed on this decoder
    with ``scaled_layer``) -- the reference recomputes the attention of layer 8/16/24 from its own
    q/k (input norm, projections, RoPE) on the live, already pruned sequence, takes the row of the
    last instruction token (the last prompt token at inference), averages over heads, and keeps
    the top ``int(N * ratio_list[s])`` visual tokens (``ratio_list = [1, .5, .25, .125]``, lambda=0.5).
    The pruned sequence is re-numbered contiguously (``position_ids = arange``): ``position="reindex"``.
    Here that is a layer callback using ``LayerState.attention`` on the last text row.

    Budget: ``budget_mode="fixed"`` (default, the reference code and its evaluation scripts,
    ``--image_token_ratio_list "[0.5,0.25,0.125]"``) runs the reference's own schedule
    ``int(N * ratio**s)`` and ignores n_keep, as the code has no budget but the ratio list.
    ``budget_mode="final"`` (ours) matches the FINAL count to the budget: lambda = (n_keep/N)^(1/3),
    giving [N*lam, N*lam^2, n_keep] (at n_keep = N/8 this is exactly the reference's schedule); the
    reference's average-token matching cannot reach budgets below N/4 with its layers (the first
    quarter of the decoder always sees all N tokens). ``kept_counts`` returns the schedule.

    M-RoPE models (3-axis position ids) cannot be re-indexed by the executor: there the stages fall
    back to ``"original"`` positions (a documented deviation from the reference).
    """

    scored_by: ClassVar[str] = "text_attention"

    reference: ClassVar[str] = (
        "PyramidDrop (arXiv 2410.17247); code Cooperx521/PyramidDrop, llava/model/modeling_llama_pdrop.py "
        "(pdrop_rank_drop). Before layers 8/16/24 (scaled) the layer's own q/k attention of the last "
        "instruction token on the live pruned sequence, head mean, keeps int(N*lambda^s), lambda=0.5, "
        "positions re-indexed; default budget_mode='fixed' is the code's ratio list [0.5, 0.25, 0.125] (the budget "
        "is ignored). Variant budget_mode='final' matches the final count to the budget "
        "(lambda=(n_keep/N)^(1/3)). Deviation: 'original' positions on M-RoPE models.")

    layers: tuple[int, ...] = (8, 16, 24)
    ratio: float = 0.5  # lambda, used by budget_mode="fixed"
    budget_mode: str = "fixed"
    position: str = "reindex"

    def __post_init__(self):
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in layers) \
                or list(layers) != sorted(set(layers)):
            raise ValueError(f"pyramiddrop: layers must be strictly increasing ints >= 1, got {self.layers!r}")
        check_reference_layers("pyramiddrop", "layers", layers)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"pyramiddrop: ratio (lambda) must be in (0, 1], got {self.ratio!r}")
        check_choice("pyramiddrop", "budget_mode", self.budget_mode, BUDGET_MODES)
        check_choice("pyramiddrop", "position", self.position, POSITIONS)

    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return f"in-LLM pruning needs at least 2 decoder layers, this decoder has {model.decoder_layers}"
        return None

    def schedule(self, context: SelectionContext) -> tuple[tuple[int, int], ...]:
        model = context.require_model()
        return pyramid_schedule(self.layers, model.decoder_layers, context.n_visual, context.n_keep,
                                self.ratio, self.budget_mode)

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return tuple(count for _, count in self.schedule(context))

    def select(self, context: SelectionContext) -> KeepPlan:
        self.check_applies(context.require_model())
        return self.plan(context, [])  # every stage is chosen on the live state by the callback

    def layer_callback(self, context: SelectionContext):
        return LastTokenRanking("pyramiddrop", dict(self.schedule(context)), context.n_visual, self.position)
