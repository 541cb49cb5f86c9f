"""``projected_patches``: every tower patch's feed-layer feature through the projector (probes/projected.py)."""

from __future__ import annotations

import torch

from probes.projected import PROJECTED_PATCHES
from tests.pruning.shipped import tiny_input
from workbench.recorder import record
from workbench.recording import CaptureRequest


def _request(adapter) -> CaptureRequest:
    return CaptureRequest(signals=(PROJECTED_PATCHES,), tower_layers=(adapter.projector_feed_tower_layer,), stacks=("tower",))


def test_every_view_holds_the_projector_on_its_feed_layer_patches_padding_included():
    adapter, prepared = tiny_input("llava_next")
    recording = record(adapter, prepared, _request(adapter))
    with torch.no_grad():
        states = adapter.model.model.vision_tower(prepared.inputs["pixel_values"].flatten(0, 1), output_hidden_states=True)
        expected = adapter.projector()(states.hidden_states[adapter.projector_feed_layer][:, 1:])
    sizes = [len(owner) for owner in prepared.layout.tower_owner]
    assert len(sizes) == expected.shape[0] > 1 and sum(sizes) > prepared.layout.n_tokens  # base + padded crops
    for view, size in enumerate(sizes):
        got = recording.get(PROJECTED_PATCHES, adapter.projector_feed_tower_layer, "tokens", "tower", view=view)
        assert got.shape == (size, adapter.language_model().config.hidden_size)
        torch.testing.assert_close(got, expected[view].float(), atol=1e-5, rtol=1e-5)


def test_a_model_without_a_patchwise_projector_records_nothing():
    adapter, prepared = tiny_input("qwen2_vl")
    recording = record(adapter, prepared, _request(adapter))
    assert not recording.keys(PROJECTED_PATCHES, "tower")
