"""Visual-token pruning: plans (what to keep), methods (how to choose), the executor (run under a plan).

``plan``: the ``KeepPlan`` data type. ``method``/``registry``: the method interface and lookup by
name. ``baselines``: layout-only methods. ``executor``: runs a model under a plan (and a per-layer
callback for methods that select inside the LLM).
"""

from workbench.pruning.plan import KeepPlan, Merge, PlanError, Stage

__all__ = ["KeepPlan", "Merge", "PlanError", "Stage"]
