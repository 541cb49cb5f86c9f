"""DivPrune: keep the most diverse visual tokens (greedy Max-Min Diversity) before the LLM.

Also home of ``greedy_max_min``, the greedy max-min / k-center selection that other
diversity-based methods (ToDRE's first stage) reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix
from workbench.pruning.registry import register_method

COUNT_RULES = ("round", "budget")


def cosine_distance(features) -> np.ndarray:
    """[N, N] distances 1 - cosine similarity (zero rows: cosine 0, distance 1)."""
    return 1.0 - cosine_matrix(features)


def nearest_other_distance(distance: np.ndarray) -> np.ndarray:
    """[N] each token's distance to its nearest OTHER token (the diagonal is left out; a
    single token gets 0)."""
    d = np.array(distance, dtype=np.float64, copy=True)
    if len(d) < 2:
        return np.zeros(len(d))
    np.fill_diagonal(d, np.inf)
    return d.min(axis=0)


def greedy_max_min(distance, k: int, first: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy max-min diversity (= greedy k-center / farthest-point selection) on a square
    distance matrix.

    The first pick is ``first`` when given, else the token farthest from its nearest other token;
    each next pick is the unselected token whose distance to the selected set (its minimum
    distance to any selected token) is largest. Ties go to the lower index (``np.argmax``).
    Returns (picks in selection order, [N] score of each token when it was picked, NaN if never).
    """
    d = np.asarray(distance, dtype=np.float64)
    n = len(d)
    if d.shape != (n, n):
        raise ValueError(f"greedy_max_min needs a square distance matrix, got {d.shape}")
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} tokens")
    picks: list[int] = []
    scores = np.full(n, np.nan)
    if k == 0:
        return np.array(picks, dtype=np.int64), scores
    if first is None:
        gain = nearest_other_distance(d)
        first = int(np.argmax(gain))
        scores[first] = gain[first]
    else:
        first = int(first)
        if not 0 <= first < n:
            raise ValueError(f"first pick {first} is outside 0..{n - 1}")
    picks.append(first)
    to_set = d[first].copy()  # each token's distance to the selected set
    taken = np.zeros(n, dtype=bool)
    taken[first] = True
    while len(picks) < k:
        candidate = np.where(taken, -np.inf, to_set)
        pick = int(np.argmax(candidate))
        scores[pick] = to_set[pick]
        picks.append(pick)
        taken[pick] = True
        to_set = np.minimum(to_set, d[pick])
    return np.array(picks, dtype=np.int64), scores


@register_method("divprune")
@dataclass(frozen=True)
class DivPrune(PreLLMMethod):
    """DivPrune (Alvar et al., CVPR 2025): before the LLM, keep the budget's worth of projected
    visual tokens (the LLM input embeddings) chosen by greedy Max-Min Diversity with the distance
    1 - cosine similarity. As in the released code, the first token is the one whose nearest other
    token is farthest; every next token is the one farthest (max over candidates of the min
    distance) from the tokens already kept; ties go to the lower index (torch.argmax).

    Kept count (``count``): "round" (default, the code: ``int(round(SUBSET_RATIO * N))``, Python's
    round half to even, llava_arch.py ``DivPrune``) on a fractional budget; a budget given as a count
    is kept as is. "budget" keeps ``context.n_keep`` (the workbench's half-up rounding); the two
    differ only where ``budget * N`` ends in exactly .5."""

    scored_by: ClassVar[str] = "similarity"

    reference: ClassVar[str] = (
        "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (arXiv 2503.02175); "
        "vbdi/divprune, LLaVA/llava/model/llava_arch.py (DivPrune, pairwise_cosine_similarity; applied with "
        "LAYER_INDEX=0 on new_input_embeds, i.e. the projected visual tokens at the LLM input). Paper and code "
        "agree on the greedy max-min rule and the 1 - cosine distance; the first pick (largest nearest-neighbour "
        "distance, i.e. the second-smallest entry of its distance column) and the tie rule (first index) are "
        "from the code. Kept count: the code keeps int(round(ratio * N)) (round half to even), followed by default "
        "(count='round'); count='budget' keeps the workbench's half-up n_keep."
    )

    count: str = "round"

    def __post_init__(self):
        super().__post_init__()
        check_choice("divprune", "count", self.count, COUNT_RULES)

    def kept_count(self, context: SelectionContext) -> int:
        """Tokens kept: the code's ``int(round(ratio * N))`` for a fractional budget under "round"."""
        budget = context.budget
        if self.count == "round" and isinstance(budget, float):
            return min(int(round(budget * context.n_visual)), context.n_visual)
        return context.n_keep

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return (self.kept_count(context),)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("visual_states", "llm", 0),)

    def select(self, context: SelectionContext) -> KeepPlan:
        features = context.signal(SignalNeed("visual_states", "llm", 0))
        if features.shape[0] != context.n_visual:
            raise ValueError(f"divprune: {features.shape[0]} recorded visual states for {context.n_visual} tokens")
        picks, scores = greedy_max_min(cosine_distance(features), self.kept_count(context))
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(int(i) for i in picks)), tuple(scores), position=self.entry_position(context))])
