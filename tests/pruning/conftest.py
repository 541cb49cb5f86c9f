"""Fixtures: the shipped architecture (built untrained, seeded) and tiny models of every family."""

from __future__ import annotations

import functools

import pytest

from workbench.models.registry import adapter_for
from workbench.samples import read_dataset
from workbench.shapes_model.build import build_model, build_processor

try:  # written by the model-adapter side; the family tests run once it exists
    from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter
except ImportError:  # pragma: no cover
    TINY_FAMILIES = ()

SHIPPED = "shipped"
ALL_MODELS = (SHIPPED,) + tuple(TINY_FAMILIES)


@functools.lru_cache(maxsize=None)
def shipped_architecture():
    processor = build_processor()
    return adapter_for(build_model(processor, seed=0), processor, name="shapes-vlm (untrained)")


@functools.lru_cache(maxsize=None)
def eval_sample():
    return read_dataset("data/eval/samples.jsonl", limit=1)[0]


def sample_for(name: str):
    """(adapter, image, question, a gold answer) for the shipped architecture or a tiny family."""
    if name == SHIPPED:
        sample = eval_sample()
        return shipped_architecture(), sample.load_image(), sample.question, sample.answer
    return tiny_adapter(name), noise_image(TINY_SPECS[name].image_size), QUESTION, "red"


def adapter_and_input(name: str):
    """(adapter, prepared input, a gold answer) for the shipped architecture or a tiny family."""
    adapter, image, question, gold = sample_for(name)
    return adapter, adapter.prepare(image, question), gold


@pytest.fixture(scope="module")
def shipped():
    return adapter_and_input(SHIPPED)
