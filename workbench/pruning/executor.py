"""Run a model under a ``KeepPlan``: the pruned prefill, the answer, and what each layer processed.

How it works, for a batch of samples (each under its own plan; a batch of one is the plain case):

* The decoder's inputs are taken from the model's own forward (``adapter.llm_inputs``): the
  merged embeddings, the padding mask and the position ids (3-D for M-RoPE). A ``"pre_llm"``
  stage merges and drops embedding rows at the visual positions and the decoder stack is called
  directly with the shorter ``inputs_embeds``, so no wrapper's image-placeholder check is in the
  way. Text is never dropped; the layout's separators stay unless that stage leaves them out
  (``Stage.separators == "dropped"``: their rows never enter the decoder). The samples are then
  left-padded to one length, with a padding mask, so the model builds every sample's causal mask
  itself.
* A stage "before layer k" is a forward pre-hook on decoder layer k that slices each sample's
  hidden states; since the decoder computes the mask and rotary embeddings once for the whole
  sequence, every layer from the first in-LLM stage on also gets its mask, ``position_embeddings``
  and position ids cut to the surviving rows ("original" policy), or its rotary embeddings
  recomputed for contiguous positions with the model's rotary module ("reindex"). Each sample is
  cut on its own (``_Run``, which sees a batch of one) and the batch re-packed (``_Batch``): left
  padding again, a per-sample mask in which a padding row sees only itself. Layer k onwards
  therefore writes shorter keys/values into the ``DynamicCache``.
* A stage's appended tokens (``Append``: SparseVLM's recycled clusters) are new rows, each the
  weighted sum of its members' states entering the stage, inserted after the row the plan names
  (``arrange``). For the tensors the model passes every layer at full length, an appended row
  borrows the row it follows (its mask row, kept causal in the new order, and its position id under
  "original"); it counts as a visual token of every layer after the stage. The tower's [CLS] a
  ``pre_llm`` stage brings in (``cls_token``) is such a row, made from the projected [CLS] output of
  the tower pass that made the decoder's inputs (``ModelAdapter.tower_cls_capture``); so is a padded
  patch (``padded_patch``: a tower patch the layout has no token for), from that pass's projected
  patch outputs. An appended token made on the tower's features (``Append.space == "tower"``, in the
  ``pre_llm`` stage or before layer 0) is the projector on the weighted sum of its members' unprojected
  patch outputs of that pass (``TowerCls.feed``).
* A masking stage (``Stage.dropped == "masked"``, AIM's code) changes no row: its dropped tokens
  stay in the sequence, are still computed by every later layer and still written to its cache,
  but from layer k on every layer's mask hides their keys from every query (``_hide_keys``), in
  the prefill and while decoding (``_Batch.valid`` holds each sample's hidden rows per layer).
* Decoding is greedy, one token per sample at a time on that cache. Each layer continues from the
  position after its own last prefill token and its mask says which of its cached rows are real,
  so layers that saw different sequences decode consistently.
* Stages ``"tower:i"`` (a plan's, or a job's ``tower_callback``'s) run inside the vision tower during
  the pass that makes the decoder's inputs (``workbench/pruning/tower_stages.py``); the tokens they
  drop never enter the decoder.
* ``callback(layer, LayerState) -> Stage | None`` is consulted before every decoder layer during
  the prefill (after that layer's planned stage, if any), per sample, for methods that select
  inside the LLM after earlier pruning. Every stage applied ends up in ``Execution.plan``. In a
  batch, the callbacks asked at a layer read one attention pass of it on all their samples, and
  callbacks of a class with ``answer_together`` are asked in one call (``consult``).
* No layer computed twice: a run given the sample's ``UnprunedPrefill`` (kept by the unpruned run
  with ``capture=True``) starts at the first layer it prunes before. Layers below it are stood in
  for by ``_Replay`` modules that put the unpruned keys/values into the cache and hand over the
  unpruned hidden states, so the result is exactly that of running from the first layer.
* No row computed twice in a batch: samples that run no stage inside the LLM and whose decoder
  inputs begin with exactly equal rows (questions on one image: the blank-image controls,
  a benchmark's several questions per image under a plan that does not read the question), get
  those rows' keys and values from one prefill of them per group of alike samples
  (``_prefix_groups``), and the batch's prefill runs the rest of each sample on that cache. The
  same answers, logits within float rounding; each sample still counts (``tokens_per_layer``) the
  rows it has.

Not supported: sliding-window attention layers (the cache-aware mask slicing assumes full
attention), "reindex" with multi-axis (M-RoPE) position ids, and sampling.
"""

from __future__ import annotations

import contextlib
import functools
import copy
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import DynamicCache

from workbench.models.base import ModelAdapter, PreparedInput
from workbench.pruning.layer_state import BatchAttention, BatchPlace, LayerState, hooks_suspended
from workbench.pruning.plan import (PRE_LLM, Append, KeepPlan, PlanError, Stage, among, describe_where, missing,
                                    padded_patch_at)

# A callback's class may also have a static ``answer_together(layer, [(callback, state), ...])``
# giving each pair's stage as each callback would alone: a batch's samples are then asked in one
# call (``consult``), so they can read their attention in one product.
LayerCallback = Callable[[int, LayerState], "Stage | None"]

_OTHER, _SEPARATOR = -1, -2  # row kinds besides a visual index 0..N-1


class ExecutionError(RuntimeError):
    """The plan is valid but cannot be run on this model/input as asked."""


@dataclass(frozen=True)
class Execution:
    """One sample run under one plan.

    ``answer_logprob``: sum of the greedy answer tokens' log-probabilities (end-of-sequence
    excluded, as ``Answer.logprob``). ``gold_logprob``: the same for the gold answer, teacher
    forced on the same pruned cache. ``logits``: [V] float32 on the CPU, the prefill's last
    position. ``plan``: every stage actually applied (the plan's and the callback's).
    ``tokens_per_layer``: the rows each decoder layer computed in the prefill (appended tokens and
    masked tokens included: what FLOPs count). ``visual_tokens_per_layer``: the visual tokens each
    layer attends to (visible keys; appended tokens included, masked ones not).
    ``masked_tokens_per_layer``: visual rows each layer computed with their keys hidden (masking
    stages); a layer's visual rows are ``visual + masked``.
    """

    answer: str
    answer_ids: tuple[int, ...]
    answer_logprob: float
    gold_logprob: float | None
    logits: torch.Tensor
    plan: KeepPlan
    tokens_per_layer: tuple[int, ...]
    visual_tokens_per_layer: tuple[int, ...]
    prefill_seconds: float = 0.0  # wall time of the pruned prefill alone (in-LLM selection included;
    # in a batch, the batch's divided by its size)
    first_layer: int = 0  # the first decoder layer the prefill computed (resumed runs start later)
    prefill: "UnprunedPrefill | None" = None  # kept for later runs when asked (``capture``)
    masked_tokens_per_layer: tuple[int, ...] = ()

    @property
    def kept_per_stage(self) -> dict:
        return self.plan.kept_per_stage

    @property
    def final_kept(self) -> tuple[int, ...]:
        return self.plan.final_kept


# --- small tensor helpers ------------------------------------------------------------------------

def _take(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.index_select(dim, index.to(tensor.device))


def _slice_square_mask(mask, index: torch.Tensor):
    """A [B, 1, Sq, Sk] prefill mask restricted to the same rows on both axes (None stays causal)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ExecutionError(f"decoder layers get a {type(mask).__name__} mask; the executor slices 4-D tensor masks only")
    return _take(_take(mask, index, -2), index, -1)


def check_alive(stage: Stage, alive: np.ndarray, sequence: str) -> None:
    """``PlanError`` when ``stage`` keeps or merges a visual token not among ``alive`` (the
    visual tokens still in ``sequence``)."""
    where = describe_where(stage.where)
    dead = missing(stage.kept_array, alive)
    if dead:
        raise PlanError(f"stage {where}: keeps {dead[:5]} which are no longer in the {sequence}")
    for merge in stage.merges:
        gone = missing(merge.sources, alive)
        if gone:
            raise PlanError(f"stage {where}: merge into {merge.target} uses sources {gone[:5]} already dropped")
    for append in stage.appends:
        gone = missing(append.sources + (() if append.place is None else (append.place,)), alive)
        if gone:
            raise PlanError(f"stage {where}: appended token {append.token} uses tokens {gone[:5]} already dropped")


def token_rows(alive: np.ndarray) -> dict[int, int]:
    """Row of each visual token in a sequence whose rows hold ``alive`` (visual index, or < 0)."""
    rows = np.flatnonzero(alive >= 0)
    return dict(zip(alive[rows].tolist(), rows.tolist()))


def apply_merges(states: torch.Tensor, stage: Stage, row_of: dict[int, int]) -> torch.Tensor:
    """Weighted sums at the target rows, all read from the states before any merge of this stage."""
    if not stage.merges:
        return states
    out = states.clone()
    for merge in stage.merges:
        rows = [row_of[merge.target]] + [row_of[s] for s in merge.sources]
        weights = torch.tensor(merge.weights, dtype=states.dtype, device=states.device)
        out[:, rows[0]] = torch.einsum("r,brd->bd", weights, states[:, rows])
    return out


@dataclass(frozen=True)
class Arrangement:
    """The rows after a stage, as rows before it: ``order[i]`` is the row that row i comes from, or,
    for an appended token, the row it is inserted after (or before: ``Append.before``), its stand-in
    for the mask and for the position id under "original". ``appended``: (row after the stage, the
    ``Append`` it holds)."""

    order: torch.Tensor
    appended: tuple[tuple[int, Append], ...]


def arrange(stage: Stage, alive: np.ndarray) -> Arrangement:
    """Where every row goes under ``stage``; ``alive``: per row before it, the visual index or < 0."""
    moved = [append.token for append in stage.appends]
    other = (alive < 0) & ~((alive == _SEPARATOR) & (stage.separators == "dropped"))
    keep = other | (among(alive, stage.kept_array) & ~among(alive, moved))
    if not stage.appends:
        return Arrangement(torch.from_numpy(np.flatnonzero(keep)), ())
    visual = np.flatnonzero(alive >= 0)
    row_of = {int(v): i for i, v in enumerate(alive) if v >= 0}
    inserted: dict[int, list[Append]] = {}
    ahead: dict[int, list[Append]] = {}  # inserted before the row
    for append in stage.appends:
        if append.before is not None:
            ahead.setdefault(row_of[append.before], []).append(append)
        else:
            inserted.setdefault(int(visual[-1]) if append.after is None else row_of[append.after], []).append(append)
    order, appended = [], []
    for row in range(len(alive)):
        for append in ahead.get(row, ()):
            appended.append((len(order), append))
            order.append(row)
        if keep[row]:
            order.append(row)
        for append in inserted.get(row, ()):
            appended.append((len(order), append))
            order.append(row)
    return Arrangement(torch.tensor(order, dtype=torch.long), tuple(appended))


def apply_appends(before: torch.Tensor, after: torch.Tensor, arrangement: Arrangement,
                  row_of: dict[int, int], entering: dict[int, torch.Tensor] | None = None,
                  made: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """``after`` (the rows of ``arrangement``) with each appended row set to its weighted sum of the
    states ``before`` the stage (rows ``row_of``); a token with no row before it (the tower's [CLS]
    entering the sequence) is ``weights[0]`` times its ``entering`` state ([D]); a token ``made``
    elsewhere (on the tower's features) takes that row ([D]) as it is."""
    if not arrangement.appended:
        return after
    out = after.clone()
    for row, append in arrangement.appended:
        weights = torch.tensor(append.weights, dtype=before.dtype, device=before.device)
        if made and append.token in made:
            out[:, row] = made[append.token].to(before.dtype)
            continue
        if entering and append.token in entering:
            out[:, row] = weights[0] * entering[append.token].to(before.dtype)
            continue
        members = torch.tensor([row_of[t] for t in append.members], device=before.device)
        out[:, row] = torch.einsum("r,brd->bd", weights, before[:, members])
    return out


def _causal_at(mask, rows: torch.Tensor):
    """A [B, 1, S, S] mask whose ``rows`` (and their columns) follow the sequence order causally: an
    appended row borrows the mask of the row it follows, which must not let it see later rows nor be
    seen by earlier ones. None (plain causal) stays None."""
    if mask is None or not len(rows):
        return mask
    size = mask.shape[-1]
    involved = torch.zeros(size, size, dtype=torch.bool, device=mask.device)
    involved[rows.to(mask.device)] = True
    involved[:, rows.to(mask.device)] = True
    forbidden = involved & ~torch.ones(size, size, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return mask & ~forbidden
    return mask.masked_fill(forbidden, torch.finfo(mask.dtype).min)


def _hide_keys(mask, hidden: np.ndarray, device):
    """A [1, 1, S, S] prefill mask (None: causal) with the keys of the ``hidden`` rows masked for every
    query, their own rows included (AIM's code masks keys through its padding mask). A row left with
    no key at all (no visible row before it) keeps its own, as a padding row does, so attention
    never meets an empty row."""
    if not hidden.any():
        return mask
    if mask is None:
        mask = torch.ones(len(hidden), len(hidden), dtype=torch.bool, device=device).tril()[None, None]
    columns = torch.from_numpy(hidden).to(mask.device)
    if mask.dtype == torch.bool:
        out = mask & ~columns
    else:
        out = mask.masked_fill(columns, torch.finfo(mask.dtype).min)
    empty = torch.nonzero(~_allowed(out)[0, 0].any(-1))[:, 0]
    if len(empty):
        out = out.clone()
        out[..., empty, empty] = True if out.dtype == torch.bool else 0
    return out


def _reindexed(positions: torch.Tensor, count: int, where) -> torch.Tensor:
    if positions.dim() != 2:
        raise ExecutionError(f"stage {describe_where(where)}: 'reindex' needs 1-D position ids; this model "
                             f"uses {positions.shape[0]}-axis (M-RoPE) positions, use 'original'")
    return torch.arange(count, device=positions.device).unsqueeze(0).expand(positions.shape[0], -1)


# --- batches -------------------------------------------------------------------------------------
# A batch is left-padded: every sample's rows sit at the end of the sequence axis, so the last row is
# every sample's last token and decoding appends after it. Dims: hidden [B, S, D], masks [B, 1, S, S],
# position ids [B, S] or [A, B, S] (M-RoPE), rotary cos/sin [B, S, d] or [A, B, S, d], keys/values
# [B, H, S, d]; the batch axis sits just before the sequence axis except for masks and keys/values.

def sample_rows(tensor: torch.Tensor, b: int, span: slice, batch_dim: int, seq_dims: tuple[int, ...]) -> torch.Tensor:
    """Sample ``b`` of a batch tensor (kept as a batch of one; a batch axis of one is every
    sample's), its positions ``span`` on the sequence axes: its rows of a left- or right-padded batch."""
    batch_dim %= tensor.dim()
    out = tensor.narrow(batch_dim, b if tensor.shape[batch_dim] > 1 else 0, 1)
    for dim in seq_dims:
        dim %= tensor.dim()
        start, stop, _ = span.indices(out.shape[dim])
        out = out.narrow(dim, start, stop - start)
    return out


def sample_layer_kwargs(kwargs: dict, b: int, span: slice) -> dict:
    """Sample ``b``'s part of what the model passes every decoder layer (``_LAYER_KWARGS``): its
    positions ``span`` of the batch's mask, rotary embeddings and position ids."""
    out = dict(kwargs)
    if kwargs.get("attention_mask") is not None:
        out["attention_mask"] = sample_rows(kwargs["attention_mask"], b, span, 0, (2, 3))
    if kwargs.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(sample_rows(t, b, span, -3, (-2,)) for t in kwargs["position_embeddings"])
    if kwargs.get("position_ids") is not None:
        out["position_ids"] = sample_rows(kwargs["position_ids"], b, span, -2, (-1,))
    return out


def _pack(parts: list[torch.Tensor], batch_dim: int, seq_dim: int) -> torch.Tensor:
    """Samples (each a batch of one) left-padded with zeros along ``seq_dim`` to the longest, then
    stacked along ``batch_dim``. Zero padding keeps every padded row finite (no NaN can leak)."""
    if len(parts) == 1:
        return parts[0]
    longest = max(p.shape[seq_dim] for p in parts)
    if all(p.shape[seq_dim] == longest for p in parts):
        return torch.cat(parts, dim=batch_dim)
    # One allocation, each sample copied into its place (not a padded copy of each, then a concatenation).
    shape = list(parts[0].shape)
    shape[seq_dim], shape[batch_dim] = longest, sum(p.shape[batch_dim] for p in parts)
    out = parts[0].new_zeros(shape)
    start = 0
    for part in parts:
        n, length = part.shape[batch_dim], part.shape[seq_dim]
        out.narrow(batch_dim, start, n).narrow(seq_dim, longest - length, length).copy_(part)
        start += n
    return out


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where a 4-D mask lets a query see a key (bool masks as they are; additive ones where 0)."""
    return mask if mask.dtype == torch.bool else mask == 0


def _pack_masks(masks: list, lengths: list[int], device) -> torch.Tensor | None:
    """One [B, 1, S, S] bool mask from each sample's own (None: causal). A padding row sees only
    itself, so attention never meets a row with no key at all."""
    if len(masks) == 1:
        return masks[0]
    longest = max(lengths)
    if all(m is None for m in masks) and min(lengths) == longest:
        return None
    out = torch.zeros(len(masks), 1, longest, longest, dtype=torch.bool, device=device)
    for b, (mask, n) in enumerate(zip(masks, lengths)):
        start = longest - n
        out[b, :, start:, start:] = (torch.ones(n, n, dtype=torch.bool, device=device).tril() if mask is None
                                     else _allowed(mask)[0].to(device))
        pad = torch.arange(start, device=device)
        out[b, :, pad, pad] = True
    return out


def _valid_rows(lengths: list[int], device, hidden: list[np.ndarray] | None = None) -> torch.Tensor | None:
    """[B, S] bool, False on the padding rows and on each sample's rows whose keys are ``hidden``
    (per sample, one flag per row); None when there are neither."""
    longest = max(lengths)
    if min(lengths) == longest and (hidden is None or not any(h.any() for h in hidden)):
        return None
    valid = torch.arange(longest, device=device).unsqueeze(0) >= torch.tensor(
        [longest - n for n in lengths], device=device).unsqueeze(1)
    for b, flags in enumerate(hidden or ()):
        valid[b, longest - len(flags):] &= ~torch.from_numpy(flags).to(device)
    return valid


def _pack_layer_inputs(states: list[tuple[torch.Tensor, dict]], template: dict, device) -> tuple[torch.Tensor, dict]:
    """Samples' (hidden [1, S_b, D], what the layer is called with) side by side for one layer call:
    left-padded, per-sample masks, rotary embeddings and positions (each where ``template``, what
    the model passes its layers, has one)."""
    lengths = [h.shape[1] for h, _ in states]
    kwargs = {"attention_mask": _pack_masks([k.get("attention_mask") for _, k in states], lengths, device)}
    if template.get("position_embeddings") is not None:
        rotary = [k["position_embeddings"] for _, k in states]
        kwargs["position_embeddings"] = tuple(_pack([r[i] for r in rotary], -3, -2) for i in range(2))
    if template.get("position_ids") is not None:
        kwargs["position_ids"] = _pack([k["position_ids"] for _, k in states], -2, -1)
    return _pack([h for h, _ in states], 0, 1), kwargs


# --- the run ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _LayerRecord:
    rows: torch.Tensor  # rows of the decoder-input sequence this layer processed (and caches)
    last_position: torch.Tensor  # position ids of its last row, [1, 1] or [A, 1, 1]
    visual: int  # visual rows visible as keys
    hidden: np.ndarray  # per row of ``rows``: its key is hidden (a masking stage dropped it)


@dataclass(frozen=True)
class UnprunedPrefill:
    """The unpruned prefill of one sample (``execute(..., capture=True)``): the hidden states entering
    every decoder layer, every layer's keys and values, and what the layers were called with. A
    run that first prunes before layer k starts there (``resume``) instead of recomputing layers
    0..k-1, which are the same."""

    inputs: tuple[torch.Tensor, ...]  # per layer, [1, L, D]
    keys: tuple[torch.Tensor, ...]  # per layer, [1, H, L, d]
    values: tuple[torch.Tensor, ...]
    kwargs: dict  # attention_mask, position_embeddings, position_ids as every layer got them

    @property
    def depth(self) -> int:
        """The layers a run can take from it instead of computing them: all but the last of a
        whole prefill (which keeps what enters each layer, not what leaves the last); all of one
        taken from a recorded forward (``recorded_prefill``), which also keeps the last output."""
        return min(len(self.inputs) - 1, len(self.keys))


class _Run:
    """One sample's side of a run: which original rows are alive, their positions and rotary
    embeddings, the stages applied, what each layer processed. It sees its own sample only (a batch
    of one); ``_Batch`` packs the samples together."""

    def __init__(self, adapter: ModelAdapter, prepared: PreparedInput, plan: KeepPlan,
                 callback: LayerCallback | None, tower_callback=None):
        self.adapter, self.prepared, self.layout, self.plan, self.callback = adapter, prepared, prepared.layout, plan, callback
        self.tower_callback = tower_callback
        self.layers = list(adapter.decoder_layers())
        self.planned = {s.where: s for s in plan.stages if s.in_llm}
        too_deep = [w for w in self.planned if w >= len(self.layers)]
        if too_deep:
            raise ExecutionError(f"plan has stages before layers {too_deep}; the decoder has {len(self.layers)} layers")
        self.applied: list[Stage] = []
        self.records: dict[int, _LayerRecord] = {}
        self.consulted = 0  # the callback has already answered None for the layers below this one
        self.prechosen: dict[int, Stage] = {}  # a callback's answer obtained while finding the resume layer

    # --- pre-LLM ------------------------------------------------------------------------------
    def decoder_inputs(self):
        # Stages inside the vision tower run during the tower pass that makes the decoder's inputs.
        from workbench.pruning.tower_stages import llm_entry, tower_inputs  # it builds on this module

        stage = next((s for s in self.plan.stages if s.where == PRE_LLM), None)
        # the tower's [CLS] tokens and padded patches this stage brings in (``cls_token``, ``padded_patch``):
        # made from the same tower pass
        entering = [a.token for a in stage.appends if a.token >= self.layout.n_tokens] if stage is not None else []
        on_tower = any([self._tower_places(s) for s in self.plan.stages])  # each checked before the tower pass
        with self._tower_cls(entering, on_tower) as cls:
            llm, tower = tower_inputs(self.adapter, self.prepared, self.plan, self.tower_callback)
        entered = self._entering_rows(entering, cls)
        self.feed = cls.feed if on_tower else None  # the tower pass's unprojected patches, for ``_tower_rows``
        self.applied.extend(tower)
        embeds, mask, positions = llm.inputs_embeds, llm.attention_mask, llm.position_ids
        if embeds.shape[0] != 1:
            raise ExecutionError(f"each prepared input holds one sample, got a batch of {embeds.shape[0]}")
        length = embeds.shape[1]
        if self.layout.sequence_length != length:
            raise ExecutionError(f"layout describes {self.layout.sequence_length} tokens, the decoder got {length}")
        kinds = np.full(length, _OTHER, dtype=np.int64)
        kinds[self.layout.separators] = _SEPARATOR
        kinds[self.layout.positions] = np.arange(self.layout.n_tokens)
        if positions.dim() != 2 and any(s.position == "reindex" for s in self.plan.stages):
            where = next(s.where for s in self.plan.stages if s.position == "reindex")
            _reindexed(positions, length, where)  # raises: reindex needs 1-D positions
        self.sequence_index = np.arange(length)  # original sequence index of each decoder-input row
        entry = stage if stage is not None else llm_entry(tower)  # what the tower dropped never enters
        if entry is not None:
            stage, planned_stage = entry, stage
            row_of = token_rows(kinds)
            arrangement = arrange(stage, kinds)
            keep = arrangement.order
            embeds = apply_appends(embeds, _take(apply_merges(embeds, stage, row_of), keep, 1), arrangement, row_of,
                                   entered, self._tower_rows(stage))
            mask = _take(mask, keep, 1)
            if stage.position == "reindex":
                positions = _reindexed(positions, len(keep), stage.where)
            else:
                positions = _take(positions, keep, -1)
            kinds, self.sequence_index = kinds[keep.numpy()], self.sequence_index[keep.numpy()]
            for row, append in arrangement.appended:
                kinds[row] = append.token
            if planned_stage is not None:
                self.applied.append(stage)
        self.kinds = kinds  # per decoder-input row: visual index, or _OTHER / _SEPARATOR
        self.rows = torch.arange(len(kinds))  # rows alive now, into the decoder-input sequence
        # Tokens appended inside the LLM get rows past the decoder input (``kinds`` grows); for the
        # model's full-length tensors each stands in as the input row it follows (``stand_in``).
        self.inputs = len(kinds)
        self.stand_in = np.arange(len(kinds))
        self.hidden = np.zeros(len(kinds), dtype=bool)  # per row (as ``kinds``): its key is hidden (masked)
        self.positions = positions  # position ids of the alive rows
        self.rotary = None  # (cos, sin) of the alive rows once an in-LLM stage ran; None: the model's
        self.reindexed = False
        return embeds, mask, positions, llm.extra

    def _padded(self, entering: list[int]) -> dict[int, tuple[int, int]]:
        """The (view, patch) of each of the ``entering`` tokens that names a padded patch (``padded_patch``)."""
        sizes = [len(owner) for owner in self.layout.tower_owner]
        out = {}
        for token in entering:
            place = padded_patch_at(token, self.layout.n_tokens, sizes)
            if place is not None:
                owner = int(self.layout.tower_owner[place[0]][place[1]])
                if owner >= 0:
                    raise PlanError(f"reserved token {token} names patch {place[1]} of tower view {place[0]}, which "
                                    f"feeds visual token {owner}: a plan names it by that index")
                out[token] = place
        return out

    @contextlib.contextmanager
    def _tower_cls(self, entering: list[int], on_tower: bool = False):
        """The projected [CLS] outputs of the tower views (``.features``, [views, D]), and their patch
        outputs (``.patches``, [views, P, D]; ``.feed`` unprojected) when padded patches enter or
        ``on_tower`` (a plan's token is made on the tower's features), for a plan whose pre-LLM stage
        brings the ``entering`` reserved tokens in: those of the tower pass made within (which runs the
        tower stages), or of the sample's own tower pass when none runs there."""
        if not entering and not on_tower:
            yield None
            return
        padded = self._padded(entering)
        classes = [t for t in entering if t not in padded]
        if classes and not self.adapter.has_cls_token:
            raise ExecutionError(f"the plan passes the vision tower's [CLS] (tokens {classes}) to the LLM; "
                                 f"this model's tower ({type(self.adapter.vision_tower()).__name__}) has no [CLS]")
        with self.adapter.tower_cls_capture(patches=bool(padded) or on_tower) as seen:
            yield seen
        if classes and seen.features is None:
            seen.features = self.adapter.tower_cls(self.prepared)
        if (padded or on_tower) and seen.patches is None:
            seen.patches = self.adapter.tower_patches(self.prepared)
            seen.feed = self.adapter.tower_patches(self.prepared, projected=False)
        views = len(seen.features) if classes else 0
        if classes and max(classes) >= self.layout.n_tokens + views:
            raise ExecutionError(f"the plan passes the [CLS] of tower view {max(classes) - self.layout.n_tokens}; "
                                 f"the tower encoded {views} view(s)")
        sizes = [len(owner) for owner in self.layout.tower_owner]
        if padded and (seen.patches.shape[0] != len(sizes) or seen.patches.shape[1] != max(sizes)):
            raise ExecutionError(f"the plan passes padded tower patches; the tower pass gave {seen.patches.shape[0]} "
                                 f"view(s) of {seen.patches.shape[1]} patches, the layout maps views of {sizes}")

    def _tower_places(self, stage: Stage) -> dict[Append, list[tuple[int, int]]]:
        """(view, patch) of every member of each of ``stage``'s appended tokens made on the tower's
        features (``Append.space`` "tower"); ``PlanError`` for a member that is no single tower patch."""
        appends = [a for a in stage.appends if a.space == "tower"]
        if not appends:
            return {}
        owner, n = self.layout.tower_owner, self.layout.n_tokens
        sizes = [len(o) for o in owner]
        tokens = np.concatenate(owner) if owner else np.zeros(0, dtype=np.int64)
        starts = np.cumsum([0] + sizes)

        def place(append: Append, member: int) -> tuple[int, int]:
            if member >= n:
                if padded_patch_at(member, n, sizes) is None:
                    raise PlanError(f"stage {describe_where(stage.where)}: appended token {append.token} is made on "
                                    f"the tower's features, but its member {member} is a tower's [CLS], not a patch")
                return self._padded([member])[member]
            hits = np.flatnonzero(tokens == member)
            if len(hits) != 1:
                raise PlanError(f"stage {describe_where(stage.where)}: appended token {append.token} is made on the "
                                f"tower's features, but its member {member} owns {len(hits)} tower patches "
                                "(a member must own exactly one)")
            view = int(np.searchsorted(starts, hits[0], side="right") - 1)
            return view, int(hits[0] - starts[view])

        return {a: [place(a, t) for t in a.members] for a in appends}

    def _tower_rows(self, stage: Stage) -> dict[int, torch.Tensor]:
        """[D] of each of ``stage``'s appended tokens made on the tower's features (``Append.space``
        "tower"): the projector on the weighted sum of its members' feed-layer patch outputs."""
        places = self._tower_places(stage)
        if not places:
            return {}
        feed = self.feed if self.feed is not None else self.adapter.tower_patches(self.prepared, projected=False)
        sums = torch.stack([torch.einsum("r,rd->d", torch.tensor(a.weights, dtype=feed.dtype, device=feed.device),
                                         torch.stack([feed[v, p] for v, p in at])) for a, at in places.items()])
        with torch.no_grad():
            rows = self.adapter.projector()(sums[None])[0]
        return {a.token: row for a, row in zip(places, rows)}

    def _entering_rows(self, entering: list[int], seen) -> dict[int, torch.Tensor]:
        """[D] of each reserved token the pre-LLM stage brings in: a [CLS] output or a padded patch's."""
        padded = self._padded(entering)
        return {t: seen.patches[padded[t]] if t in padded else seen.features[t - self.layout.n_tokens]
                for t in entering}

    # --- per layer ------------------------------------------------------------------------------
    def _cut_kwargs(self, kwargs: dict) -> dict:
        """The model passes every layer full-length mask and rotary embeddings; cut them to the
        rows alive now (a no-op until the first in-LLM stage)."""
        if self.rotary is None:
            return kwargs
        kwargs = dict(kwargs)
        rows = torch.from_numpy(self.stand_in[self.rows.numpy()])
        kwargs["attention_mask"] = _hide_keys(
            _causal_at(_slice_square_mask(kwargs.get("attention_mask"), rows),
                       torch.from_numpy(np.flatnonzero(self.rows.numpy() >= self.inputs))),
            self.hidden[self.rows.numpy()], self.positions.device)
        kwargs["position_embeddings"] = self.rotary
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self.positions if self.reindexed else _take(kwargs["position_ids"], rows, -1)
        return kwargs

    def _apply_stage(self, stage: Stage, hidden: torch.Tensor, kwargs: dict):
        alive = self.kinds[self.rows.numpy()]
        visible = (alive >= 0) & ~self.hidden[self.rows.numpy()]
        where = describe_where(stage.where)
        alive_cls = alive[alive >= self.layout.n_tokens]  # the tower's [CLS] tokens in the sequence
        if len(stage.kept) and ((stage.kept[-1] >= self.layout.n_tokens and stage.kept[-1] not in alive_cls)
                                or stage.kept[0] < 0):
            raise PlanError(f"stage {where}: kept indices out of range 0..{self.layout.n_tokens - 1}")
        check_alive(stage, alive[visible], "sequence")
        row_of = token_rows(alive) if stage.merges or stage.appends else {}
        if stage.dropped == "masked":
            # Every row stays; the visible tokens the stage drops only lose their keys.
            self.hidden[self.rows.numpy()[visible & ~among(alive, stage.kept_array)]] = True
            arrangement = Arrangement(torch.arange(len(alive)), ())
        else:
            arrangement = arrange(stage, alive)
        keep = arrangement.order
        hidden = apply_appends(hidden, _take(apply_merges(hidden, stage, row_of), keep, 1), arrangement, row_of,
                               made=self._tower_rows(stage))
        rows = self.rows[keep]
        if arrangement.appended:
            made = torch.tensor([row for row, _ in arrangement.appended])
            rows[made] = torch.arange(len(self.kinds), len(self.kinds) + len(made))
            self.stand_in = np.concatenate([self.stand_in, self.stand_in[self.rows[keep[made]].numpy()]])
            self.sequence_index = np.concatenate([self.sequence_index, self.sequence_index[self.rows[keep[made]].numpy()]])
            self.kinds = np.concatenate([self.kinds, [append.token for _, append in arrangement.appended]])
            self.hidden = np.concatenate([self.hidden, np.zeros(len(made), dtype=bool)])
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = _hide_keys(
            _causal_at(_slice_square_mask(kwargs.get("attention_mask"), keep),
                       torch.from_numpy(np.flatnonzero(rows.numpy() >= self.inputs))),
            self.hidden[rows.numpy()], hidden.device)
        if stage.position == "reindex":
            self.positions = _reindexed(self.positions, len(keep), stage.where)
            self.rotary = self.adapter.decoder_rotary()(hidden, self.positions)
            self.reindexed = True
        else:
            self.positions = _take(self.positions, keep, -1)
            if kwargs.get("position_embeddings") is None:
                raise ExecutionError(f"decoder layer {stage.where} gets no position_embeddings (its attention "
                                     "computes RoPE itself); in-LLM pruning needs them passed to the layers")
            cos, sin = kwargs["position_embeddings"]
            self.rotary = (_take(cos, keep, -2), _take(sin, keep, -2))
        kwargs["position_embeddings"] = self.rotary
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self.positions if self.reindexed else _take(kwargs["position_ids"], keep, -1)
        self.rows = rows
        self.applied.append(stage)
        return hidden, kwargs

    def layer_state(self, index: int, module, hidden, kwargs, shared: BatchPlace | None = None) -> LayerState:
        alive = self.kinds[self.rows.numpy()]
        masked = self.hidden[self.rows.numpy()]
        after_image = self.sequence_index[self.rows.numpy()] > (self.layout.positions.max() if self.layout.n_tokens else -1)
        position_embeddings = kwargs.get("position_embeddings")
        return LayerState(
            layer=index, hidden_states=hidden, visual_indices=alive[(alive >= 0) & ~masked].copy(),
            visual_rows=torch.from_numpy(np.flatnonzero((alive >= 0) & ~masked)),
            masked_rows=torch.from_numpy(np.flatnonzero(masked)),
            text_rows=torch.from_numpy(np.flatnonzero((alive == _OTHER) & after_image)),
            separator_rows=torch.from_numpy(np.flatnonzero(alive == _SEPARATOR)),
            position_ids=self.positions, position_embeddings=position_embeddings,
            attention_mask=kwargs.get("attention_mask"), module=module,
            attention_module=self.adapter.decoder_attention(index), layout=self.layout, shared=shared,
        )

    def check_chosen(self, index: int, chosen: Stage | None) -> Stage | None:
        if chosen is not None and chosen.where != index:
            raise PlanError(f"the callback before layer {index} returned a stage for {describe_where(chosen.where)}")
        return chosen

    def prunes_before_llm(self) -> bool:
        return self.tower_callback is not None or any(not s.in_llm for s in self.plan.stages)

    def record(self, index: int) -> None:
        alive, hidden = self.kinds[self.rows.numpy()], self.hidden[self.rows.numpy()]
        self.records[index] = _LayerRecord(self.rows, self.positions[..., -1:], int(((alive >= 0) & ~hidden).sum()),
                                           hidden.copy())

    def record_unchanged(self, index: int) -> None:
        """``record`` of a layer no stage came before: the record of the layer before it."""
        if index - 1 in self.records:
            self.records[index] = self.records[index - 1]
        else:
            self.record(index)

    def enter(self, index: int, hidden, kwargs):
        """The sequence entering layer ``index`` and what the layer is called with, the plan's stage
        there applied: what the callback sees."""
        kwargs = self._cut_kwargs(kwargs)
        planned = self.planned.get(index)
        if planned is not None:
            hidden, kwargs = self._apply_stage(planned, hidden, kwargs)
        return hidden, kwargs

    def choose(self, index: int, chosen: Stage | None, hidden, kwargs):
        """The callback's stage before layer ``index`` (``consult``) applied to what ``enter`` gave,
        the layer recorded."""
        if chosen is not None:
            if index in self.planned:
                raise PlanError(f"both the plan and the callback prune before layer {index}; a layer takes one stage")
            hidden, kwargs = self._apply_stage(chosen, hidden, kwargs)
        self.record(index)
        return hidden, kwargs

    def acts_at(self, index: int) -> bool:
        """Whether a stage may apply before layer ``index``: planned there, chosen there already, or
        the callback still to be asked."""
        return index in self.planned or index in self.prechosen or self.asks(index)

    def asks(self, index: int) -> bool:
        """Whether the callback will be asked before layer ``index`` (and may read its attention)."""
        return self.callback is not None and index >= self.consulted and index not in self.prechosen


class _Batch:
    """The samples of one run together: packs their decoder inputs, asks each sample's ``_Run``
    before every layer, and re-packs the batch (padding, per-sample masks, positions and rotary
    embeddings) once any sample pruned inside the LLM. Lives only inside ``execute_batch``."""

    def __init__(self, adapter: ModelAdapter, runs: list[_Run], capture: bool):
        self.adapter, self.runs = adapter, runs
        self.layers = runs[0].layers
        self.mode = "prefill"
        self.decode_step = 0
        self.repacked = False  # some sample pruned inside the LLM: layers get the batch's own tensors
        self.layer_kwargs: dict | None = None  # those tensors (mask, rotary, positions) as the last packing made them
        self.valid: dict[int, torch.Tensor | None] = {}  # per layer: [B, S] real (not padding) rows
        self.captured: list[dict] | None = [{} for _ in runs] if capture else None
        self.prefix: _Prefixes | None = None  # the rows groups of samples begin with alike, prefilled once

    def sample_inputs(self) -> list[tuple]:
        """Each sample's decoder inputs (embeddings, mask, positions, extra), its pre-LLM stage applied."""
        parts = [run.decoder_inputs() for run in self.runs]
        if len(parts) > 1 and any(extra for *_, extra in parts):
            raise ExecutionError("this model passes its decoder extra inputs; it runs one sample at a time")
        return parts

    def decoder_inputs(self, parts: list[tuple], share_prefix: bool = False):
        """The samples' decoder inputs (``sample_inputs``) left-padded to one length; with
        ``share_prefix``, those past the rows each begins with alike others (``self.prefix``), the
        mask covering those rows too."""
        groups = _prefix_groups(parts) if share_prefix else None
        if groups is not None:
            group, shared = groups
            heads = [parts[group.index(g)] for g in range(len(shared))]  # a group's first sample
            self.prefix = _Prefixes(_pack([h[0][:, :n] for h, n in zip(heads, shared)], 0, 1),
                                    _pack([h[1][:, :n] for h, n in zip(heads, shared)], 0, 1),
                                    _pack([h[2][..., :n] for h, n in zip(heads, shared)], -2, -1),
                                    torch.tensor(group, device=heads[0][0].device))
            parts = [(embeds[:, shared[g]:], mask[:, shared[g]:], positions[..., shared[g]:], extra)
                     for (embeds, mask, positions, extra), g in zip(parts, group)]
        lengths = [embeds.shape[1] for embeds, *_ in parts]
        # Each sample's first row in the packed batch; read only by hooks that cut or capture a
        # sample's rows, which never run beside shared rows.
        self.offsets = [max(lengths) - n for n in lengths]
        embeds = _pack([p[0] for p in parts], 0, 1)
        mask = _pack([p[1] for p in parts], 0, 1)
        positions = _pack([p[2] for p in parts], -2, -1)
        self.input_valid = _valid_rows(lengths, embeds.device)
        if self.prefix is not None:
            # Each sample's cache rows: its group's (left-padded among the groups), then its own.
            head = self.prefix.mask[self.prefix.group].to(mask.device)
            rest = self.input_valid if self.input_valid is not None else torch.ones_like(mask, dtype=torch.bool)
            mask = torch.cat([head.to(mask.dtype), mask], 1)
            self.input_valid = torch.cat([head.bool(), rest], 1)
        return embeds, mask, positions, parts[0][3]

    def _view(self, kwargs: dict, b: int) -> dict:
        """Sample ``b``'s part of what the model passes every layer (its rows of the input batch)."""
        return kwargs if len(self.runs) == 1 else sample_layer_kwargs(kwargs, b, slice(self.offsets[b], None))

    def hook(self, index: int):
        def pre_hook(module, args, kwargs):
            if hooks_suspended.get():
                return None
            if self.mode == "prefill":
                return self.prefill_layer(index, module, args, kwargs)
            return self.decode_layer(index, args, kwargs)
        return pre_hook

    def prefill_layer(self, index: int, module, args, kwargs):
        if self.captured is None and not any(run.acts_at(index) for run in self.runs):
            # No sample changes before this layer: it gets the batch as the layer before did, with
            # no per-sample slicing and packing (all but a few layers of a deep model).
            for run in self.runs:
                run.record_unchanged(index)
            self.valid[index] = self.valid[index - 1] if index else self.input_valid
            return None if self.layer_kwargs is None else (args, {**kwargs, **self.layer_kwargs})
        hidden = _hidden(args, kwargs)
        entered = []
        for b, run in enumerate(self.runs):
            mine = hidden if len(self.runs) == 1 else hidden[b:b + 1, hidden.shape[1] - len(run.rows):]
            view = self._view(kwargs, b)
            if self.captured is not None:
                self.captured[b][index] = mine
                self.captured[b].setdefault("kwargs", {k: view.get(k) for k in _LAYER_KWARGS})
            entered.append(run.enter(index, mine, view))
        shared = self._shared_attention(index, module, entered, args, kwargs)
        chosen = consult(index, module, self.runs, entered, shared)
        outs = [run.choose(index, stage, *state) for run, stage, state in zip(self.runs, chosen, entered)]
        packed = self._packed(index, outs, args, kwargs)
        if packed is not None:
            self.repacked = True
            self.layer_kwargs = {k: packed[1][k] for k in _LAYER_KWARGS if k in packed[1]}
            self.valid[index] = _valid_rows([h.shape[1] for h, _ in outs], hidden.device,
                                            [run.records[index].hidden for run in self.runs])
        else:
            self.valid[index] = self.input_valid
        return packed

    def _packed(self, index: int, outs: list, args, kwargs):
        """The layer's (args, kwargs) for the samples' (hidden, kwargs) side by side, left-padded
        with per-sample masks; None while nothing was pruned inside the LLM: the model's own
        tensors serve the layer."""
        if not self.repacked and all(run.rotary is None for run in self.runs):
            return None
        hidden, packed = _pack_layer_inputs(outs, kwargs, _hidden(args, kwargs).device)
        return _with_hidden(args, {**kwargs, **packed}, hidden)

    def _shared_attention(self, index: int, module, entered: list, args, kwargs) -> BatchAttention | None:
        """Layer ``index``'s attention call on the samples the callbacks see, side by side (made on
        the first read); None when at most one callback is asked here, each making its own."""
        if sum(run.asks(index) for run in self.runs) < 2:
            return None

        def packed():
            made = self._packed(index, entered, args, kwargs)
            return (args, kwargs) if made is None else made
        return BatchAttention(index, module, self.adapter.decoder_attention(index), entered, packed)

    def first_pruned_layer(self, prefills: list[UnprunedPrefill]) -> int:
        """The first decoder layer a sample prunes before, found on the samples' unpruned prefills
        (each callback asked there, layer by layer, as it would be asked live, until it chooses:
        nothing before that layer differs; the callbacks asked at a layer share one attention
        pass); 0 when a plan prunes before the LLM."""
        first = [0 if run.prunes_before_llm() else None for run in self.runs]
        for index, module in enumerate(self.layers):
            for b, run in enumerate(self.runs):
                if first[b] is None and index in run.planned:
                    first[b] = index
            asked = [b for b, run in enumerate(self.runs) if first[b] is None and run.asks(index)]
            states = [(prefills[b].inputs[index], prefills[b].kwargs) for b in asked]
            shared = None if len(asked) < 2 else BatchAttention(
                index, module, self.adapter.decoder_attention(index), states, functools.partial(_packed_call, states))
            for b, chosen in zip(asked, consult(index, module, [self.runs[b] for b in asked], states, shared)):
                if chosen is not None:
                    self.runs[b].prechosen[index] = chosen
                    first[b] = index
            if all(f is not None for f in first):
                break
        return min(len(self.layers) if f is None else f for f in first)

    def last_positions(self, index: int) -> torch.Tensor:
        return torch.cat([run.records[index].last_position for run in self.runs], dim=-2)

    def decode_layer(self, index: int, args, kwargs):
        kwargs = dict(kwargs)
        valid, length = self.valid[index], max(len(run.records[index].rows) for run in self.runs)
        if valid is not None or length != max(len(run.records[0].rows) for run in self.runs):
            # Each layer's cache holds its own rows (and padding): the mask says which are real.
            hidden = _hidden(args, kwargs)
            keys = valid if valid is not None else torch.ones(len(self.runs), length, dtype=torch.bool)
            decoded = torch.ones(len(self.runs), self.decode_step + 1, dtype=torch.bool)
            kwargs["attention_mask"] = torch.cat([keys.to(hidden.device), decoded.to(hidden.device)], -1)[:, None, None, :]
        last = self.last_positions(index)
        if not torch.equal(last, self.last_positions(0)):
            # Under "reindex" this layer numbered its sequence differently: continue its own count.
            position = last + 1 + self.decode_step
            kwargs["position_embeddings"] = self.adapter.decoder_rotary()(_hidden(args, kwargs), position)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = position
        return args, kwargs


_LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids")


def consult(index: int, module, runs: Sequence[_Run], states: Sequence[tuple[torch.Tensor, dict]],
            shared: BatchAttention | None = None) -> list[Stage | None]:
    """Each run's stage from its callback before layer ``index`` (a callback is asked once per
    layer; a stage it chose while the resume layer was found is that stage), given the sequence
    ``states`` (hidden, layer kwargs) entering the layer and, for several runs, their batch's
    attention pass there. Callbacks of one class that answer together (``answer_together``:
    ``(layer, [(callback, state), ...]) -> stages``) are asked in one call, so they can read
    their samples' attention in one product."""
    chosen: list[Stage | None] = [None] * len(runs)
    alone: list[tuple[int, LayerState]] = []
    together: dict[Callable, list[tuple[int, LayerState]]] = {}
    for b, (run, (hidden, kwargs)) in enumerate(zip(runs, states)):
        if index in run.prechosen:
            chosen[b] = run.prechosen.pop(index)
        elif run.asks(index):
            run.consulted = index + 1
            state = run.layer_state(index, module, hidden, kwargs, None if shared is None else BatchPlace(shared, b))
            answer = getattr(type(run.callback), "answer_together", None)
            (alone if answer is None else together.setdefault(answer, [])).append((b, state))
    for b, state in alone:
        chosen[b] = runs[b].check_chosen(index, runs[b].callback(index, state))
    for answer, members in together.items():
        stages = answer(index, [(runs[b].callback, state) for b, state in members])
        for (b, _), stage in zip(members, stages, strict=True):  # a stage (or None) for each sample asked
            chosen[b] = runs[b].check_chosen(index, stage)
    return chosen


@dataclass(frozen=True)
class _Prefixes:
    """The rows each group of a batch's samples begins with alike (``_prefix_groups``), the groups
    side by side, left-padded: what one prefill call makes every sample's first cache rows of."""

    embeds: torch.Tensor  # [G, P, D]
    mask: torch.Tensor  # [G, P]: 0 on the padding
    positions: torch.Tensor  # [G, P], or [A, G, P] (M-RoPE)
    group: torch.Tensor  # [B]: each sample's group


def _prefix_groups(parts: list[tuple]) -> tuple[list[int], list[int]] | None:
    """The samples grouped by the rows they begin with alike, exactly equal (embedding, padding flag
    and position ids; short of the shortest sample's last row, whose logits are read off it): each
    sample's group and each group's shared rows (all but the last of a group of one). A sample
    alike a group's first in fewer than half its rows (the prompt before the image, on another
    image) starts its own: joining would cut the group's rows to those few. None where one prefill
    of the groups' rows and one of every sample's rest would not process fewer rows than the
    samples whole: no two samples alike, or rests the padding makes long."""
    if len(parts) < 2:
        return None
    lengths = [part[0].shape[1] for part in parts]
    n = min(lengths) - 1
    # The samples' first n rows side by side: each group's first is compared with all at once.
    embeds = torch.cat([part[0][:, :n] for part in parts])  # [B, n, D]
    valid = torch.cat([part[1][:, :n] for part in parts]).bool()  # [B, n]
    positions = torch.stack([part[2][..., :n].reshape(-1, n) for part in parts])  # [B, axes, n]
    group: list[int | None] = [None] * len(parts)
    shared: list[int] = []
    for first in range(len(parts)):
        if group[first] is not None:
            continue
        same = (embeds == embeds[first]).all(-1) & valid & valid[first] & (positions == positions[first]).all(1)
        alike = same.long().cumprod(1).sum(1).tolist()  # the leading run of rows that agree
        joined = [b for b in range(first + 1, len(parts)) if group[b] is None and 2 * alike[b] >= lengths[b]]
        for b in [first, *joined]:
            group[b] = len(shared)
        shared.append(min(alike[b] for b in joined) if joined else lengths[first] - 1)
    rests = [length - shared[g] for length, g in zip(lengths, group)]
    if len(shared) == len(parts) or \
            len(shared) * max(shared) + len(parts) * max(rests) >= len(parts) * max(lengths):
        return None
    return group, shared


def _packed_call(states: list[tuple[torch.Tensor, dict]]) -> tuple[tuple, dict]:
    """(args, kwargs) of one layer call on the samples' ``states`` (their unpruned prefill's)."""
    hidden, kwargs = _pack_layer_inputs(states, states[0][1], states[0][0].device)
    return (hidden,), kwargs


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Replay(torch.nn.Module):
    """Stands in for decoder layer ``index`` during a resumed prefill: it puts the unpruned
    prefill's keys and values into the cache and passes the hidden states on; the last one before
    the resume layer hands over the unpruned hidden states entering that layer."""

    def __init__(self, index: int, keys: torch.Tensor, values: torch.Tensor, output: torch.Tensor | None):
        super().__init__()
        self.index, self.keys, self.values, self.output = index, keys, values, output

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            cache.update(self.keys, self.values, self.index)
        return hidden_states if self.output is None else self.output


@contextlib.contextmanager
def _resumed(adapter: ModelAdapter, batch: _Batch, prefills: list[UnprunedPrefill], start: int):
    """Decoder layers 0..start-1 replaced by ``_Replay`` for the prefill (their records as the
    unpruned forward's), put back afterwards."""
    container = adapter.decoder_layers()
    originals = [container[i] for i in range(start)]
    for index in range(start):
        keys = _pack([p.keys[index] for p in prefills], 0, 2)
        values = _pack([p.values[index] for p in prefills], 0, 2)
        output = _pack([p.inputs[start] for p in prefills], 0, 1) if index == start - 1 else None
        container[index] = _Replay(index, keys, values, output)
        for run in batch.runs:
            run.record(index)
        batch.valid[index] = batch.input_valid
    try:
        yield
    finally:
        for index, layer in enumerate(originals):
            container[index] = layer


# --- running the decoder ---------------------------------------------------------------------------

def answer_tokens(adapter: ModelAdapter, prompt: str, answer: str) -> list[int]:
    """The gold answer's tokens as they follow the prompt (joint tokenisation, so a tokenizer that
    folds the leading space into the word gets it right), falling back to the answer alone."""
    return list(_answer_tokens(adapter.tokenizer, prompt, answer))


@functools.lru_cache(maxsize=1024)
def _answer_tokens(tokenizer, prompt: str, answer: str) -> tuple[int, ...]:
    # Cached: every run of a sample (each method at each budget, the controls) asks again, and the
    # two tokenisations of the whole prompt took 7% of a profiled batch of 16 FastV runs.
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + " " + answer.strip(), add_special_tokens=False)["input_ids"]
    if full[: len(base)] == base and len(full) > len(base):
        return tuple(full[len(base):])
    return tuple(tokenizer(answer.strip(), add_special_tokens=False)["input_ids"])


class _Decoder:
    """Prefill and single-token steps (one token per sample) on the decoder stack with a cache."""

    def __init__(self, adapter: ModelAdapter, batch: _Batch, extra: dict):
        self.adapter, self.batch, self.extra = adapter, batch, extra
        self.stack = adapter.language_model()
        self.head = adapter.output_head()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The head on the last position only, as ``generate`` does (logits_to_keep=1): [B, V].
        return self.head(hidden[:, -1:])[:, -1]

    def prefill(self, embeds, mask, positions) -> tuple[torch.Tensor, DynamicCache]:
        cache = DynamicCache(config=self.stack.config)
        if self.batch.prefix is not None:
            self._prefill_prefix(cache)
        self.batch.mode = "prefill"
        out = self.stack(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True, **self.extra)
        return self.logits(out.last_hidden_state), cache

    def _prefill_prefix(self, cache: DynamicCache) -> None:
        """The batch's groups' shared rows prefilled once into ``cache``, then each group's given to
        each of its samples. (No sample's layer hook acts on it: sharing is only for samples no
        stage or callback inside the LLM cuts or reads.)"""
        prefix = self.batch.prefix
        self.stack(inputs_embeds=prefix.embeds, attention_mask=prefix.mask, position_ids=prefix.positions,
                   cache=cache, use_cache=True, **self.extra)
        cache.batch_select_indices(prefix.group.to(prefix.embeds.device))

    def step(self, tokens: list[int], cache: DynamicCache, step: int) -> torch.Tensor:
        """Logits [B, V] after feeding ``tokens`` (one per sample) as the ``step``-th token after the prompt."""
        self.batch.mode, self.batch.decode_step = "decode", step
        device = self.adapter.device
        embeds = self.adapter.token_embeddings()(torch.tensor(tokens, device=device).unsqueeze(1))
        position = self.batch.last_positions(0) + 1 + step
        first = self.batch.valid[0]
        keys = (first.long() if first is not None else
                torch.ones(len(tokens), max(len(run.records[0].rows) for run in self.batch.runs), dtype=torch.long))
        mask = torch.cat([keys.to(device), torch.ones(len(tokens), step + 1, dtype=torch.long, device=device)], -1)
        out = self.stack(inputs_embeds=embeds, attention_mask=mask, position_ids=position.to(device),
                         cache=cache, use_cache=True, **self.extra)
        return self.logits(out.last_hidden_state)


@dataclass(frozen=True)
class Job:
    """One sample's part of a batched run: its input, plan, callback, gold answer, and the unpruned
    prefill to start from (``resume``; None: from the first layer)."""

    prepared: PreparedInput
    plan: KeepPlan
    callback: LayerCallback | None = None
    gold_answer: str | None = None
    resume: UnprunedPrefill | None = None
    tower_callback: object = None  # ``workbench.pruning.tower_stages.TowerCallback``: stages inside the tower


@torch.no_grad()
def execute(adapter: ModelAdapter, prepared: PreparedInput, plan: KeepPlan, max_new_tokens: int = 8,
            gold_answer: str | None = None, callback: LayerCallback | None = None,
            resume: UnprunedPrefill | None = None, capture: bool = False, tower_callback=None) -> Execution:
    """Run ``prepared`` (one sample) under ``plan``; see the module docstring for how."""
    job = Job(prepared, plan, callback, gold_answer, resume, tower_callback)
    return execute_batch(adapter, [job], max_new_tokens, capture)[0]


@torch.no_grad()
def execute_batch(adapter: ModelAdapter, jobs: list[Job], max_new_tokens: int = 8,
                  capture: bool = False) -> list[Execution]:
    """Run several samples, each under its own plan, as one batch: the same answers as one at a
    time and the same logits up to float rounding (padding rows are masked out). ``capture``: keep
    each sample's unpruned prefill (``Execution.prefill``) for later runs to ``resume`` from."""
    if not jobs:
        return []
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for job in jobs:
        if job.plan.n_visual != job.prepared.layout.n_tokens:
            raise PlanError(f"plan is for {job.plan.n_visual} visual tokens, this sample has "
                            f"{job.prepared.layout.n_tokens}")
    runs = [_Run(adapter, job.prepared, job.plan, job.callback, job.tower_callback) for job in jobs]
    batch = _Batch(adapter, runs, capture)
    parts = batch.sample_inputs()
    start = 0
    if all(job.resume is not None for job in jobs):
        if capture:  # the unpruned run goes on where a recorded forward of its input stopped
            start = min(job.resume.depth for job in jobs)
        else:
            start = batch.first_pruned_layer([job.resume for job in jobs])
            start = min(start, len(runs[0].layers) - 1)  # the last layer always runs: its output is not kept
    # Shared rows are prefilled before any layer sees the batch: only for samples run from the
    # first layer that no layer hook cuts or reads (no stage or callback inside the LLM).
    share = start == 0 and not capture and not any(run.planned or run.callback is not None for run in runs)
    embeds, mask, positions, extra = batch.decoder_inputs(parts, share_prefix=share)
    decoder = _Decoder(adapter, batch, extra)
    resumed = _resumed(adapter, batch, [job.resume for job in jobs], start) if start else contextlib.nullcontext()
    handles = [layer.register_forward_pre_hook(batch.hook(i), with_kwargs=True) for i, layer in enumerate(batch.layers)]
    try:
        started = time.perf_counter()
        with resumed:
            logits, cache = decoder.prefill(embeds, mask, positions)
        prefill_seconds = time.perf_counter() - started
        prefills = _captured(batch, cache, [job.resume for job in jobs]) if capture else [None] * len(jobs)
        golds = [None if job.gold_answer is None else answer_tokens(adapter, job.prepared.prompt, job.gold_answer)
                 for job in jobs]
        gold = _teacher_forced(adapter, decoder, logits, cache, golds)
        answers = _greedy(adapter, decoder, logits, cache, max_new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    executions = []
    host = logits.detach().float().cpu()  # one copy off the device for the batch
    for b, (run, (ids, logprob)) in enumerate(zip(runs, answers)):
        records = [run.records[i] for i in range(len(run.layers))]
        executions.append(Execution(
            answer=adapter.tokenizer.decode(ids, skip_special_tokens=True).strip(), answer_ids=tuple(ids),
            answer_logprob=logprob, gold_logprob=gold[b], logits=host[b].clone(),
            plan=run.plan.with_stages(run.applied), tokens_per_layer=tuple(len(r.rows) for r in records),
            visual_tokens_per_layer=tuple(r.visual for r in records), prefill_seconds=prefill_seconds / len(jobs),
            first_layer=start, prefill=prefills[b], masked_tokens_per_layer=tuple(int(r.hidden.sum()) for r in records),
        ))
    return executions


def _captured(batch: _Batch, cache: DynamicCache, resumed: list[UnprunedPrefill | None]) -> list[UnprunedPrefill]:
    """Each sample's unpruned prefill: its layer inputs (those of the layers it did not run, from
    the prefill it resumed) and its rows of every layer's cache."""
    out = []
    for b, (run, captured, begun) in enumerate(zip(batch.runs, batch.captured, resumed)):
        start = batch.offsets[b]
        layers = range(len(batch.layers))
        keys = tuple(sample_rows(cache.layers[i].keys, b, slice(start, None), 0, (2,)) for i in layers)
        values = tuple(sample_rows(cache.layers[i].values, b, slice(start, None), 0, (2,)) for i in layers)
        inputs = tuple(captured[i] if i in captured else begun.inputs[i] for i in layers)
        out.append(UnprunedPrefill(inputs, keys, values, captured.get("kwargs") or begun.kwargs))
    return out


def _greedy(adapter, decoder: _Decoder, logits, cache, max_new_tokens: int) -> list[tuple[list[int], float]]:
    """Greedy answers of every sample; a sample that stopped is fed padding until all have."""
    stop = set(adapter._eos_ids()) | {adapter.tokenizer.pad_token_id}
    count = logits.shape[0]
    ids, logprobs, done = [[] for _ in range(count)], [0.0] * count, [False] * count
    for step in range(max_new_tokens):
        chosen = logits.argmax(-1)
        # Read off the device once per step, not once per sample.
        tokens = chosen.tolist()
        logp = torch.log_softmax(logits.float(), -1).gather(-1, chosen[:, None])[:, 0].tolist()
        for b, token in enumerate(tokens):
            if done[b]:
                continue
            if token in stop:
                done[b] = True
                continue
            ids[b].append(token)
            logprobs[b] += logp[b]
        if all(done) or step + 1 >= max_new_tokens:
            break
        pad = adapter.tokenizer.pad_token_id
        logits = decoder.step([pad if d else t for t, d in zip(tokens, done)], cache, step)
    return list(zip(ids, logprobs))


def _teacher_forced(adapter, decoder: _Decoder, logits, cache, answers: list) -> list[float | None]:
    """Log-probability of each sample's gold tokens (None: no gold answer), teacher forced on a
    copy of ``cache`` (made only for a gold answer of more than one token: a first token's
    log-probability is read off the prefill's logits)."""
    if all(a is None for a in answers):
        return [None] * len(answers)
    longest = max(len(a) for a in answers if a is not None)
    if longest > 1:
        cache = copy.deepcopy(cache)
    totals = [None if a is None else 0.0 for a in answers]
    pad = adapter.tokenizer.pad_token_id
    for step in range(longest):
        feed = [tokens[step] if tokens is not None and step < len(tokens) else pad for tokens in answers]
        index = torch.tensor([0 if token is None else token for token in feed], device=logits.device)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, index[:, None])[:, 0].tolist()  # read once per step
        for b, tokens in enumerate(answers):
            if tokens is not None and step < len(tokens):
                totals[b] += logp[b]
        if step + 1 < longest:
            logits = decoder.step(feed, cache, step)
    return totals
