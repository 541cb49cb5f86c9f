"""Composition: a tower-side (pre-LLM) method, then an in-LLM method that chooses among its survivors.

Spec: ``first+second`` (``visionzip+pyramiddrop``), parameters as for any method, each prefixed with
its method's name, plus the composition's own ``inner_budget``:
``visionzip+pyramiddrop:visionzip.dominant=40,pyramiddrop.ratio=0.25,inner_budget=0.5``.

How it runs: the first method selects at the composition's budget and contributes its one
``pre_llm`` stage. The second method then sees the M survivors AS ITS WHOLE IMAGE: its context has a
layout of those M tokens (``survivor_layout``), the budget ``inner_budget`` (a fraction of M, or a
count), and a recording restricted to them; its layer callback gets the executor's live state with
the visual tokens renumbered 0..M-1, and every stage it returns is mapped back to the original
indices. So PyramidDrop's ratio list thins the M survivors, and nothing the first dropped can come
back. The composed plan holds both methods' stages; the executor runs it as any other plan.

Which methods fit: the first must act before the LLM only (no layer callback of its own); the
second must select on the live pruned state (a layer callback) and may read from the unpruned
recording only what a pre-LLM stage leaves unchanged for the tokens it keeps, the decoder's input
embeddings (``visual_states``/``text_states`` of layer 0; a merged token's recorded embedding is its
value before the merge). Methods that rank from the unpruned forward's attention deeper in the LLM
(FastV, DART, TopV, ...) would read attention over tokens that no longer exist and are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from workbench.layout import TokenGroup, VisualLayout
from workbench.pruning.budget import Budget, check_budget
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext, SignalNeed
from workbench.pruning.plan import Append, KeepPlan, Merge, Stage, boxed
from workbench.pruning.registry import InvalidMethodParameters, create_method

SEPARATOR = "+"
# What the second method may read from the unpruned recording: per-token decoder inputs.
INPUT_SIGNALS = {"visual_states": "visual", "text_states": "text"}


def is_composed(name: str) -> bool:
    return SEPARATOR in name


def split_name(name: str) -> tuple[str, str]:
    parts = [p.strip() for p in name.split(SEPARATOR)]
    if len(parts) != 2 or not all(parts):
        raise InvalidMethodParameters(f"{name!r}: a composition chains exactly two methods, 'first+second' "
                                      "(a pre-LLM method, then an in-LLM one)")
    return parts[0], parts[1]


def survivor_layout(layout: VisualLayout, kept: np.ndarray) -> VisualLayout:
    """The ``kept`` tokens as a layout of their own: their positions, boxes and images, one 1 x M
    group (the survivors form no grid), no tower map (tower signals are not read through it)."""
    kept = np.asarray(kept, dtype=np.int64)
    m = len(kept)
    image = int(layout.groups[int(layout.group[kept[0]])].image) if m else 0
    return VisualLayout(positions=layout.positions[kept], group=np.zeros(m, dtype=np.int64),
                        cell=np.stack([np.zeros(m, dtype=np.int64), np.arange(m)], axis=1),
                        boxes=layout.boxes[kept], groups=(TokenGroup("survivors", image, 1, m),),
                        image_sizes=layout.image_sizes, sequence_length=layout.sequence_length,
                        separators=layout.separators)


class SurvivorRecording:
    """A recording read through the survivors: visual entries of the decoder's input restricted to
    the ``kept`` rows, text entries as recorded; anything else is not available to a second stage."""

    def __init__(self, recording, kept: np.ndarray):
        self.recording, self.kept = recording, np.asarray(kept, dtype=np.int64)

    def get(self, signal: str, layer: int, rows: str = "last", stack: str = "llm", head=None, view: int = 0):
        kind = INPUT_SIGNALS.get(signal)
        if kind is None or stack != "llm" or layer != 0:
            raise KeyError(f"{signal} ({stack} layer {layer}) is not available after a pre-LLM stage")
        value = self.recording.get(signal, layer, rows, stack, head=head, view=view)
        return value[self.kept] if kind == "visual" else value


def _to_original(stage: Stage, kept: np.ndarray, n_visual: int, passed: tuple[int, ...] = ()) -> Stage:
    """A stage over survivor indices 0..M-1, in original indices 0..N-1; the tower [CLS] tokens the
    first method ``passed`` to the LLM stay (the second method does not see them)."""
    scores = None
    if stage.scores is not None:
        full = np.full(n_visual, np.nan)
        full[kept] = stage.score_array
        scores = tuple(full)
    merges = tuple(Merge(int(kept[m.target]), tuple(int(kept[s]) for s in m.sources), m.weights) for m in stage.merges)
    appends = tuple(Append(int(kept[a.token]), tuple(int(kept[s]) for s in a.sources), a.weights,
                           None if a.after is None else int(kept[a.after])) for a in stage.appends)
    return Stage(stage.where, tuple(int(kept[i]) for i in stage.kept) + tuple(passed), scores, merges,
                 stage.position, appends, stage.dropped)


@dataclass(frozen=True)
class Composed(PruningMethod):
    """``first`` before the LLM, then ``second`` inside it on ``first``'s survivors (see the module)."""

    first: PruningMethod
    second: PruningMethod
    inner_budget: Budget = 0.5  # the second's budget: a fraction of the survivors, or a count (at most them)

    def __post_init__(self):
        default = PruningMethod.layer_callback
        if type(self.first).layer_callback is not default:
            raise InvalidMethodParameters(f"{self.name}: {self.first.name} prunes inside the LLM itself; the first "
                                          "method of a composition must act before the LLM only")
        live_tower = getattr(PruningMethod, "tower_callback", None)
        if getattr(type(self.first), "tower_callback", None) is not live_tower:
            raise InvalidMethodParameters(f"{self.name}: {self.first.name} chooses inside the vision tower as it "
                                          "runs, so its survivors are unknown when the second method is set up")
        if type(self.second).layer_callback is default:
            raise InvalidMethodParameters(f"{self.name}: {self.second.name} does not select on the live pruned "
                                          "state inside the LLM; the second method must (e.g. pyramiddrop)")
        try:
            check_budget(self.inner_budget)
        except ValueError as e:
            raise InvalidMethodParameters(f"{self.name}: inner_budget {e}") from None

    # --- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.first.name}{SEPARATOR}{self.second.name}"

    @property
    def scored_by(self) -> str:  # type: ignore[override]
        return self.second.scored_by  # the final choice is the second's

    @property
    def hooks_layers(self) -> bool:  # type: ignore[override]
        return self.second.hooks_layers

    @property
    def reference(self) -> str:  # type: ignore[override]
        return (f"composition: {self.first.name} before the LLM at the budget, then {self.second.name} inside it on "
                f"the survivors at inner_budget={self.inner_budget}. {self.first.name}: {self.first.reference} "
                f"{self.second.name}: {self.second.reference}")

    @property
    def parts(self) -> tuple[PruningMethod, PruningMethod]:
        """The two methods, first to last (the sweep's code version hashes each one's module)."""
        return (self.first, self.second)

    def params(self) -> dict:
        out = {"inner_budget": self.inner_budget}
        for method in (self.first, self.second):
            out.update({f"{method.name}.{k}": v for k, v in method.params().items()})
        return out

    # --- model --------------------------------------------------------------------------------
    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        second = tuple(SignalNeed(n.signal, n.stack, n.layer, n.rows) for n in self.second.needs(model))
        return tuple(sorted(set(self.first.needs(model)) | set(second)))

    def applicability(self, model: ModelFacts) -> str | None:
        for method in (self.first, self.second):
            reason = method.applicability(model)
            if reason is not None:
                return f"{method.name}: {reason}"
        inside = [n for n in self.first.needs(model) if n.stack == "llm" and n.layer > 0]
        if inside:
            return (f"{self.first.name} ranks inside the LLM (it reads layer {inside[0].layer}); the first method "
                    "of a composition must act before the LLM")
        unreadable = [n for n in self.second.needs(model)
                      if n.signal not in INPUT_SIGNALS or n.stack != "llm" or n.layer != 0]
        if unreadable:
            return (f"{self.second.name} reads {unreadable[0].signal} ({unreadable[0].stack} layer "
                    f"{unreadable[0].layer}) from the unpruned forward, which the first stage changes; a second "
                    "stage may only read the decoder's input embeddings")
        return None

    # --- the two stages -----------------------------------------------------------------------
    def first_stages(self, context: SelectionContext) -> tuple[Stage, ...]:
        """The first method's stages: before the LLM only (in the tower or on its input; a stage
        before decoder layer 0 acts on that input too, as VisionZip's multi-crop contextual tokens
        do), at least one."""
        stages = self.first.select(context).stages
        if not stages or any(stage.in_llm and stage.where != 0 for stage in stages):
            raise InvalidMethodParameters(f"{self.name}: {self.first.name} made stages "
                                          f"{[s.where for s in stages]}; the first method of a composition must "
                                          "prune before the LLM only")
        return stages

    def inner_context(self, context: SelectionContext, kept: np.ndarray) -> SelectionContext:
        recording = None if context.recording is None else SurvivorRecording(context.recording, kept)
        budget = self.inner_budget
        if isinstance(budget, int):  # a count: at most the survivors (their number varies per sample)
            budget = min(budget, len(kept))
        return SelectionContext(survivor_layout(context.layout, kept), budget, recording, context.model)

    def _split(self, context: SelectionContext):
        """(first stages, their image survivors, the second's context, the [CLS] tokens they pass on)."""
        first = self.first_stages(context)
        kept = boxed(first[-1].kept, context.n_visual)
        passed = tuple(int(i) for i in first[-1].kept if i >= context.n_visual)
        return first, kept, self.inner_context(context, kept), passed

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        first, _, inner, passed = self._split(context)
        return tuple(len(s.kept) for s in first) + tuple(c + len(passed) for c in self.second.kept_counts(inner))

    def select(self, context: SelectionContext) -> KeepPlan:
        self.check_applies(context.require_model())
        first, kept, inner, passed = self._split(context)
        later = self.second.select(inner).stages
        if any(not stage.in_llm for stage in later):
            raise InvalidMethodParameters(f"{self.name}: {self.second.name} made a stage before the LLM; the second "
                                          "method of a composition must act inside the LLM only")
        return self.plan(context, list(first) + [_to_original(s, kept, context.n_visual, passed) for s in later])

    def layer_callback(self, context: SelectionContext):
        _, kept, inner, passed = self._split(context)
        callback = self.second.layer_callback(inner)
        if callback is None:
            return None
        survivor_of = np.full(context.n_visual, -1, dtype=np.int64)
        survivor_of[kept] = np.arange(len(kept))
        n_visual = context.n_visual

        def translated(layer, state):
            image = state.visual_indices < n_visual  # a [CLS] the first passed on is not the second's to see
            indices = survivor_of[state.visual_indices[image]]
            if (indices < 0).any():
                raise RuntimeError(f"{self.name}: tokens {state.visual_indices[image][indices < 0][:5]} are alive "
                                   "although the first stage dropped them")
            stage = callback(layer, dataclasses.replace(state, visual_indices=indices, layout=inner.layout,
                                                        visual_rows=state.visual_rows[torch.from_numpy(image)]))
            return None if stage is None else _to_original(stage, kept, n_visual, passed)

        return translated


def compose(name: str, **params) -> Composed:
    """The composition ``name`` ("first+second") with ``params``: "<method>.<param>" for the two
    methods' own hyper-parameters, ``inner_budget`` for the composition's."""
    first_name, second_name = split_name(name)
    if first_name == second_name:
        raise InvalidMethodParameters(f"{name!r}: a composition chains two different methods")
    own = {}
    given: dict[str, dict] = {first_name: {}, second_name: {}}
    for key, value in params.items():
        method, dot, param = key.partition(".")
        if not dot:
            if key != "inner_budget":
                raise InvalidMethodParameters(f"{name}: unknown parameter {key!r}; prefix a method's parameters with "
                                              f"its name ({first_name}.<param> or {second_name}.<param>) or give "
                                              "inner_budget")
            own[key] = value
        elif method in given:
            given[method][param] = value
        else:
            raise InvalidMethodParameters(f"{name}: parameter {key!r} names {method!r}, which is not part of it")
    return Composed(create_method(first_name, **given[first_name]), create_method(second_name, **given[second_name]),
                    **own)
