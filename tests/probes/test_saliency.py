"""Saliency: causal structure gives exact zeros, masking equals deletion, and on a constructed
decoder whose answer depends monotonically on two tokens, gradient x input and occlusion agree."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from transformers import LlamaConfig, LlamaModel

from probes import saliency
from workbench.recorder import answer_ids, record
from workbench.recording import CaptureRequest


def scoring(adapter, prepared, answer="small"):
    ids = answer_ids(adapter, prepared, CaptureRequest(), answer)
    return saliency.scoring_inputs(adapter.model, adapter.language_model(), prepared.inputs, ids,
                                   prepared.layout.positions)


def test_a_token_after_the_scored_positions_has_exactly_no_effect(shipped):
    adapter, prepared = shipped
    lm, head = adapter.language_model(), adapter.model.get_output_embeddings()
    base = scoring(adapter, prepared)
    # Pretend the answer token itself is "visual": no position that predicts the answer sees it.
    after = dataclasses.replace(base, visual=torch.tensor([base.length - 1]))
    assert saliency.occlusion(lm, head, after, [np.array([0])]).abs().item() < 1e-6
    assert saliency.gradient_x_input(lm, head, after).abs().item() == 0.0
    # A real visual token does matter.
    assert saliency.occlusion(lm, head, base, [np.array([0])]).abs().item() > 1e-6


def test_masking_a_token_equals_deleting_it_with_positions_kept(shipped):
    adapter, prepared = shipped
    lm, head = adapter.language_model(), adapter.model.get_output_embeddings()
    base = scoring(adapter, prepared)
    token = 7
    position = int(base.visual[token])
    masked = base.attention_mask.clone()
    masked[0, position] = 0
    with torch.no_grad():
        by_mask = saliency.answer_logprob(lm, head, base, attention_mask=masked)
        keep = torch.arange(base.length) != position
        deleted = dataclasses.replace(base, embeds=base.embeds[:, keep], attention_mask=base.attention_mask[:, keep],
                                      position_ids=torch.arange(base.length)[keep][None])
        by_deletion = saliency.answer_logprob(lm, head, deleted)
    torch.testing.assert_close(by_mask, by_deletion, atol=1e-5, rtol=0)


def monotone_decoder():
    """A 2-layer Llama decoder built by hand so that the answer's score rises with token p's
    content along e_1 and falls with token q's, and a masked token counts as a zeroed one.

    Layer 0 adds a constant b = 5 e_0 to every position (output-projection bias; all weights 0),
    so later norms see ``x + b`` and the content's scale matters. Layer 1 attends uniformly
    (q = 0) with values ``W_V norm(x + b)``, where ``W_V`` drops dim 0: a token with no content
    (x = 0) has value 0 and adds nothing, like a masked one. The head reads dim 1 for the answer.
    """
    dim = 8
    config = LlamaConfig(vocab_size=4, hidden_size=dim, intermediate_size=dim, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, attention_bias=True)
    model = LlamaModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in [model.norm] + [n for block in model.layers for n in (block.input_layernorm,
                                                                              block.post_attention_layernorm)]:
            norm.weight.fill_(1.0)
        model.layers[0].self_attn.o_proj.bias[0] = 5.0
        model.layers[1].self_attn.v_proj.weight.copy_(torch.diag(torch.tensor([0.0] + [1.0] * (dim - 1))))
        model.layers[1].self_attn.o_proj.weight.copy_(torch.eye(dim))
    head = torch.nn.Linear(dim, 4, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[1, 1] = 3.0  # answer token 1
    return model, head


def one_token_case(content: torch.Tensor) -> saliency.ScoringInputs:
    """Six positions, all without content but visual token 2 (position 2), the answer token 1 last."""
    embeds = torch.zeros(1, 6, 8)
    embeds[0, 2] = content
    return saliency.ScoringInputs(embeds, torch.ones(1, 6, dtype=torch.long), None, torch.tensor([1]),
                                  torch.tensor([1, 2, 3]))


def test_gradient_x_input_agrees_in_sign_with_occlusion_on_a_constructed_case():
    model, head = monotone_decoder()
    signs = {}
    for name, content in {"supports": 2.0 * torch.eye(8)[1], "opposes": -1.0 * torch.eye(8)[1],
                          "unread": 1.5 * torch.eye(8)[0]}.items():
        case = one_token_case(content)
        gradient = saliency.gradient_x_input(model, head, case)[1]
        occluded = saliency.occlusion(model, head, case, [np.array([1])])[0]
        signs[name] = (gradient, occluded)
        if name != "unread":
            # the construction: masking the token equals zeroing its content
            with torch.no_grad():
                zeroed = dataclasses.replace(case, embeds=torch.zeros_like(case.embeds))
                drop = saliency.answer_logprob(model, head, case) - saliency.answer_logprob(model, head, zeroed)
            torch.testing.assert_close(drop[0], occluded, atol=1e-6, rtol=0)
    assert signs["supports"][0] > 0 and signs["supports"][1] > 0
    assert signs["opposes"][0] < 0 and signs["opposes"][1] < 0
    assert signs["unread"][0].abs() < 1e-6 and signs["unread"][1].abs() < 1e-6


def test_saliency_signals_in_a_recording(shipped):
    adapter, prepared = shipped
    request = CaptureRequest(signals=("grad_x_input", "attention_x_gradient"), stacks=("llm",), layers=(0, 2))
    recording = record(adapter, prepared, request, answer="small")
    assert recording.identity.answer == "small"
    assert recording.get("grad_x_input", -1, "answer").shape == (1, prepared.layout.n_tokens)
    assert recording.layers("attention_x_gradient") == [0, 2]
    assert recording.get("attention_x_gradient", 2, "answer").abs().sum() > 0
