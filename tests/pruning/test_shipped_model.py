"""The executor on the trained shipped model."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.models.loading import load
from workbench.pruning.baselines import UniformGrid
from workbench.pruning.executor import execute
from workbench.pruning.method import SelectionContext
from workbench.pruning.plan import KeepPlan
from workbench.samples import read_dataset


@pytest.fixture(scope="module")
def trained():
    return load("shapes-vlm")


def test_trained_model_answers_the_same_under_keep_all_and_runs_pruned(trained):
    for sample in read_dataset("data/eval/samples.jsonl", limit=3):
        image = sample.load_image()
        prepared = trained.prepare(image, sample.question)
        answer = trained.answer(image, sample.question)
        execution = execute(trained, prepared, KeepPlan.keep_all(prepared.layout.n_tokens), gold_answer=sample.answer)
        with torch.no_grad():
            expected = trained.model(**prepared.inputs, logits_to_keep=1).logits[0, -1].float()
        assert torch.equal(execution.logits, expected)
        assert (execution.answer, execution.answer_ids) == (answer.text, answer.token_ids)
        plan = UniformGrid().select(SelectionContext(prepared.layout, 0.25))
        pruned = execute(trained, prepared, plan, gold_answer=sample.answer)
        assert math.isfinite(pruned.gold_logprob) and pruned.gold_logprob <= 0
        assert pruned.visual_tokens_per_layer == (36,) * len(trained.decoder_layers())
