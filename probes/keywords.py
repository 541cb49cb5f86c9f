"""The question as MMTok's code embeds it: its text side, one signal per text rule of the code.

MMTok's code builds the text its visual tokens must cover from the question, with one rule per
model path (``TEXT_RULES``, keyed by signal name; which path a model family takes is the method's
business, ``workbench.pruning.methods.mmtok``):

- ``question_keywords`` (its LLaVA path): the user turn the evaluation harness builds for LLaVA
  (the image placeholder, a newline, then the question with its answer-format instruction), the two
  answer-format instructions deleted, split into words (``\\b\\w+\\b``), the words in a small
  stop-word list dropped (case-insensitive) and what is left joined with spaces (the whole stripped
  text when nothing is left). Because the user turn starts with ``<image>``, the word "image" is
  always the first keyword; that accident of the code is kept.
- ``question_text`` (its Qwen2.5-VL path): the user message's text (stripped, any ``<image>``
  removed, stripped again) prefixed with ``"Question: "``, unfiltered: no stop words dropped, the
  answer-format instruction kept.

Either text goes to the language model's tokenizer as pre-split words (``str.split()``), a leading
BOS is dropped, and each token id is looked up in the decoder's input embedding table.

The signals ([T, D], rows in token order) are not read from a layer: the recorder builds them from
``PreparedInput.question`` with the adapter's tokenizer and input embeddings, and stores them under
the decoder's layer 0 (they are an input of that layer's coverage, like ``text_states`` there).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from probes.registry import Probe, SignalSpec, register_probe

QUESTION_KEYWORDS = "question_keywords"
QUESTION_TEXT = "question_text"

IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER = IMAGE_TOKEN + "\n"  # what the harness puts before the question in LLaVA's user turn
ANSWER_PROMPTS = ("Answer the question using a single word or phrase.",
                  "Answer with the option's letter from the given choices directly.")
# Words the code treats as carrying nothing visual.
STOP_WORDS = frozenset("""
a an the is are was were be been being have has had do does did it they he she we you i
what where when why how who which and or but so if then question answer
to for with by from at into onto upon
""".split())
_WORD = re.compile(r"\b\w+\b")


def keyword_text(question: str) -> str:
    """The LLaVA path's text for ``question``: its keywords joined by spaces."""
    text = IMAGE_PLACEHOLDER + question
    for prompt in ANSWER_PROMPTS:
        text = text.replace(prompt, "")
    words = [w for w in _WORD.findall(text) if w.lower() not in STOP_WORDS]
    return " ".join(words) if words else text


def question_text(question: str) -> str:
    """The Qwen2.5-VL path's text for ``question``: "Question: " and the user text, unfiltered."""
    return "Question: " + question.strip().replace(IMAGE_TOKEN, "").strip()


# Signal -> the text the code embeds for a question.
TEXT_RULES: dict[str, Callable[[str], str]] = {QUESTION_KEYWORDS: keyword_text, QUESTION_TEXT: question_text}


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``: tokenised as pre-split words, a leading BOS dropped."""
    ids = tokenizer(text.split(), is_split_into_words=True)["input_ids"]
    return ids[1:] if len(ids) > 1 and ids[0] == tokenizer.bos_token_id else ids


def keyword_ids(tokenizer, question: str) -> list[int]:
    """Token ids of ``question``'s keywords (the LLaVA path)."""
    return text_ids(tokenizer, keyword_text(question))


@torch.no_grad()
def text_embeddings(adapter, signal: str, question: str) -> torch.Tensor:
    """[T, D] rows of the decoder's input embedding table for the tokens of ``signal``'s text."""
    table = adapter.model.get_input_embeddings()
    ids = text_ids(adapter.tokenizer, TEXT_RULES[signal](question))
    return table(torch.tensor(ids, dtype=torch.long, device=table.weight.device))


@register_probe("keywords")
class KeywordsProbe(Probe):
    signals = (
        SignalSpec(QUESTION_KEYWORDS, ("llm",), "text_feature", "hidden", "none",
                   "input embeddings of the question's keyword tokens (MMTok's LLaVA text side)"),
        SignalSpec(QUESTION_TEXT, ("llm",), "text_feature", "hidden", "none",
                   "input embeddings of 'Question: ' and the question, unfiltered (MMTok's Qwen2.5-VL text side)"),
    )
    needs = frozenset()  # it observes no layer: the recorder builds the signals from the question text
