"""The question's keywords as the decoder embeds them: MMTok's text side.

MMTok's code covers the question's *keywords*, not the prompt: it takes the user turn the
evaluation harness builds for LLaVA (the image placeholder, a newline, then the question with its
answer-format instruction), deletes the two answer-format instructions, splits the rest into words
(``\\b\\w+\\b``), drops the words in a small stop-word list (case-insensitive) and joins what is left
with spaces (the whole stripped text when nothing is left). The words go to the language model's
tokenizer as pre-split words, a leading BOS is dropped, and each token id is looked up in the
decoder's input embedding table. Because the user turn starts with ``<image>``, the word "image" is
always the first keyword; that accident of the code is kept.

``question_keywords`` ([T, D], rows in keyword order) is not read from a layer: the recorder builds
it from ``PreparedInput.question`` with the adapter's tokenizer and input embeddings, and stores it
under the decoder's layer 0 (it is an input of that layer's coverage, like ``text_states`` there).
"""

from __future__ import annotations

import re

import torch

from probes.registry import Probe, SignalSpec, register_probe

QUESTION_KEYWORDS = "question_keywords"

IMAGE_PLACEHOLDER = "<image>\n"  # what the harness puts before the question in LLaVA's user turn
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
    """The text MMTok embeds for ``question``: its keywords joined by spaces."""
    text = IMAGE_PLACEHOLDER + question
    for prompt in ANSWER_PROMPTS:
        text = text.replace(prompt, "")
    words = [w for w in _WORD.findall(text) if w.lower() not in STOP_WORDS]
    return " ".join(words) if words else text


def keyword_ids(tokenizer, question: str) -> list[int]:
    """Token ids of ``question``'s keywords: tokenised as pre-split words, a leading BOS dropped."""
    ids = tokenizer(keyword_text(question).split(), is_split_into_words=True)["input_ids"]
    return ids[1:] if len(ids) > 1 and ids[0] == tokenizer.bos_token_id else ids


@torch.no_grad()
def keyword_embeddings(adapter, question: str) -> torch.Tensor:
    """[T, D] rows of the decoder's input embedding table for ``question``'s keyword tokens."""
    table = adapter.model.get_input_embeddings()
    ids = torch.tensor(keyword_ids(adapter.tokenizer, question), dtype=torch.long, device=table.weight.device)
    return table(ids)


@register_probe("keywords")
class KeywordsProbe(Probe):
    signals = (
        SignalSpec(QUESTION_KEYWORDS, ("llm",), "text_feature", "hidden", "none",
                   "input embeddings of the question's keyword tokens (MMTok's text side)"),
    )
    needs = frozenset()  # it observes no layer: the recorder builds the signal from the question text
