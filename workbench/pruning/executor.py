"""Run a model under a ``KeepPlan``: the pruned prefill, the answer, and what each layer processed.

How it works, for one sample (batch size 1; pruning makes every sequence a different length):

* The decoder's inputs are taken from the model's own forward (``adapter.llm_inputs``): the
  merged embeddings, the padding mask and the position ids (3-D for M-RoPE). A ``"pre_llm"``
  stage merges and drops embedding rows at the visual positions and the decoder stack is called
  directly with the shorter ``inputs_embeds``, so no wrapper's image-placeholder check is in the
  way. Text and the layout's separators are never dropped.
* A stage "before layer k" is a forward pre-hook on decoder layer k that slices the hidden states;
  since the decoder computes the mask and rotary embeddings once for the whole sequence, every
  layer from the first in-LLM stage on also gets its mask, ``position_embeddings`` and position
  ids cut to the surviving rows ("original" policy), or its rotary embeddings recomputed for
  contiguous positions with the model's rotary module ("reindex"). Layer k onwards therefore
  writes shorter keys/values into the ``DynamicCache``.
* Decoding is greedy, one token at a time on that cache. Each layer continues from the position
  after its own last prefill token and its mask is cut to the keys its cache holds, so layers
  that saw different sequences decode consistently.
* ``callback(layer, LayerState) -> Stage | None`` is consulted before every decoder layer during
  the prefill (after that layer's planned stage, if any), for methods that select inside the LLM
  after earlier pruning. Every stage applied ends up in ``Execution.plan``.

Not supported: batches, sliding-window attention layers (the cache-aware mask slicing assumes full
attention), "reindex" with multi-axis (M-RoPE) position ids, and sampling.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from transformers import DynamicCache

from workbench.models.base import ModelAdapter, PreparedInput
from workbench.pruning.layer_state import LayerState, hooks_suspended
from workbench.pruning.plan import KeepPlan, PlanError, Stage, describe_where

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
    ``tokens_per_layer``/``visual_tokens_per_layer``: sequence length and visual-token count each
    decoder layer processed in the prefill, for FLOP accounting.
    """

    answer: str
    answer_ids: tuple[int, ...]
    answer_logprob: float
    gold_logprob: float | None
    logits: torch.Tensor
    plan: KeepPlan
    tokens_per_layer: tuple[int, ...]
    visual_tokens_per_layer: tuple[int, ...]
    prefill_seconds: float = 0.0  # wall time of the pruned prefill alone (in-LLM selection included)

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


def _apply_merges(states: torch.Tensor, stage: Stage, row_of: dict[int, int]) -> torch.Tensor:
    """Weighted sums at the target rows, all read from the states before any merge of this stage."""
    if not stage.merges:
        return states
    out = states.clone()
    for merge in stage.merges:
        rows = [row_of[merge.target]] + [row_of[s] for s in merge.sources]
        weights = torch.tensor(merge.weights, dtype=states.dtype, device=states.device)
        out[:, rows[0]] = torch.einsum("r,brd->bd", weights, states[:, rows])
    return out


def _reindexed(positions: torch.Tensor, count: int, where) -> torch.Tensor:
    if positions.dim() != 2:
        raise ExecutionError(f"stage {describe_where(where)}: 'reindex' needs 1-D position ids; this model "
                             f"uses {positions.shape[0]}-axis (M-RoPE) positions, use 'original'")
    return torch.arange(count, device=positions.device).unsqueeze(0).expand(positions.shape[0], -1)


# --- the run ---------------------------------------------------------------------------------------

@dataclass
class _LayerRecord:
    rows: torch.Tensor  # rows of the decoder-input sequence this layer processed (and caches)
    last_position: torch.Tensor  # position ids of its last row, [B, 1] or [3, B, 1]
    visual: int


class _Run:
    """The mutable bookkeeping of one execution; lives only inside ``execute``."""

    def __init__(self, adapter: ModelAdapter, prepared: PreparedInput, plan: KeepPlan,
                 callback: LayerCallback | None):
        self.adapter, self.layout, self.plan, self.callback = adapter, prepared.layout, plan, callback
        self.layers = list(adapter.decoder_layers())
        self.planned = {s.where: s for s in plan.stages if s.in_llm}
        too_deep = [w for w in self.planned if w >= len(self.layers)]
        if too_deep:
            raise ExecutionError(f"plan has stages before layers {too_deep}; the decoder has {len(self.layers)} layers")
        self.applied: list[Stage] = []
        self.records: dict[int, _LayerRecord] = {}
        self.mode = "prefill"
        self.decode_step = 0

    # --- pre-LLM ------------------------------------------------------------------------------
    def decoder_inputs(self, prepared: PreparedInput):
        llm = self.adapter.decoder_inputs(prepared)
        embeds, mask, positions = llm.inputs_embeds, llm.attention_mask, llm.position_ids
        if embeds.shape[0] != 1:
            raise ExecutionError(f"the executor runs one sample at a time, got a batch of {embeds.shape[0]}")
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
        stage = next((s for s in self.plan.stages if not s.in_llm), None)
        if stage is not None:
            row_of = {int(v): i for i, v in enumerate(kinds) if v >= 0}
            embeds = _apply_merges(embeds, stage, row_of)
            keep = torch.from_numpy(np.flatnonzero((kinds < 0) | np.isin(kinds, stage.kept_array)))
            embeds, mask = _take(embeds, keep, 1), _take(mask, keep, 1)
            if stage.position == "reindex":
                positions = _reindexed(positions, len(keep), stage.where)
            else:
                positions = _take(positions, keep, -1)
            kinds, self.sequence_index = kinds[keep.numpy()], self.sequence_index[keep.numpy()]
            self.applied.append(stage)
        self.kinds = kinds  # per decoder-input row: visual index, or _OTHER / _SEPARATOR
        self.rows = torch.arange(len(kinds))  # rows alive now, into the decoder-input sequence
        self.positions = positions  # position ids of the alive rows
        self.rotary = None  # (cos, sin) of the alive rows once an in-LLM stage ran; None: the model's
        self.reindexed = False
        return embeds, mask, positions, llm.extra

    # --- hooks ----------------------------------------------------------------------------------
    def hook(self, index: int):
        def pre_hook(module, args, kwargs):
            if hooks_suspended.get():
                return None
            if self.mode == "prefill":
                return self.prefill_layer(index, module, args, kwargs)
            return self.decode_layer(index, args, kwargs)
        return pre_hook

    @staticmethod
    def _hidden(args, kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def _with_hidden(args, kwargs, hidden):
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _cut_kwargs(self, kwargs: dict) -> dict:
        """The model passes every layer full-length mask and rotary embeddings; cut them to the
        rows alive now (a no-op until the first in-LLM stage)."""
        if self.rotary is None:
            return kwargs
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = _slice_square_mask(kwargs.get("attention_mask"), self.rows)
        kwargs["position_embeddings"] = self.rotary
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self.positions if self.reindexed else _take(kwargs["position_ids"], self.rows, -1)
        return kwargs

    def _apply_stage(self, stage: Stage, hidden: torch.Tensor, kwargs: dict):
        alive = self.kinds[self.rows.numpy()]
        alive_visual = set(int(v) for v in alive[alive >= 0])
        where = describe_where(stage.where)
        if len(stage.kept) and (stage.kept[-1] >= self.layout.n_tokens or stage.kept[0] < 0):
            raise PlanError(f"stage {where}: kept indices out of range 0..{self.layout.n_tokens - 1}")
        dead = sorted(set(stage.kept) - alive_visual)
        if dead:
            raise PlanError(f"stage {where}: keeps {dead[:5]} which are no longer in the sequence")
        for merge in stage.merges:
            gone = sorted(set(merge.sources) - alive_visual)
            if gone:
                raise PlanError(f"stage {where}: merge into {merge.target} uses sources {gone[:5]} already dropped")
        row_of = {int(v): i for i, v in enumerate(alive) if v >= 0}
        hidden = _apply_merges(hidden, stage, row_of)
        keep = torch.from_numpy(np.flatnonzero((alive < 0) | np.isin(alive, stage.kept_array)))
        hidden = _take(hidden, keep, 1)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = _slice_square_mask(kwargs.get("attention_mask"), keep)
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
        self.rows = self.rows[keep]
        self.applied.append(stage)
        return hidden, kwargs

    def _state(self, index: int, module, hidden, kwargs) -> LayerState:
        alive = self.kinds[self.rows.numpy()]
        after_image = self.sequence_index[self.rows.numpy()] > (self.layout.positions.max() if self.layout.n_tokens else -1)
        position_embeddings = kwargs.get("position_embeddings")
        return LayerState(
            layer=index, hidden_states=hidden, visual_indices=alive[alive >= 0].copy(),
            visual_rows=torch.from_numpy(np.flatnonzero(alive >= 0)),
            text_rows=torch.from_numpy(np.flatnonzero((alive == _OTHER) & after_image)),
            separator_rows=torch.from_numpy(np.flatnonzero(alive == _SEPARATOR)),
            position_ids=self.positions, position_embeddings=position_embeddings,
            attention_mask=kwargs.get("attention_mask"), module=module,
            attention_module=self.adapter.decoder_attention(index), layout=self.layout,
        )

    def prefill_layer(self, index: int, module, args, kwargs):
        hidden = self._hidden(args, kwargs)
        kwargs = self._cut_kwargs(kwargs)
        planned = self.planned.get(index)
        if planned is not None:
            hidden, kwargs = self._apply_stage(planned, hidden, kwargs)
        if self.callback is not None:
            chosen = self.callback(index, self._state(index, module, hidden, kwargs))
            if chosen is not None:
                if chosen.where != index:
                    raise PlanError(f"the callback before layer {index} returned a stage for "
                                    f"{describe_where(chosen.where)}")
                if planned is not None:
                    raise PlanError(f"both the plan and the callback prune before layer {index}; "
                                    "a layer takes one stage")
                hidden, kwargs = self._apply_stage(chosen, hidden, kwargs)
        alive = self.kinds[self.rows.numpy()]
        self.records[index] = _LayerRecord(self.rows, self.positions[..., -1:], int((alive >= 0).sum()))
        args, kwargs = self._with_hidden(args, kwargs, hidden)
        return args, kwargs

    def decode_layer(self, index: int, args, kwargs):
        record, first = self.records[index], self.records[0]
        kwargs = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and len(record.rows) != len(first.rows):
            # The mask is sized to layer 0's cache (its rows, then the decoded tokens).
            past = torch.searchsorted(first.rows, record.rows)
            decoded = torch.arange(len(first.rows), mask.shape[-1])
            kwargs["attention_mask"] = _take(mask, torch.cat([past, decoded]), -1)
        if not torch.equal(record.last_position, first.last_position):
            # Under "reindex" this layer numbered its sequence differently: continue its own count.
            position = record.last_position + 1 + self.decode_step
            kwargs["position_embeddings"] = self.adapter.decoder_rotary()(self._hidden(args, kwargs), position)
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = position
        return args, kwargs


# --- running the decoder ---------------------------------------------------------------------------

def answer_tokens(adapter: ModelAdapter, prompt: str, answer: str) -> list[int]:
    """The gold answer's tokens as they follow the prompt (joint tokenisation, so a tokenizer that
    folds the leading space into the word gets it right), falling back to the answer alone."""
    tokenizer = adapter.tokenizer
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + " " + answer.strip(), add_special_tokens=False)["input_ids"]
    if full[: len(base)] == base and len(full) > len(base):
        return full[len(base):]
    return tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]


class _Decoder:
    """Prefill and single-token steps on the decoder stack with a cache."""

    def __init__(self, adapter: ModelAdapter, run: _Run, extra: dict):
        self.adapter, self.run, self.extra = adapter, run, extra
        self.stack = adapter.language_model()
        self.head = adapter.output_head()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The head on the last position only, as ``generate`` does (logits_to_keep=1).
        return self.head(hidden[:, -1:])[0, -1]

    def prefill(self, embeds, mask, positions) -> tuple[torch.Tensor, DynamicCache]:
        cache = DynamicCache(config=self.stack.config)
        self.run.mode = "prefill"
        out = self.stack(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True, **self.extra)
        return self.logits(out.last_hidden_state), cache

    def step(self, token: int, cache: DynamicCache, step: int) -> torch.Tensor:
        """Logits after feeding ``token`` as the ``step``-th token after the prompt."""
        self.run.mode, self.run.decode_step = "decode", step
        device = self.adapter.device
        embeds = self.adapter.token_embeddings()(torch.tensor([[token]], device=device))
        position = self.run.records[0].last_position + 1 + step
        mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long, device=device)
        out = self.stack(inputs_embeds=embeds, attention_mask=mask, position_ids=position,
                         cache=cache, use_cache=True, **self.extra)
        return self.logits(out.last_hidden_state)


@torch.no_grad()
def execute(adapter: ModelAdapter, prepared: PreparedInput, plan: KeepPlan, max_new_tokens: int = 8,
            gold_answer: str | None = None, callback: LayerCallback | None = None) -> Execution:
    """Run ``prepared`` (one sample) under ``plan``; see the module docstring for how."""
    if plan.n_visual != prepared.layout.n_tokens:
        raise PlanError(f"plan is for {plan.n_visual} visual tokens, this sample has {prepared.layout.n_tokens}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    run = _Run(adapter, prepared, plan, callback)
    embeds, mask, positions, extra = run.decoder_inputs(prepared)
    decoder = _Decoder(adapter, run, extra)
    handles = [layer.register_forward_pre_hook(run.hook(i), with_kwargs=True) for i, layer in enumerate(run.layers)]
    try:
        started = time.perf_counter()
        logits, cache = decoder.prefill(embeds, mask, positions)
        prefill_seconds = time.perf_counter() - started
        gold = None
        if gold_answer is not None:
            gold = _teacher_forced(decoder, logits, copy.deepcopy(cache),
                                   answer_tokens(adapter, prepared.prompt, gold_answer))
        ids, logprob = _greedy(adapter, decoder, logits, cache, max_new_tokens)
    finally:
        for handle in handles:
            handle.remove()
    text = adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
    records = [run.records[i] for i in range(len(run.layers))]
    return Execution(
        answer=text, answer_ids=tuple(ids), answer_logprob=logprob, gold_logprob=gold,
        logits=logits.detach().float().cpu(), plan=plan.with_stages(run.applied),
        tokens_per_layer=tuple(len(r.rows) for r in records),
        visual_tokens_per_layer=tuple(r.visual for r in records), prefill_seconds=prefill_seconds,
    )


def _greedy(adapter, decoder: _Decoder, logits, cache, max_new_tokens: int) -> tuple[list[int], float]:
    stop = set(adapter._eos_ids()) | {adapter.tokenizer.pad_token_id}
    ids, logprob = [], 0.0
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        if token in stop:
            break
        ids.append(token)
        logprob += float(torch.log_softmax(logits.float(), -1)[token])
        if step + 1 < max_new_tokens:
            logits = decoder.step(token, cache, step)
    return ids, logprob


def _teacher_forced(decoder: _Decoder, logits, cache, tokens: list[int]) -> float:
    total = 0.0
    for step, token in enumerate(tokens):
        total += float(torch.log_softmax(logits.float(), -1)[token])
        if step + 1 < len(tokens):
            logits = decoder.step(token, cache, step)
    return total
