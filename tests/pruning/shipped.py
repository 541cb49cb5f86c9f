"""Shared runs for the method tests: the shipped model on the first eval sample, a tiny family on its
test image, and a run of a method that checks the per-stage kept counts its schedule documents."""

from __future__ import annotations

import functools

import numpy as np

from workbench.pruning.method import ModelFacts, SelectionContext
from workbench.pruning.run import record_needs, run_method


@functools.lru_cache(maxsize=None)
def shipped_sample():
    """(adapter, prepared input, gold answer) of the shipped model on the first eval sample."""
    from workbench.models.loading import load
    from workbench.samples import read_dataset

    adapter = load()
    sample = read_dataset("data/eval/samples.jsonl", limit=1)[0]
    return adapter, adapter.prepare(sample.load_image(), sample.question), sample.answer


def tiny_input(family: str):
    """(adapter, prepared input) of a tiny ``family`` model on its test image."""
    from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter

    adapter = tiny_adapter(family)
    return adapter, adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)


def run_checked(adapter, prepared, method, budget, gold=None, recording=None, max_new_tokens: int = 8):
    """``method`` at ``budget``: records its needs (unless ``recording`` is given), executes, and asserts
    the kept count of every stage is ``method.kept_counts(context)``. Returns (execution, context)."""
    facts = ModelFacts.of(adapter)
    method.check_applies(facts)
    if recording is None:
        recording = record_needs(adapter, prepared, [method])
    execution = run_method(adapter, prepared, method, budget, recording=recording, gold_answer=gold,
                           max_new_tokens=max_new_tokens)
    context = SelectionContext(prepared.layout, budget, recording, facts)
    assert [len(s.kept) for s in execution.plan.stages] == list(method.kept_counts(context)), method.name
    return execution, context


def check_on_shipped(method, budget=0.22):
    """``run_checked`` on the shipped sample (with its gold answer); the answer must not be empty."""
    adapter, prepared, gold = shipped_sample()
    execution, context = run_checked(adapter, prepared, method, budget, gold=gold)
    assert execution.answer.strip()
    return execution, context


def folded(recording, layout, signal: str, layer: int, rows: str) -> np.ndarray:
    """The recorded tower row of EVERY view, folded onto the layout by its tower map (mean per token)."""
    from workbench.tower_map import tower_to_layout

    views = [recording.get(signal, layer, rows, "tower", view=v)[0].double().numpy()
             for v in range(len(layout.tower_owner))]
    return tower_to_layout(layout, views, "mean")
