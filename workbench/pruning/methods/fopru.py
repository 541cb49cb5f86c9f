"""FoPru: keep the visual tokens the vision tower's own attention marks as significant, before the LLM,
either the best tokens anywhere (rank) or the best whole grid rows (row)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.layout import VisualLayout
from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method
from workbench.tower_map import tower_scores

STRATEGIES = ("rank", "row")


def row_keep(layout: VisualLayout, significance: np.ndarray, n_keep: int) -> np.ndarray:
    """The row strategy: rows of every layout grid ranked by the mean significance of their tokens
    (ties: the earlier row), whole rows kept while they fit ``n_keep``; the rest of the budget goes to
    the most significant tokens of the next rows in that order (ours: the paper keeps whole rows and
    does not say how a budget that is not a multiple of the width is met)."""
    rows = []  # (mean significance, group, row, members)
    for g, group in enumerate(layout.groups):
        members = np.flatnonzero(layout.group == g)
        for r in range(group.rows):
            inside = members[layout.cell[members, 0] == r]
            if len(inside):
                rows.append((float(significance[inside].mean()), g, r, inside))
    rows.sort(key=lambda row: (-row[0], row[1], row[2]))
    kept: list[int] = []
    for _, _, _, inside in rows:
        room = n_keep - len(kept)
        if room <= 0:
            break
        if len(inside) <= room:
            kept.extend(int(i) for i in inside)
        else:
            kept.extend(int(i) for i in top_k(significance, room, among=inside))
    return np.asarray(sorted(kept), dtype=np.int64)


@register_method("fopru")
@dataclass(frozen=True)
class FoPru(PreLLMMethod):
    """FoPru: Focal Pruning for Efficient Large Vision-Language Models (Jiang et al., arXiv
    2411.14164). No code was released: this follows the paper's text.

    Token significance comes from the vision encoder: the attention each patch RECEIVES in the
    layer that feeds the projector, averaged over heads and over every query row (the recorded
    tower ``attention`` with ``rows="mean"``), folded onto the layout's tokens by its tower map. It
    needs no [CLS], so it applies to every tower. Two strategies (``strategy``):

    * ``"rank"`` (default, the paper's global view): the ``n_keep`` most significant tokens;
    * ``"row"`` (the paper's local view, "continuous key information"): grid rows ranked by the
      mean significance of their tokens and kept whole (``row_keep``).

    The kept tokens are put back in their original order before the LLM and the shorter sequence
    is numbered contiguously (``position="reindex"``, as a LLaVA-style pre-LLM drop does; M-RoPE
    models keep their original positions, which the executor cannot re-index).

    Where we had to choose (the paper gives no code): the significance is read in the
    projector's feed layer (the paper speaks of "the vision encoder's attention"); a row budget that
    is not a multiple of the grid width is completed with the best tokens of the next row, so every
    strategy keeps exactly ``n_keep``; on multi-grid layouts (AnyRes tiles) the rows of every grid
    compete in one ranking. Ties: the lower index / the earlier row.
    """

    scored_by: ClassVar[str] = "visual_attention"

    reference: ClassVar[str] = (
        "FoPru: Focal Pruning for Efficient Large Vision-Language Models (arXiv 2411.14164); paper only, no "
        "released code. Significance = attention each patch receives in the vision tower (head mean, mean over "
        "all query rows) at the projector's feed layer; strategy 'rank' keeps the top n_keep tokens, 'row' keeps "
        "the grid rows with the highest mean significance; kept tokens restored to their original order, "
        "positions re-indexed before the LLM. Ours where the paper is silent: the feed layer, a partial last row "
        "filled by its best tokens (exact budget), one row ranking over all tiles.")

    strategy: str = "rank"

    def __post_init__(self):
        super().__post_init__()
        check_choice("fopru", "strategy", self.strategy, STRATEGIES)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("attention", "tower", model.projector_feed_tower_layer, "mean"),)

    def significance(self, context: SelectionContext) -> np.ndarray:
        (need,) = self.needs(context.require_model())
        return tower_scores(context.recording, context.layout, need.signal, need.layer, need.rows)

    def select(self, context: SelectionContext) -> KeepPlan:
        significance = self.significance(context)
        if self.strategy == "rank":
            kept = top_k(significance, context.n_keep)
        else:
            kept = row_keep(context.layout, significance, context.n_keep)
        return self.plan(context, [Stage(PRE_LLM, tuple(int(i) for i in kept), tuple(significance),
                                         position=self.entry_position(context))])
