"""Searched per-layer schedules (G-Search / P-Sigmoid): one attention ranking, read early in the
LLM, thinned layer by layer along a schedule of how many visual tokens each decoder layer keeps."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.layers import REFERENCE_DEPTH, check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import POSITION_POLICIES, KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

ROWS = ("text", "last")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def p_sigmoid_rates(layers, start: int, depth: int, slope: float, center: float, floor: float) -> list[float]:
    """Keep rates of decoder ``layers`` (all >= ``start``) on a decoder of ``depth`` layers: the
    decreasing sigmoid ``s(x) = 1 / (1 + exp(slope * (x - center)))`` of the reference depth
    ``x = layer * 32 / depth``, rescaled so that layer ``start`` keeps everything (rate 1) and the
    last layer keeps ``floor``."""
    def s(layer):
        return _sigmoid(-slope * (layer * REFERENCE_DEPTH / depth - center))

    first, last = s(start), s(depth - 1)
    if first - last <= 0:  # one pruned layer only (or a flat sigmoid): it keeps the floor
        return [floor for _ in layers]
    return [floor + (1.0 - floor) * (s(layer) - last) / (first - last) for layer in layers]


@register_method("gprune")
@dataclass(frozen=True)
class GPrune(PruningMethod):
    """The searched vision-token reduction of "Accelerating Multimodal Large Language Models by
    Searching Optimal Vision Token Reduction" (Zhao et al., arXiv 2412.00556, CVPR 2025). No code
    was released: this follows the paper's text.

    The paper observes that the ranking of the visual tokens by the attention they receive is
    nearly the same in every decoder layer but the first, so ONE ranking serves every layer: each
    layer keeps the top tokens of that ranking, and only how MANY each layer keeps is searched.
    G-Search (greedy, on a validation set, for "no loss" budgets) returns a keep rate per layer;
    P-Sigmoid (for a given budget) parameterises the rates as a decreasing sigmoid of depth whose
    parameters Bayesian optimisation fits. Searching is not part of inference; here the schedule is
    data:

    * ``rates=None`` (default): P-Sigmoid, ``rate(x) = 1 / (1 + exp(slope * (x - center)))`` of the
      reference depth ``x`` (layer index on the 32-layer LLaVA-1.5-7B decoder), rescaled so that the
      first pruned layer keeps every token and the last layer keeps exactly the budget
      (``p_sigmoid_rates``); a layer keeps ``round(N * rate)`` tokens, at least ``n_keep``.
    * ``rates=(r_0, ..., r_31)``: a searched schedule (G-Search's output), one keep rate per reference
      layer, non-increasing; decoder layer ``l`` takes the rate of reference layer
      ``round(l * 32 / depth)``. The budget is then ignored, as a searched schedule has its own.

    The ranking is the head-mean attention on the visual tokens in layer ``start - 1`` (the second
    layer for ``start=2``: the first whose ranking agrees with the rest), rows = every text token
    after the image (``rows="text"``) or the last one; pruning starts before layer ``start`` (scaled
    to this decoder as FastV's K) and every later layer whose count drops gets a stage. Kept tokens
    keep their original position ids (``position="original"``).

    Where we had to choose (the paper's searched parameters are per model and budget and are not
    all printed): ``slope=0.5`` per reference layer and ``center=16`` (mid-depth) are our defaults, not
    the paper's fitted values; the "average tokens per layer" budget the paper optimises under is
    replaced by the final-layer count (the rescaling above), so budgets mean the same as for the
    other in-LLM methods; the one ranking is read from the unpruned forward, which is exact because
    nothing is pruned before layer ``start``.
    """

    scored_by: ClassVar[str] = "text_attention"

    reference: ClassVar[str] = (
        "Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction (arXiv "
        "2412.00556; G-Search / P-Sigmoid); paper only, no released code. One ranking by the text rows' head-mean "
        "attention on the visual tokens at layer start-1 (start=2, scaled) serves every layer; each later layer "
        "keeps round(N * rate(layer)) of it, rate a decreasing sigmoid of depth (P-Sigmoid) or a searched "
        "per-layer list (rates=..., G-Search output, budget ignored); original positions. Ours: slope=0.5 and "
        "center=16 instead of per-budget Bayesian-optimised values, the sigmoid rescaled from 1 at the first "
        "pruned layer to the budget at the last (the paper budgets the average tokens per layer).")

    start: int = 2
    slope: float = 0.5
    center: float = 16.0
    rates: tuple[float, ...] | None = None
    rows: str = "text"
    position: str = "original"

    def __post_init__(self):
        if isinstance(self.start, bool) or not isinstance(self.start, (int, np.integer)) or self.start < 1:
            raise ValueError(f"gprune: start must be an int >= 1 (the first pruned reference layer), got {self.start!r}")
        check_reference_layers("gprune", "start", int(self.start))
        for name in ("slope", "center"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"gprune: {name} must be a finite number, got {value!r}")
        if self.slope <= 0:
            raise ValueError(f"gprune: slope must be > 0 (rates fall with depth), got {self.slope!r}")
        if self.rates is not None:
            rates = tuple(self.rates)
            object.__setattr__(self, "rates", rates)
            if len(rates) != REFERENCE_DEPTH or any(
                    isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1 for r in rates):
                raise ValueError(f"gprune: rates must be {REFERENCE_DEPTH} keep rates in (0, 1], one per layer of the "
                                 f"reference decoder, got {self.rates!r}")
            if any(b > a for a, b in zip(rates, rates[1:])):
                raise ValueError("gprune: rates must not increase with depth (a layer keeps a subset of the one before)")
        check_choice("gprune", "rows", self.rows, ROWS)
        check_choice("gprune", "position", self.position, POSITION_POLICIES)

    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return f"in-LLM pruning needs at least 2 decoder layers, this decoder has {model.decoder_layers}"
        return None

    def prune_layer(self, model: ModelFacts) -> int:
        return scaled_layer(self.start, model.decoder_layers)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("attention", "llm", self.prune_layer(model) - 1, self.rows),)

    def schedule(self, context: SelectionContext) -> tuple[tuple[int, int], ...]:
        """((decoder layer, visual tokens kept from it on), ...), one entry per layer whose count drops."""
        model = context.require_model()
        depth, n, n_keep = model.decoder_layers, context.n_visual, context.n_keep
        start = self.prune_layer(model)
        layers = list(range(start, depth))
        if self.rates is None:
            rates = p_sigmoid_rates(layers, start, depth, float(self.slope), float(self.center), n_keep / n if n else 0.0)
            counts = [min(n, max(n_keep, int(round(n * r)))) for r in rates]
        else:
            rates = [self.rates[min(int(round(k * REFERENCE_DEPTH / depth)), REFERENCE_DEPTH - 1)] for k in layers]
            counts = [min(n, int(round(n * r))) for r in rates]
        schedule, alive = [], n
        for layer, count in zip(layers, counts):
            count = min(count, alive)
            if count < alive:
                schedule.append((layer, count))
                alive = count
        return tuple(schedule)

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return tuple(count for _, count in self.schedule(context))

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        (need,) = self.needs(model)
        scores = context.signal(need).mean(axis=0)
        stages = [Stage(layer, tuple(top_k(scores, count)), tuple(scores), position=self.position)
                  for layer, count in self.schedule(context)]
        return self.plan(context, stages)
