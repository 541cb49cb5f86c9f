"""The shape every pruning method has: validated hyper-parameters plus ``select(context) -> KeepPlan``.

Like a scikit-learn estimator, a method is a frozen dataclass whose fields are its
hyper-parameters (the paper's defaults), checked in ``__post_init__``. ``select`` is a pure function
of the ``SelectionContext``: the sample's ``VisualLayout``, the budget and, for signal-based methods,
the recording of the unpruned forward. Methods that choose inside the LLM after earlier pruning
(PyramidDrop, SparseVLM, ...) also return a ``layer_callback``, which the executor consults before
each decoder layer with the live, already pruned state.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from workbench.layout import VisualLayout
from workbench.pruning.budget import Budget, resolve_budget
from workbench.pruning.executor import LayerCallback
from workbench.pruning.plan import KeepPlan


@dataclass(frozen=True)
class SelectionContext:
    """What a method may look at for one sample. ``budget``: a count or a fraction (see
    ``resolve_budget``); ``n_keep`` is the resolved count every method must use."""

    layout: VisualLayout
    budget: Budget
    # The unpruned forward's signals (``workbench.recording.Recording``, defined by the probes
    # side); typed loosely here so that pruning does not depend on that module's import.
    recording: object | None = None

    def __post_init__(self):
        resolve_budget(self.budget, self.layout.n_tokens)  # fail at construction, not inside a method

    @property
    def n_visual(self) -> int:
        return self.layout.n_tokens

    @property
    def n_keep(self) -> int:
        return resolve_budget(self.budget, self.layout.n_tokens)


class PruningMethod(ABC):
    """Base class of the registered methods (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = ""

    @abstractmethod
    def select(self, context: SelectionContext) -> KeepPlan:
        """The plan for one sample; a pure function of ``context`` and the hyper-parameters."""

    def layer_callback(self, context: SelectionContext) -> LayerCallback | None:
        """For methods that select inside the LLM on the live pruned state; None for the others."""
        return None

    def params(self) -> dict:
        """Hyper-parameters as plain data (for tables and the dashboard)."""
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    def plan(self, context: SelectionContext, stages) -> KeepPlan:
        return KeepPlan(self.name, context.n_keep, context.n_visual, tuple(stages))
