"""``question_keywords`` and ``question_text``: the question as MMTok's code embeds it on its LLaVA and
Qwen2.5-VL paths (probes/keywords.py)."""

from __future__ import annotations

import torch

import pytest

from probes.keywords import QUESTION_KEYWORDS, QUESTION_TEXT, keyword_ids, keyword_text, question_text, text_ids
from tests.pruning.shipped import tiny_input
from workbench.recorder import record
from workbench.recording import CaptureRequest


def test_answer_prompts_and_stop_words_are_dropped():
    question = "What is the colour of the Big ball?\nAnswer the question using a single word or phrase."
    assert keyword_text(question) == "image colour of Big ball"
    choices = "Which shape is left?\nA. circle\nAnswer with the option's letter from the given choices directly."
    assert keyword_text(choices) == "image shape left circle"  # "A" is the stop word "a": case is ignored


def test_stop_words_only_keeps_the_placeholder_word():
    # "image" (from the "<image>" the user turn starts with) is never a stop word, so it always remains.
    assert keyword_text("What is it?") == "image"


class _Words:
    """A word-level tokenizer: BOS 1, then one id per word."""

    bos_token_id = 1

    def __init__(self, bos=True):
        self.bos = bos

    def __call__(self, words, is_split_into_words):
        assert is_split_into_words
        return {"input_ids": ([1] if self.bos else []) + [10 + len(w) for w in words]}


def test_ids_are_tokenised_as_words_with_the_bos_dropped():
    assert keyword_ids(_Words(), "red ball") == [15, 13, 14]
    assert keyword_ids(_Words(bos=False), "red ball") == [15, 13, 14]


def test_the_qwen_text_is_the_question_unfiltered():
    question = " <image>What is the colour of the Big ball?\nAnswer the question using a single word or phrase. "
    assert question_text(question) == ("Question: What is the colour of the Big ball?\n"
                                       "Answer the question using a single word or phrase.")
    assert text_ids(_Words(), question_text("What is it?")) == [19, 14, 12, 13]  # "Question:" "What" "is" "it?"


@pytest.mark.parametrize("family, signal, text", [("llava", QUESTION_KEYWORDS, keyword_text),
                                                  ("qwen2_5_vl", QUESTION_TEXT, question_text),
                                                  ("qwen2_5_vl", QUESTION_KEYWORDS, keyword_text)])
def test_recorded_rows_are_the_input_embeddings_of_the_text_ids(family, signal, text):
    adapter, prepared = tiny_input(family)
    recording = record(adapter, prepared, CaptureRequest(signals=(signal,), layers=(0,), stacks=("llm",)))
    ids = text_ids(adapter.tokenizer, text(prepared.question))
    expected = adapter.model.get_input_embeddings().weight[torch.tensor(ids)].float().cpu()
    assert len(ids) >= 2
    assert torch.equal(recording.get(signal, 0, "tokens"), expected)


def test_the_two_texts_differ_on_the_same_question():
    adapter, prepared = tiny_input("qwen2_5_vl")
    keywords = keyword_ids(adapter.tokenizer, prepared.question)
    assert text_ids(adapter.tokenizer, question_text(prepared.question)) != keywords
