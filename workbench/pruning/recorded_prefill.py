"""The unpruned prefill a sample's recorded forward has already begun.

A recording runs the whole model on the sample's unpruned input, the decoder up to the last layer
it reads. Those layers compute exactly what the unpruned run's prefill computes there, so
``recorded_prefill`` keeps their inputs, keys and values, and the unpruned run (``execute(...,
capture=True, resume=...)``) goes on from the first layer the recording did not finish: a
recorded sample costs one unpruned forward, not a recording plus a forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from transformers import BatchFeature, DynamicCache

from workbench.models.base import ModelAdapter, PreparedInput
from workbench.pruning.executor import _LAYER_KWARGS, UnprunedPrefill, _hidden, sample_layer_kwargs, sample_rows
from workbench.recorder import whole_forward


@dataclass
class RecordedPrefill:
    """Filled when the ``recorded_prefill`` block ends: None when no forward of the sample's own
    input reached the decoder inside it."""

    prefill: UnprunedPrefill | None = None


@contextlib.contextmanager
def recorded_prefill(adapter: ModelAdapter, prepared: PreparedInput) -> Iterator[RecordedPrefill]:
    """Within it, a forward of the whole model on ``prepared.inputs`` (the recording's) also makes
    the sample's decoder inputs (``ModelAdapter.decoder_inputs_from_forward``) and begins its
    unpruned prefill: the layers it runs fill a cache, and their inputs are kept."""
    with recorded_prefills(adapter, [prepared], prepared.inputs) as begun:
        yield begun[0]


@contextlib.contextmanager
def recorded_prefills(adapter: ModelAdapter, prepared: Sequence[PreparedInput],
                      inputs: BatchFeature) -> Iterator[list[RecordedPrefill]]:
    """``recorded_prefill`` of several samples whose recording forward runs on ``inputs``: their
    own, or theirs stacked right-padded (``stacked_inputs``), each sample's rows first. Each
    sample's prefill is its rows of the batch's layer inputs, keys and values."""
    cache = DynamicCache(config=adapter.language_model().config)
    inputs_of: dict[int, torch.Tensor] = {}
    calls: dict[str, dict] = {}

    def keep(index: int):
        def pre_hook(module, args, kwargs):
            # Only the decoder call that got this cache: not generation, not the saliency passes.
            if kwargs.get("cache") is cache and index not in inputs_of:
                inputs_of[index] = _hidden(args, kwargs)
                calls.setdefault("kwargs", {k: kwargs.get(k) for k in _LAYER_KWARGS})
        return pre_hook

    def keep_output(index: int):
        def hook(module, args, kwargs, output):
            # The last layer the recording reads: its output is the next layer's input.
            if kwargs.get("cache") is cache and index + 1 not in inputs_of:
                inputs_of[index + 1] = output[0] if isinstance(output, tuple) else output
        return hook

    layers = list(adapter.decoder_layers())
    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(keep_output(i), with_kwargs=True) for i, layer in enumerate(layers)]
    out = [RecordedPrefill() for _ in prepared]
    try:
        with adapter.decoder_inputs_from_forward(prepared, inputs, cache), whole_forward():
            yield out
    finally:
        for handle in handles:
            handle.remove()
    ran = 0  # layers whose keys and values are cached, from the first on
    while ran < len(cache.layers) and cache.layers[ran].is_initialized:
        ran += 1
    seen = 0
    while seen in inputs_of:
        seen += 1
    if not (ran and seen):
        return
    for b, (item, begun) in enumerate(zip(prepared, out)):
        mine = slice(0, item.inputs["input_ids"].shape[1])  # right-padded: the sample's rows come first
        begun.prefill = UnprunedPrefill(tuple(sample_rows(inputs_of[i], b, mine, 0, (1,)) for i in range(seen)),
                                        tuple(sample_rows(cache.layers[i].keys, b, mine, 0, (2,)) for i in range(ran)),
                                        tuple(sample_rows(cache.layers[i].values, b, mine, 0, (2,)) for i in range(ran)),
                                        sample_layer_kwargs(calls["kwargs"], b, mine))
