"""How much each visual token's hidden state changes across a layer (TransPrune's token
transition variation, recorded as its two raw parts) and how large it is.

Per recorded layer, with ``h_in``/``h_out`` the residual stream entering/leaving the layer:
``hidden_norm`` = ||h_out||, ``transition_magnitude`` = ||h_out|| - ||h_in|| (signed),
``transition_direction`` = 1 - cos(h_in, h_out). Exact; how a method combines them is its own.
"""

from __future__ import annotations

import torch

from probes.capture import LayerCapture
from probes.registry import Observation, Probe, SignalSpec, register_probe


def transition(hidden_in: torch.Tensor, hidden_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """[N, D] x [N, D] -> each signal's [N] values."""
    before, after = hidden_in.detach().float(), hidden_out.detach().float()
    norm_before, norm_after = before.norm(dim=-1), after.norm(dim=-1)
    cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1)
    return {"hidden_norm": norm_after, "transition_magnitude": norm_after - norm_before,
            "transition_direction": 1 - cosine}


@register_probe("transitions")
class TransitionsProbe(Probe):
    signals = (
        SignalSpec("hidden_norm", ("tower", "llm"), "token", "visual", "none",
                   "L2 norm of each visual token's hidden state leaving the layer"),
        SignalSpec("transition_magnitude", ("tower", "llm"), "token", "visual", "none",
                   "change of that norm across the layer"),
        SignalSpec("transition_direction", ("tower", "llm"), "token", "visual", "none",
                   "1 - cosine between the hidden state entering and leaving the layer"),
    )
    needs = frozenset({"hidden_in", "hidden_out"})

    def observe(self, state: LayerCapture):
        if not state.recorded or state.hidden_in is None or state.hidden_out is None:
            return
        visual = state.roles.visual.to(state.hidden_in.device)
        values = transition(state.hidden_in[visual], state.hidden_out[visual])
        for name in sorted(self.wanted):
            yield Observation(name, "tokens", values[name][None])
