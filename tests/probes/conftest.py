"""Shared fixtures: the shipped architecture, untrained (same classes and code path as the trained
model), one eval sample prepared for it, and eager twins for reference attention."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from workbench.models.registry import adapter_for
from workbench.samples import read_dataset
from workbench.shapes_model.build import build_model, build_processor

# Two cores, shared with whatever else runs: more intra-op threads than free cores makes torch's
# thread pool spin and slows tiny models a hundredfold.
torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def shipped_architecture():
    processor = build_processor()
    return adapter_for(build_model(processor), processor, name="shapes-untrained")


@functools.lru_cache(maxsize=None)
def eval_sample():
    return read_dataset("data/eval/samples.jsonl", limit=1)[0]


def eager_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights with eager attention (the reference for every recomputed probability)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("eager")
    return twin.eval()


@pytest.fixture(scope="session")
def shipped():
    adapter = shipped_architecture()
    sample = eval_sample()
    return adapter, adapter.prepare(sample.load_image(), sample.question)
