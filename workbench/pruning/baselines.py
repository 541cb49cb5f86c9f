"""Baselines that look at nothing but the layout: random, a spatially uniform grid, average pooling.

They fix the shape every method follows and bound the others from below: a signal-based method
that does not beat ``UniformGrid`` at the same budget is not using its signal. Like the pre-LLM
methods they are compared with (and the random / pooling baselines of their LLaVA papers, which drop
or pool image features before they are joined with the text), the LLM numbers the kept sequence
contiguously (``position="reindex"``; ``"original"`` keeps the unpruned position ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.layout import VisualLayout
from workbench.pruning.budget import split_budget
from workbench.pruning.grid import grid_windows
from workbench.pruning.method import PreLLMMethod, SelectionContext
from workbench.pruning.plan import PRE_LLM, KeepPlan, Merge, Stage
from workbench.pruning.registry import register_method


def _cell_index(layout: VisualLayout, group: int) -> dict[tuple[int, int], int]:
    members = np.flatnonzero(layout.group == group)
    return {(int(layout.cell[i, 0]), int(layout.cell[i, 1])): int(i) for i in members}


def _group_windows(layout: VisualLayout, n_keep: int):
    """Per group: its windows (as visual-token indices, centre first), the budget shared by size."""
    sizes = [grp.rows * grp.cols for grp in layout.groups]
    for g, (grp, share) in enumerate(zip(layout.groups, split_budget(n_keep, sizes))):
        index = _cell_index(layout, g)
        for window in grid_windows(grp.rows, grp.cols, share):
            centre = index[window.centre]
            yield centre, [index[c] for c in window.cells if index[c] != centre]


@register_method("random")
@dataclass(frozen=True)
class RandomPrune(PreLLMMethod):
    """Keeps a uniformly random subset of the budget's size, before the LLM. The draw depends only
    on ``seed`` and the token count, so a seed reproduces the same subset on every sample."""

    scored_by: ClassVar[str] = "layout"

    seed: int = 0

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"random: seed must be a non-negative int, got {self.seed!r}")
        super().__post_init__()

    def select(self, context: SelectionContext) -> KeepPlan:
        rng = np.random.default_rng(self.seed)
        kept = np.sort(rng.choice(context.n_visual, size=context.n_keep, replace=False))
        return self.plan(context, [Stage(PRE_LLM, tuple(kept), position=self.entry_position(context))])


@register_method("uniform_grid")
@dataclass(frozen=True)
class UniformGrid(PreLLMMethod):
    """Keeps a spatially uniform subset: each group's grid is cut into as many near-equal windows
    as its share of the budget (shared in proportion to group size) and each window's centre
    token is kept, before the LLM."""

    scored_by: ClassVar[str] = "layout"

    def select(self, context: SelectionContext) -> KeepPlan:
        kept = sorted(centre for centre, _ in _group_windows(context.layout, context.n_keep))
        return self.plan(context, [Stage(PRE_LLM, tuple(kept), position=self.entry_position(context))])


@register_method("average_pool")
@dataclass(frozen=True)
class AveragePool(PreLLMMethod):
    """Average-pools each group's grid down to its share of the budget: the same windows as
    ``UniformGrid``, each merged (plain mean of its embeddings) into its centre token, which keeps
    its place in the sequence."""

    scored_by: ClassVar[str] = "layout"

    def select(self, context: SelectionContext) -> KeepPlan:
        kept, merges = [], []
        for centre, others in _group_windows(context.layout, context.n_keep):
            kept.append(centre)
            if others:
                merges.append(Merge.mean(centre, others))
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), merges=tuple(merges),
                                         position=self.entry_position(context))])
