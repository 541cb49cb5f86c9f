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
from typing import Iterator

from transformers import DynamicCache

from workbench.models.base import ModelAdapter, PreparedInput
from workbench.pruning.executor import _LAYER_KWARGS, UnprunedPrefill, _hidden
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
    cache = DynamicCache(config=adapter.language_model().config)
    inputs: dict[int, object] = {}
    calls: dict[str, dict] = {}

    def keep(index: int):
        def pre_hook(module, args, kwargs):
            # Only the decoder call that got this cache: not generation, not the saliency passes.
            if kwargs.get("cache") is cache and index not in inputs:
                inputs[index] = _hidden(args, kwargs)
                calls.setdefault("kwargs", {k: kwargs.get(k) for k in _LAYER_KWARGS})
        return pre_hook

    def keep_output(index: int):
        def hook(module, args, kwargs, output):
            # The last layer the recording reads: its output is the next layer's input.
            if kwargs.get("cache") is cache and index + 1 not in inputs:
                inputs[index + 1] = output[0] if isinstance(output, tuple) else output
        return hook

    layers = list(adapter.decoder_layers())
    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(keep_output(i), with_kwargs=True) for i, layer in enumerate(layers)]
    out = RecordedPrefill()
    try:
        with adapter.decoder_inputs_from_forward(prepared, cache), whole_forward():
            yield out
    finally:
        for handle in handles:
            handle.remove()
    ran = 0  # layers whose keys and values are cached, from the first on
    while ran < len(cache.layers) and cache.layers[ran].is_initialized:
        ran += 1
    seen = 0
    while seen in inputs:
        seen += 1
    if ran and seen:
        out.prefill = UnprunedPrefill(tuple(inputs[i] for i in range(seen)),
                                      tuple(cache.layers[i].keys for i in range(ran)),
                                      tuple(cache.layers[i].values for i in range(ran)), calls["kwargs"])
