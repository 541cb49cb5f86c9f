"""FEATHER's criterion: attention scored with q/k before the rotary embedding."""

from __future__ import annotations

import torch

from workbench.recorder import record
from workbench.recording import CaptureRequest


def test_norope_differs_from_rope_and_equals_a_hand_computation(shipped):
    adapter, prepared = shipped
    request = CaptureRequest(signals=("attention", "attention_norope", "attention_norope_visual"),
                             rows=("last", "text"), stacks=("llm",), per_head=True)
    recording = record(adapter, prepared, request)
    with torch.no_grad():
        hidden = adapter.model(**prepared.inputs, output_hidden_states=True).hidden_states
    visual = torch.as_tensor(prepared.layout.positions)
    for layer, block in enumerate(adapter.decoder_layers()):
        attention = block.self_attn
        x = block.input_layernorm(hidden[layer][0])
        heads = attention.config.num_attention_heads
        q = attention.q_proj(x).view(len(x), heads, -1).transpose(0, 1)
        k = attention.k_proj(x).view(len(x), heads, -1).transpose(0, 1)
        logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        logits = logits.masked_fill(torch.ones_like(logits[0], dtype=torch.bool).triu(1), float("-inf"))
        by_hand = torch.softmax(logits, -1)
        no_rope = recording.get("attention_norope", layer, "last", head=None)
        with_rope = recording.get("attention", layer, "last")
        torch.testing.assert_close(no_rope, by_hand[:, -1:, visual].mean(0), atol=1e-5, rtol=0)
        for head in range(heads):
            torch.testing.assert_close(recording.get("attention_norope", layer, "text", head=head),
                                       by_hand[head][recording.rows_of("text")][:, visual], atol=1e-5, rtol=0)
        assert (no_rope - with_rope).abs().max() > 1e-4  # RoPE matters at these distances
        # FEATHER: each head's softmax over the visual keys alone, then the head mean
        visual_only = torch.softmax(logits[:, -1:, visual], -1)
        torch.testing.assert_close(recording.get("attention_norope_visual", layer, "last"), visual_only.mean(0),
                                   atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(recording.get("attention_norope_visual", layer, "last", head=0), visual_only[0],
                                   atol=1e-6, rtol=1e-4)
        # heads give the image different shares, so it is not the renormalised head mean (about 5e-5
        # apart on this untrained model, float32 error is near 1e-9)
        renormalised = no_rope / no_rope.sum(-1, keepdim=True)
        assert (recording.get("attention_norope_visual", layer, "last") - renormalised).abs().max() > 1e-6
