"""Pruning inside the vision tower: stages after tower layer i, so later tower layers see only the kept tokens.

FlowCut and VisionDrop prune between the layers of the vision encoder in their released code: the
tokens a cut drops are gone for every later tower layer (their keys and values with them), and the
LLM receives only what the tower passed on. This module runs such stages during the one tower pass
that makes the decoder's inputs (``ModelAdapter.llm_inputs``):

* a forward pre-hook on every tower layer after the first cut hands the layer only the alive rows
  ([CLS] first, then the kept patches in order), so its attention has no keys on dropped tokens;
* a forward hook (run before transformers' own output-capturing hooks) on every tower layer asks the
  stage planned after that layer, or the method's ``TowerCallback`` with the layer's live
  ``TowerState``, which patches survive; it applies the stage's merges to the layer's output and
  writes the live rows back into a full-length tensor, so the wrapper's feature selection and
  image-placeholder count see the shape they expect. Rows of dropped patches keep their state at the
  time they were dropped and never reach the LLM: the executor removes them from the decoder's input
  (``llm_entry``), numbering the rest by the last tower stage's position policy.

The [CLS] token is never dropped (both methods keep it as the relay / dominant anchor). Supported
towers: one view per image whose patches are the LLM's visual tokens one to one, i.e. the
LLaVA-1.5 layout (``in_tower_reason`` says why another tower is not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from probes.capture import AttentionCall, attention_call
from probes.interception import listening
from workbench.pruning.executor import apply_merges, check_alive, token_rows
from workbench.pruning.plan import PRE_LLM, KeepPlan, PlanError, Stage, among, describe_where, tower_layer


# How a method's tower-side stages run: inside the tower on its live state (the released code), or
# simulated from one recording of the unpruned tower (every layer's scores over all tokens).
PROGRESSIONS = ("tower", "simulated")


class TowerStageError(RuntimeError):
    """A tower stage that cannot run on this model or input."""


def in_tower_reason(model) -> str | None:
    """Why the vision tower of ``model`` (``ModelFacts``) cannot be pruned inside, or None when it can."""
    if model.multi_view:
        return ("its vision tower encodes several views (tiles) of the image in one batch, and tower stages "
                "prune the sequence of a single view")
    if model.mrope or not model.has_cls_token:
        return ("tower stages run on a [CLS] tower whose patches are the LLM's visual tokens one to one "
                "(LLaVA-1.5-style); this tower's patches are merged or regrouped before the LLM")
    return None


@dataclass(frozen=True)
class TowerState:
    """Vision-tower layer ``layer`` as it just ran on the live tokens (one view, batch size 1).

    ``call``: the layer's attention call (q, k, v as the kernel got them) on the live rows only;
    ``hidden_states`` [1, S, D]: the layer's output on those rows. ``visual_indices``: the original
    visual indices (layout order) still alive, in row order; ``visual_rows``: their rows;
    ``cls_row``: the [CLS] row (always alive)."""

    layer: int
    call: AttentionCall
    hidden_states: torch.Tensor
    visual_indices: np.ndarray
    visual_rows: torch.Tensor
    cls_row: int


TowerCallback = Callable[[int, TowerState], "Stage | None"]


def llm_entry(tower: list[Stage]) -> Stage | None:
    """The decoder-input cut the tower stages imply: the patches the last one kept, numbered by its
    position policy (None when the tower pruned nothing)."""
    if not tower:
        return None
    return Stage(PRE_LLM, tower[-1].kept, position=tower[-1].position)


class _TowerRun:
    """The hooks and bookkeeping of one tower pass; an attention listener for the tower's calls."""

    def __init__(self, adapter, layout, planned: dict[int, Stage], callback: TowerCallback | None):
        self.layers = list(adapter.vision_layers())
        too_deep = [layer for layer in planned if layer >= len(self.layers)]
        if too_deep:
            raise PlanError(f"plan has stages after tower layers {too_deep}; the tower has {len(self.layers)} layers")
        owner = layout.tower_owner
        if len(owner) > 1 or (owner and not np.array_equal(owner[0], np.arange(layout.n_tokens))):
            raise TowerStageError("tower stages need a tower whose patches are the visual tokens one to one; "
                                  f"this layout's tower map has {len(owner)} view(s)")
        self.attention = {adapter.vision_attention(i): i for i in range(len(self.layers))}
        self.offset = 1 if adapter.has_cls_token else 0
        self.n_visual = layout.n_tokens
        self.planned, self.callback = planned, callback
        self.alive: torch.Tensor | None = None  # full-sequence rows alive, None until the first cut
        self.full: torch.Tensor | None = None  # the full-length input of the running layer
        self.call: AttentionCall | None = None
        self.applied: list[Stage] = []

    # --- the attention listener -----------------------------------------------------------------
    def called(self, module, query, key, value, attention_mask, kwargs) -> None:
        if self.callback is not None and module in self.attention:
            if query.shape[0] != 1:
                raise TowerStageError(f"tower stages prune one view at a time; the tower ran a batch of {query.shape[0]}")
            self.call = attention_call(module, [((module, query, key, value, attention_mask), kwargs)])

    def returned(self, module, output, weights) -> None:
        pass

    # --- hooks ----------------------------------------------------------------------------------
    def _kinds(self, length: int) -> np.ndarray:
        if length != self.offset + self.n_visual:
            raise TowerStageError(f"the tower sequence has {length} rows for {self.n_visual} visual tokens "
                                  f"(+{self.offset} [CLS]); tower stages need one row per visual token")
        return np.arange(length) - self.offset  # -1: the [CLS]

    def pre_hook(self, index: int):
        def hook(module, args, kwargs):
            hidden = args[0]
            if hidden.shape[0] != 1:
                raise TowerStageError(f"tower stages prune one view at a time; the tower ran a batch of {hidden.shape[0]}")
            self.full, self.call = hidden, None
            if self.alive is None:
                return None
            rows = self.alive.to(hidden.device)
            args = (hidden.index_select(1, rows),) + tuple(args[1:])
            mask = args[1] if len(args) > 1 else None
            if isinstance(mask, torch.Tensor):  # [B, 1, S, S] additive: both axes cut to the live rows
                args = (args[0], mask.index_select(-2, rows).index_select(-1, rows)) + tuple(args[2:])
            return args, kwargs
        return hook

    def post_hook(self, index: int):
        def hook(module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            kinds = self._kinds(self.full.shape[1])
            pruned = self.alive is not None  # this layer ran on the live rows only
            before = self.alive if pruned else torch.arange(self.full.shape[1])
            stage = self.planned.get(index)
            if self.callback is not None:
                chosen = self.callback(index, self._state(index, out, kinds[before.numpy()]))
                if chosen is not None:
                    if stage is not None:
                        raise PlanError(f"both the plan and the method prune {describe_where(chosen.where)}; "
                                        "a layer takes one stage")
                    if tower_layer(chosen.where) != index:
                        raise PlanError(f"the tower callback after layer {index} returned a stage for "
                                        f"{describe_where(chosen.where)}")
                    stage = chosen
            if stage is not None:
                out = self._apply(stage, out, kinds[before.numpy()], before)
            if pruned:
                full = self.full.clone()
                full[:, before.to(full.device)] = out
                out = full
            elif stage is None:
                return None
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return hook

    def _state(self, index: int, out: torch.Tensor, alive: np.ndarray) -> TowerState:
        if self.call is None:
            raise TowerStageError(f"tower layer {index} did not call its attention function")
        return TowerState(index, self.call, out, alive[alive >= 0].copy(),
                          torch.from_numpy(np.flatnonzero(alive >= 0)), int(np.flatnonzero(alive < 0)[0]))

    def _apply(self, stage: Stage, out: torch.Tensor, alive: np.ndarray, before: torch.Tensor) -> torch.Tensor:
        check_alive(stage, alive[alive >= 0], "tower's sequence")
        out = apply_merges(out, stage, token_rows(alive))
        keep = np.flatnonzero((alive < 0) | among(alive, stage.kept_array))
        self.alive = before[torch.from_numpy(keep)]
        self.applied.append(stage)
        return out


def tower_inputs(adapter, prepared, plan: KeepPlan, callback: TowerCallback | None = None):
    """``(LLMInputs, tower stages applied)`` of one sample: the decoder's inputs made by a tower pass
    that runs ``plan``'s tower stages and ``callback``'s; with neither, the adapter's cached inputs."""
    planned = {tower_layer(s.where): s for s in plan.stages if s.in_tower}
    if not planned and callback is None:
        return adapter.decoder_inputs(prepared), []
    run = _TowerRun(adapter, prepared.layout, planned, callback)
    handles = []
    try:
        for i, layer in enumerate(run.layers):
            handles.append(layer.register_forward_pre_hook(run.pre_hook(i), with_kwargs=True))
            # prepend: transformers' hidden-state capture (a forward hook) must see the written-back output
            handles.append(layer.register_forward_hook(run.post_hook(i), with_kwargs=True, prepend=True))
        with listening(run):
            llm = adapter.llm_inputs(prepared.inputs)
    finally:
        for handle in handles:
            handle.remove()
    return llm, run.applied
