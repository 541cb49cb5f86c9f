"""The memory guard refuses oversized captures and says what to drop."""

from __future__ import annotations

import pytest

from workbench.memory import MemoryBudgetExceeded, check_memory, estimate
from workbench.recorder import record
from workbench.recording import CaptureRequest


def test_oversized_request_is_refused_naming_what_to_drop(shipped):
    adapter, prepared = shipped
    request = CaptureRequest(rows=("last", "text", "visual", "mean"), per_head=True)
    with pytest.raises(MemoryBudgetExceeded) as error:
        record(adapter, prepared, request, memory_limit=2 * 2**20)
    message = str(error.value)
    assert "limit" in message and "per-head" in message and "fewer llm layers" in message
    assert "'visual' rows" in message


def test_estimate_grows_with_what_is_asked(shipped):
    adapter, prepared = shipped
    small = estimate(adapter, prepared, CaptureRequest(rows=("last",)))
    large = estimate(adapter, prepared, CaptureRequest(rows=("last", "visual"), per_head=True))
    assert large.total > small.total
    visual = sum(v for k, v in large.stored.items() if "attention on 'visual' rows, per head (llm)" in k)
    text = adapter.model.config.text_config
    heads, layers, n = text.num_attention_heads, text.num_hidden_layers, prepared.layout.n_tokens
    assert visual == heads * n * n * 4 * layers  # [H, N, N] float32 per layer
    assert check_memory(adapter, prepared, CaptureRequest(rows=("last",))).total == small.total


def test_projected_patches_are_counted_at_the_decoders_width():
    """Every tower patch through the projector is as wide as the decoder, not as the tower: the
    estimate of that signal is the recording's size (on a tiny LLaVA whose decoder is wider)."""
    import copy

    import torch
    from transformers import LlavaForConditionalGeneration

    from probes.projected import PROJECTED_PATCHES
    from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter
    from workbench.models.registry import adapter_for

    config = copy.deepcopy(tiny_adapter("llava").model.config)
    config.text_config.hidden_size, config.text_config.intermediate_size = 48, 96
    torch.manual_seed(0)
    adapter = adapter_for(LlavaForConditionalGeneration(config).eval(), tiny_adapter("llava").processor, name="wide")
    prepared = adapter.prepare(noise_image(TINY_SPECS["llava"].image_size), QUESTION)
    request = CaptureRequest(signals=(PROJECTED_PATCHES,), stacks=("tower",), tower_layers=(adapter.projector_feed_tower_layer,))
    recorded = sum(t.nelement() * t.element_size() for t in record(adapter, prepared, request).tensors.values())
    estimated = sum(v for k, v in estimate(adapter, prepared, request).stored.items() if PROJECTED_PATCHES in k)
    assert recorded > 0 and estimated == recorded
