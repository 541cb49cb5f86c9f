"""MMTok parity: the official multimodal max-coverage rule against ``MMTok().select``.

Official code: Ironieser/MMTok (HEAD)
- mmtok/core/semantic_selector.py lines 106-118 (``mm_coverage_selection``): L2-normalised text
  embeddings z, projected vision tokens x and CLIP features x_clip; P = softmax(z x^T / tv_temp, dim=1)/m,
  Q = softmax(x_clip x_clip^T / vv_temp, dim=1)/n, Combined = [P; alpha * Q];
  lines 134-143 (and the JIT kernel, lines 24-65): k greedy steps, each
  ``argmax(sum(clamp_min(Combined - best, 0), 0))`` over unpicked columns, best = max(best, column).
- mmtok/core/mmtok_core.py lines 41-43: softmax_tv_temperature=0.02 (vv 0.2, alpha 0.5).
- mmtok/llava/clip_encoder_mmtok.py lines 73-76: x_clip = ``hidden_states[-2][:, 1:]`` (the projector's
  input; here the tower's projector-feed hidden state), x = ``mm_projector`` of it (the decoder's
  input embeddings at the image positions).
Text side (P's rows) of the LLaVA path, the default (``text="code"``) on LLaVA families and ``text="keywords"``
on every family (the Qwen path: test_mmtok_qwen.py):
- example/lmms_eval_llava_mmtok.py lines 369-379 and mmtok/llava/llava_inject.py lines 163-165: the
  question the selector reads is the user turn, ``"<image>" + "\\n" + context``.
- mmtok/core/text_processor.py lines 17-31 (stop words, the two answer-format prompts) and 44-54
  (``extract_keywords_simple``: prompts deleted, ``\\b\\w+\\b`` words, stop words dropped
  case-insensitively, joined by spaces; the stripped text when none is left).
- mmtok/core/mmtok_core.py lines 71-85 and 107-108: ``tokenizer(text.split(), is_split_into_words=True)``,
  ``embed_tokens`` of the ids, a leading BOS dropped.
``text="prompt"`` (every text token after the image): the reference takes the same rows from the eager
forward's ``hidden_states[0]``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.pruning.parity.common import (case, eager_forward, eager_tower, facts, jaccard, labels, n_keep,
                                         visual_positions, workbench_plan)
from workbench.pruning.methods.mmtok import MMTok

BUDGETS = (0.125, 0.25, 0.5)


def official_mmtok(text, vision, vision_clip, k: int, alpha=0.5, tv_temp=0.02, vv_temp=0.2) -> np.ndarray:
    def l2(x):
        return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    z_norm, x_norm, x_clip_norm = l2(text), l2(vision), l2(vision_clip)
    P = z_norm @ x_norm.T
    Q = x_clip_norm @ x_clip_norm.T
    m, n = P.shape
    P = F.softmax(P * (1.0 / tv_temp), dim=1) / m
    Q = F.softmax(Q * (1.0 / vv_temp), dim=1) / n
    Combined = torch.cat([P, Q * alpha], dim=0)
    best = torch.zeros(m + n, dtype=Combined.dtype)
    mask = torch.zeros(n, dtype=Combined.dtype)
    picks = []
    for _ in range(k):
        delta = (Combined - best.unsqueeze(1)).clamp_min_(0).sum(0) + mask
        idx = int(torch.argmax(delta))
        picks.append(idx)
        best = torch.maximum(best, Combined[:, idx])
        mask[idx] = float("-inf")
    return np.sort(picks)


NON_VISUAL = {"a", "an", "the", "is", "are", "was", "were", "be", "been", "being", "have", "has", "had", "do",
              "does", "did", "it", "they", "he", "she", "we", "you", "i", "what", "where", "when", "why", "how",
              "who", "which", "and", "or", "but", "so", "if", "then", "question", "answer", "to", "for", "with",
              "by", "from", "at", "into", "onto", "upon"}
PROMPTS = ("Answer the question using a single word or phrase.",
           "Answer with the option's letter from the given choices directly.")


@torch.no_grad()
def official_text(adapter, question: str) -> torch.Tensor:
    """The code's text embedding z for ``question`` (text_processor.py 44-54, mmtok_core.py 71-85)."""
    turn = "<image>" + "\n" + question
    for prompt in PROMPTS:
        turn = turn.replace(prompt, "")
    words = [w for w in re.findall(r"\b\w+\b", turn) if w.lower() not in NON_VISUAL]
    text = " ".join(words) if words else turn
    tokenizer = adapter.tokenizer
    ids = torch.tensor([tokenizer(text.split(), is_split_into_words=True, truncation=True)["input_ids"]])
    embedded = adapter.model.get_input_embeddings()(ids)[0]
    start = 1 if ids.shape[1] > 1 and ids[0, 0].item() == tokenizer.bos_token_id else 0
    return embedded[start:].double()


def reference_inputs(adapter, prepared):
    """(projected visual tokens, the tower's projector-feed features, every text token after the image)."""
    embeds = eager_forward(adapter, prepared).hidden_states[0][0].double()
    positions = visual_positions(prepared)
    clip = eager_tower(adapter, prepared).hidden_states[facts(adapter).projector_feed_layer][0, 1:].double()
    return embeds[torch.as_tensor(positions)], clip, embeds[positions.max() + 1:]  # one sequence: no padding


@pytest.mark.parametrize("label", labels(("llava",)))
def test_default_equals_the_official_rule(label):
    adapter, prepared = case(label)
    vision, clip, _ = reference_inputs(adapter, prepared)
    text = official_text(adapter, prepared.question)
    for budget in BUDGETS:
        (stage,) = workbench_plan(MMTok(), adapter, prepared, budget).stages
        kept = official_mmtok(text, vision, clip, n_keep(prepared, budget))
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)


def test_the_prompt_rule_differs_from_the_code():
    """Covering every text token after the image is not the code's rule: on the shipped samples it keeps
    another set at some budget (so the test above fails when the default covers the prompt)."""
    differs = []
    for label in labels():
        adapter, prepared = case(label)
        vision, clip, _ = reference_inputs(adapter, prepared)
        text = official_text(adapter, prepared.question)
        for budget in BUDGETS:
            (stage,) = workbench_plan(MMTok(text="prompt"), adapter, prepared, budget).stages
            differs.append(jaccard(stage.kept, official_mmtok(text, vision, clip, n_keep(prepared, budget))) < 1.0)
    assert any(differs)


@pytest.mark.parametrize("label", labels(("llava",)))
def test_prompt_text_covers_every_token_after_the_image(label):
    adapter, prepared = case(label)
    vision, clip, text = reference_inputs(adapter, prepared)
    for budget in BUDGETS:
        (stage,) = workbench_plan(MMTok(text="prompt"), adapter, prepared, budget).stages
        kept = official_mmtok(text, vision, clip, n_keep(prepared, budget))
        assert jaccard(stage.kept, kept) == 1.0, (label, budget)
