"""A planted massive activation is found, and marks its tokens as sinks."""

from __future__ import annotations

import torch

from probes.sinks import massive_activations, sink_dimension_score
from workbench.recorder import record
from workbench.recording import CaptureRequest

DIM = 37


def test_planted_entry_is_found():
    torch.manual_seed(0)
    hidden = torch.randn(20, 1024)
    hidden[3, DIM] = 400.0
    found = massive_activations(hidden)
    assert found.tokens.tolist() == [3] and found.dimensions.tolist() == [DIM]
    assert found.values.tolist() == [400.0]
    score = sink_dimension_score(hidden, found.dimensions)
    assert score.argmax() == 3 and score[3] > 20 > score[torch.arange(20) != 3].max()


def test_planted_activation_in_the_model_is_found_and_draws_attention(shipped):
    adapter, prepared = shipped
    bos, visual = 0, int(prepared.layout.positions[5])

    def plant(module, args, output):
        output[0, [bos, visual], DIM] = 500.0  # the residual stream leaving decoder layer 0
        return output

    handle = adapter.decoder_layers()[0].register_forward_hook(plant)
    try:
        request = CaptureRequest(signals=("massive_activations", "visual_sink_score", "sink_share", "attention_mass"),
                                 stacks=("llm",), layers=(1,), rows=("last",))
        recording = record(adapter, prepared, request)
    finally:
        handle.remove()
    table = recording.table("massive_activations")
    assert set(zip(table["position"], table["dim"])) == {(bos, DIM), (visual, DIM)}
    assert set(table["role"]) == {"system", "visual"} and set(table["layer"]) == {1}
    score = recording.get("visual_sink_score", 1, "tokens")[0]
    # max |h_d| / rms(h) is at most sqrt(D) = 11.3 here (VAR's threshold 20 assumes D = 4096)
    others = torch.cat([score[:5], score[6:]])
    assert score.argmax() == 5 and score[5] > 10 > 4 * others.max()
    mass = recording.get("attention_mass", 1, "last")[0]  # visual, text, system, sink
    assert 0 < mass[3] <= mass[0] + mass[2] + 1e-6
    assert recording.get("sink_share", 1, "tokens").item() > 0
