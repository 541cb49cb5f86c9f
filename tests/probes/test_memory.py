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
