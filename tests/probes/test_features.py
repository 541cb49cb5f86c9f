"""The feature signals (hidden states and keys of the visual and text tokens) are the model's own
tensors, on the shipped architecture and on every family, and the memory estimate counts them."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter
from workbench.memory import estimate
from workbench.recorder import record
from workbench.recording import CaptureRequest

FEATURES = ("visual_states", "visual_states_out", "text_states", "visual_keys", "text_keys")


def test_features_are_the_models_own_tensors(shipped):
    adapter, prepared = shipped
    recording = record(adapter, prepared, CaptureRequest(signals=FEATURES, layers=(0, 1), tower_layers=(1,)))
    layout = prepared.layout
    embeds = adapter.llm_input_embeddings(prepared.inputs)[0]
    text = torch.arange(layout.positions.max() + 1, layout.sequence_length)
    assert torch.allclose(recording.get("visual_states", 0, "tokens"), embeds[layout.positions], atol=1e-6)
    assert torch.allclose(recording.get("text_states", 0, "tokens"), embeds[text], atol=1e-6)
    # What leaves layer 0 enters layer 1.
    assert torch.allclose(recording.get("visual_states_out", 0, "tokens"), recording.get("visual_states", 1, "tokens"))
    # The tower has no RoPE: its keys are k_proj of the normed input, heads side by side.
    layer = adapter.vision_layers()[1]
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(recording.get("visual_states", 1, "tokens", "tower")))
    assert torch.allclose(recording.get("visual_keys", 1, "tokens", "tower"), keys, atol=1e-5)
    n, hidden = layout.n_tokens, adapter.language_model().config.hidden_size
    assert recording.get("visual_keys", 1, "tokens").shape == (n, hidden)
    assert recording.get("text_keys", 1, "tokens").shape == (len(text), hidden)


def test_memory_estimate_counts_features(shipped):
    adapter, prepared = shipped
    request = CaptureRequest(signals=("visual_states",), layers=(0,), stacks=("llm",))
    stored = estimate(adapter, prepared, request).stored
    n, hidden = prepared.layout.n_tokens, adapter.language_model().config.hidden_size
    assert sum(stored.values()) == n * hidden * 4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_features_record_on_every_family(family):
    adapter = tiny_adapter(family)
    prepared = adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)
    recording = record(adapter, prepared, CaptureRequest(signals=FEATURES, layers=(0,), stacks=("llm",)))
    n = prepared.layout.n_tokens
    assert recording.get("visual_states", 0, "tokens").shape[0] == n
    assert recording.get("visual_keys", 0, "tokens").shape[0] == n
    assert recording.get("text_states", 0, "tokens").shape[0] == recording.get("text_keys", 0, "tokens").shape[0] > 0
    assert all(torch.isfinite(v).all() for v in recording.tensors.values())
