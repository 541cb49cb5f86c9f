"""The shipped model's quality bars on the held-out evaluation set: >= 95 % overall and >= 90 % on
every question type, blank images fall to the question-type prior, and the answer position attends
to the evidence well above its share of the patches (figures in data/models/shapes-vlm/README.md).
"""

import pytest

from workbench.evaluate import accuracy_table, answer_dataset, evidence_attention, majority_prior
from workbench.models.loading import SHIPPED_MODEL_DIR, load
from workbench.samples import read_dataset
from workbench.scenes import QUESTION_TYPES


@pytest.fixture(scope="module")
def adapter():
    return load("shapes-vlm")


@pytest.fixture(scope="module")
def samples():
    return read_dataset("data/eval/samples.jsonl")


def by_type(table, column="accuracy"):
    return dict(zip(table["question_type"], table[column]))


def test_shipped_model_is_a_small_llava_with_144_visual_tokens(adapter, samples):
    assert type(adapter.model).__name__ == "LlavaForConditionalGeneration"
    assert adapter.has_cls_token
    prepared = adapter.prepare(samples[0].load_image(), samples[0].question)
    assert prepared.layout.n_tokens == 144 and prepared.layout.groups[0].rows == 12
    size = sum(f.stat().st_size for f in SHIPPED_MODEL_DIR.iterdir() if f.is_file())
    assert size <= 30 * 2**20


def test_held_out_accuracy(adapter, samples):
    accuracy = by_type(accuracy_table(answer_dataset(adapter, samples, progress=False)))
    assert set(QUESTION_TYPES) <= set(accuracy)
    prior = by_type(majority_prior(samples), "prior")
    assert accuracy["overall"] >= 0.95, accuracy
    assert all(accuracy[t] >= 0.90 for t in QUESTION_TYPES), accuracy
    assert all(accuracy[t] >= prior[t] + 0.35 for t in QUESTION_TYPES), (accuracy, prior)


def test_blank_images_fall_to_the_prior(adapter, samples):
    blank = by_type(accuracy_table(answer_dataset(adapter, samples, blank=True, progress=False)))
    prior = by_type(majority_prior(samples), "prior")
    for t in QUESTION_TYPES:
        assert blank[t] <= prior[t] + 0.10, (t, blank[t], prior[t])
    assert blank["overall"] <= prior["overall"] + 0.05


def test_answer_position_attends_to_the_evidence(adapter, samples):
    ratios = evidence_attention(adapter, samples[:120], progress=False)
    middle = ratios.filter((ratios["layer"] > 0) & (ratios["layer"] < ratios["layer"].max()))
    assert middle.height >= 1 and middle["ratio"].max() >= 3.0, ratios
