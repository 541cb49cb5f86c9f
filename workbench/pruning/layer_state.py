"""What a method that selects inside the LLM sees before decoder layer k, after earlier pruning.

The executor builds one ``LayerState`` per decoder layer during the prefill and hands it to the
method's callback. It carries the hidden states entering the layer, which original visual tokens
still survive and where they sit, and everything the layer will be called with, so a method can
recompute the layer's own attention (``attention``) on the pruned sequence, as PyramidDrop,
SparseVLM, FEATHER and VisionDrop do in their reference code.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from probes.capture import AttentionCall, SiteReading
from probes.interception import listening
from workbench.layout import VisualLayout

# Set while a LayerState re-runs its layer, so the executor's own layer hooks stand aside.
hooks_suspended: contextvars.ContextVar[bool] = contextvars.ContextVar("hooks_suspended", default=False)


class _Captured(Exception):
    def __init__(self, reading: SiteReading):
        super().__init__("attention inputs captured")
        self.reading = reading


class _StopAtAttention:
    """An attention listener that stops the forward at ``module``'s attention call with its inputs:
    RoPE / M-RoPE is applied there, and nothing after it is needed."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def called(self, module, query, key, value, attention_mask, kwargs) -> None:
        if module is self.module:
            raise _Captured(SiteReading(module, [((module, query, key, value, attention_mask), kwargs)]))

    def returned(self, module, output, weights) -> None:
        pass


@torch.no_grad()
def attention_inputs(layer: torch.nn.Module, attention: torch.nn.Module, hidden: torch.Tensor, kwargs: dict,
                     index: int) -> SiteReading:
    """Run decoder layer ``layer`` (index ``index``) up to its attention module's call on ``hidden``
    (a batch) with what the layer is called with, and return that call (input norm, projections and
    rotary embedding applied). The layer is stopped there, so the KV cache is not touched."""
    token = hooks_suspended.set(True)
    try:
        with listening(_StopAtAttention(attention)):
            layer(hidden, attention_mask=kwargs.get("attention_mask"), position_embeddings=kwargs.get("position_embeddings"),
                  position_ids=kwargs.get("position_ids"), use_cache=False)
    except _Captured as captured:
        return captured.reading
    finally:
        hooks_suspended.reset(token)
    raise RuntimeError(f"layer {index} did not call its attention function")


class BatchAttention:
    """Decoder layer ``index``'s attention call made once on several samples' ``states`` (each its
    hidden states [1, S_b, D] and what the layer is called with) side by side, left-padded, as the
    batched layer runs them: ``packed()`` gives that layer call's (args, kwargs), and is called on
    the first read. Each sample's part of it is its ``LayerState``'s (``BatchPlace``)."""

    def __init__(self, index: int, module: torch.nn.Module, attention: torch.nn.Module,
                 states: list[tuple[torch.Tensor, dict]], packed: Callable[[], tuple[tuple, dict]]):
        self.index, self.module, self.attention, self.states, self.packed = index, module, attention, states, packed
        self._reading: tuple[SiteReading, int] | None = None

    def _made(self) -> tuple[SiteReading, int]:
        """The call, and the batch's length."""
        if self._reading is None:
            args, kwargs = self.packed()
            hidden = args[0] if args else kwargs["hidden_states"]
            self._reading = attention_inputs(self.module, self.attention, hidden, kwargs, self.index), hidden.shape[1]
        return self._reading

    def holds(self, b: int, state: "LayerState") -> bool:
        """Whether ``state`` has the inputs the batch gave sample ``b`` (not a method's changed copy)."""
        hidden, given = self.states[b]
        return (state.hidden_states is hidden and state.attention_mask is given.get("attention_mask")
                and state.position_embeddings is given.get("position_embeddings"))

    def call(self, b: int) -> AttentionCall:
        reading, length = self._made()
        return reading.call(b).part(slice(length - self.states[b][0].shape[1], length))

    def row_probs(self, samples: Sequence[int], rows: Sequence[int]) -> list[torch.Tensor]:
        """[H, S_b] attention probabilities of row ``rows[i]`` of sample ``samples[i]``, in one product."""
        reading, length = self._made()
        starts = [length - self.states[b][0].shape[1] for b in samples]
        probs = reading.row_probs(samples, [start + row for start, row in zip(starts, rows)])
        return [p[:, start:] for p, start in zip(probs, starts)]


@dataclass(frozen=True)
class BatchPlace:
    """A sample's place (``sample``) in its batch's attention pass at one layer."""

    batch: BatchAttention
    sample: int

    def call(self, state: "LayerState") -> AttentionCall | None:
        """The sample's part of the call; None for a state whose inputs are not those the batch gave it."""
        return self.batch.call(self.sample) if self.batch.holds(self.sample, state) else None


def row_attention(states: Sequence["LayerState"], rows: Sequence[int]) -> list[torch.Tensor]:
    """``states[i].attention([rows[i]])[:, 0]`` of each state ([H, S], float32); those of the states
    in one batch pass of the executor's (``LayerState.shared``) in one product, up to float rounding."""
    out: list[torch.Tensor | None] = [None] * len(states)
    passes: dict[int, list[int]] = {}
    for i, state in enumerate(states):
        if state.shared is not None and state.shared.batch.holds(state.shared.sample, state):
            passes.setdefault(id(state.shared.batch), []).append(i)
    for members in passes.values():
        if len(members) > 1:
            batch = states[members[0]].shared.batch
            probs = batch.row_probs([states[i].shared.sample for i in members], [int(rows[i]) for i in members])
            for i, p in zip(members, probs):
                out[i] = p
    return [p if p is not None else state.attention(torch.tensor([int(row)]))[:, 0]
            for state, row, p in zip(states, rows, out)]


@dataclass(frozen=True)
class LayerState:
    """The sequence entering decoder layer ``layer`` (batch size 1).

    ``visual_indices``: original visual indices (layout order) still alive, in sequence order;
    ``visual_rows``: their rows in ``hidden_states``. ``text_rows``: rows of the non-visual tokens
    after the image (the question and the answer prompt); ``separator_rows``: the layout's
    separators. ``position_ids``/``position_embeddings``/``attention_mask``: exactly what the
    layer will be called with (mask None means plain causal).

    ``masked_rows``: rows of the visual tokens an earlier masking stage dropped (``Stage.dropped ==
    "masked"``, AIM's code): still rows of the sequence, which this layer computes, but hidden as keys
    by ``attention_mask``. They are not in ``visual_indices``/``visual_rows`` (a method ranks and
    keeps only visible tokens); ``attention`` gives them query rows like any other row, and every
    row, theirs included, gives their keys probability 0, as the code's masked attention does.
    """

    layer: int
    hidden_states: torch.Tensor  # [1, S, D]
    visual_indices: np.ndarray  # [M] int64
    visual_rows: torch.Tensor  # [M] int64
    text_rows: torch.Tensor  # [T] int64
    separator_rows: torch.Tensor  # [K] int64
    position_ids: torch.Tensor  # [1, S] or [3, 1, S]
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor | None
    module: torch.nn.Module  # the decoder layer
    attention_module: torch.nn.Module  # its self-attention (q/k/v/o projections)
    layout: VisualLayout
    masked_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [K'] int64
    # This sample's place in the layer's attention call made once on the whole batch (its samples
    # side by side, as the batched layer will run them); a state whose inputs are not those the
    # executor made (a method's changed copy) makes its own call.
    shared: BatchPlace | None = field(default=None, compare=False, repr=False)

    @property
    def n_rows(self) -> int:
        return self.hidden_states.shape[1]

    @property
    def n_visual(self) -> int:
        return self.layout.n_tokens

    def _capture(self) -> AttentionCall:
        """The layer's attention call on the current, already pruned sequence: this sample's rows
        of the batch's call where the executor made one for all its samples (``shared``), else
        the layer run up to its attention on this sample's state alone."""
        call = None if self.shared is None else self.shared.call(self)
        if call is not None:
            return call
        kwargs = {"attention_mask": self.attention_mask, "position_embeddings": self.position_embeddings,
                  "position_ids": self.position_ids}
        return attention_inputs(self.module, self.attention_module, self.hidden_states, kwargs, self.layer).call(0)

    def attention(self, rows: torch.Tensor) -> torch.Tensor:
        """Attention probabilities [H, R, S] (float32) of query ``rows`` in this layer, recomputed
        from the layer's own q/k on the current, already pruned sequence, under the layer's own mask
        (masked tokens' keys get 0; their rows may be asked like any other)."""
        return self._capture().probs(torch.as_tensor(rows, dtype=torch.long))

    def keys(self) -> torch.Tensor:
        """The layer's keys [H, S, d] (RoPE applied, GQA heads repeated) on the current, already
        pruned sequence."""
        return self._capture().key
