"""Every signal records on a tiny model of every family: finite, the right shapes, and the
family-specific paths (M-RoPE, block-wise towers, tiles, no [CLS]) behave."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import QUESTION, TINY_FAMILIES, TINY_SPECS, noise_image, tiny_adapter
from workbench.recorder import record
from workbench.recording import SALIENCY_SIGNALS, SINGLE_FORWARD_SIGNALS, CaptureRequest

ROTARY_TOWERS = {"qwen2_vl", "qwen2_5_vl"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_signal_records(family):
    adapter = tiny_adapter(family)
    prepared = adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)
    request = CaptureRequest(signals=SINGLE_FORWARD_SIGNALS + SALIENCY_SIGNALS, rows=("last", "text", "cls", "mean"),
                             occlusion_groups=(2,), max_answer_tokens=2)
    recording = record(adapter, prepared, request)
    n = prepared.layout.n_tokens
    for key, value in recording.tensors.items():
        assert torch.isfinite(value).all(), key
        if key.stack == "llm" and key.signal not in ("attention_mass", "contribution_residual", "sink_share"):
            assert value.shape[-1] == n, key
    llm = len(adapter.decoder_layers())
    assert recording.layers("attention") == list(range(llm))
    assert recording.layers("attention_x_gradient") == list(range(llm))
    assert recording.get("occlusion", -1, "k2").shape == (1, n)
    mass = recording.get("attention_mass", 0, "last")[0]
    assert abs(float(mass[:3].sum()) - 1.0) < 1e-5  # visual + text + system cover every key
    for layer in range(llm):  # every decoder here uses RoPE
        assert not torch.allclose(recording.get("attention", layer, "last"),
                                  recording.get("attention_norope", layer, "last"))
    tower_rope = recording.get("attention", 0, "mean", "tower")
    tower_norope = recording.get("attention_norope", 0, "mean", "tower")
    assert torch.allclose(tower_rope, tower_norope) == (family not in ROTARY_TOWERS)
    assert bool(recording.keys("flowcut", "tower")) == adapter.has_cls_token
