"""The workbench's one way into a model: an attention function registered with ``transformers``.

Every supported family computes attention through transformers' ``AttentionInterface``: each
attention module looks ``config._attn_implementation`` up in ``ALL_ATTENTION_FUNCTIONS`` and calls
what it finds with the query, key and value exactly as the kernel gets them (RoPE applied, GQA heads
not yet repeated), the mask and ``scaling``. ``install(model)`` registers ``"workbench_<base>"`` —
the model's own implementation (``sdpa``, a FlashAttention kernel, ``eager``) behind a function that
first shows the call to the active ``AttentionListener`` — with its mask function under the same
name (``AttentionMaskInterface``), and switches the model to it with the public
``set_attn_implementation``. With no listener active the call goes straight to the base kernel, so
an installed model computes exactly what it computed before.

Recording (``workbench/recorder.py``), the in-LLM methods' view of a layer
(``workbench/pruning/layer_state.py``) and the saliency passes all read attention here; nothing
matches transformers' source text or swaps private config attributes.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Callable, Iterator, Mapping, Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "workbench_"


class AttentionListener(Protocol):
    """Sees every attention call made while it is active (``listening``), in execution order."""

    def called(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, kwargs: Mapping) -> None:
        """Before the kernel runs; may raise to stop the forward there."""

    def returned(self, module: torch.nn.Module, output: torch.Tensor, weights: torch.Tensor | None) -> None:
        """After the kernel ran, with its attention output [B, S, H, d] and the probabilities the
        kernel returned (eager attention only; None otherwise)."""


_ACTIVE: contextvars.ContextVar[AttentionListener | None] = contextvars.ContextVar("attention_listener", default=None)


@contextlib.contextmanager
def listening(listener: AttentionListener) -> Iterator[AttentionListener]:
    """Show every attention call of installed models to ``listener`` inside the block."""
    token = _ACTIVE.set(listener)
    try:
        yield listener
    finally:
        _ACTIVE.reset(token)


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    # "eager" is not in the global table: each modeling file defines its own
    # ``eager_attention_forward`` and passes it as the default (guarded by the eager-parity tests).
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__}: no attention function for implementation {base!r}")
    return eager


def _listened(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        listener = _ACTIVE.get()
        if listener is not None:
            listener.called(module, query, key, value, attention_mask, kwargs)
        output, weights = _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        if listener is not None:
            listener.returned(module, output, weights)
        return output, weights

    return attention


def implementation_name(base: str) -> str:
    """Register the listened version of ``base`` (idempotent) and return its name."""
    base = base or "eager"
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _listened(base))
        mask_base = base if base in ALL_MASK_ATTENTION_FUNCTIONS else "sdpa"
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_base])
    return name


def base_implementation(model: torch.nn.Module) -> str:
    """The kernel the model computes attention with (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    return (model.config._attn_implementation or "eager").removeprefix(PREFIX)


def install(model: torch.nn.Module) -> None:
    """Route the model's attention (every sub-model's) through the listened version of its kernel."""
    current = model.config._attn_implementation or "eager"
    if current.startswith(PREFIX):
        return
    model.set_attn_implementation(implementation_name(current))
