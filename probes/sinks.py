"""Massive activations, sink tokens, and the attention they draw.

Measured on the residual stream *entering* each layer (``hidden_in``): that is what the layer's
attention sees, so the sink tokens of layer l are the ones whose attention share is recorded at l.

* ``massive_activations`` (table): entries with ``|h| > ratio x median(|h|)`` of the layer and
  ``|h| > floor`` (Sun et al. 2024 use ratio 1000 and floor 100 on 7B models; the defaults here,
  100 and 20, also catch the smaller ones of small models). The dimensions are found from the
  data, never listed by hand. Sink tokens are the tokens that hold one.
* ``sink_share``: attention mass on the layer's sink tokens, averaged over every non-padding query
  row and the heads.
* ``visual_sink_score`` ("See What You Are Told", Kang et al. 2025, VAR): per visual token,
  ``max_d |h_d| / rms(h)`` over the sink dimensions found so far in the stack (this layer's and
  every earlier one's); tokens above ``var_tau`` (20 in the paper) are its visual sinks. The
  score cannot exceed sqrt(D) (one entry holding all the energy), so the paper's 20, set for
  D = 4096, is out of reach below D = 400: scale the threshold with sqrt(D).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from probes.capture import LayerCapture
from probes.registry import Observation, Probe, SignalSpec, TableRows, register_probe


@dataclass(frozen=True)
class Massive:
    """Massive entries of one hidden state [S, D]: parallel (position, dim, value) tensors."""

    positions: torch.Tensor
    dims: torch.Tensor
    values: torch.Tensor
    median: float

    @property
    def tokens(self) -> torch.Tensor:
        return torch.unique(self.positions)

    @property
    def dimensions(self) -> torch.Tensor:
        return torch.unique(self.dims)


def massive_activations(hidden: torch.Tensor, ratio: float = 100.0, floor: float = 20.0,
                        valid: torch.Tensor | None = None) -> Massive:
    """Entries of ``hidden`` [S, D] far above the layer's median magnitude (padding rows ignored)."""
    magnitude = hidden.detach().float().abs()
    if valid is not None:
        magnitude.mul_(valid.to(magnitude.device)[:, None])
    median = float(magnitude.median())
    positions, dims = (magnitude > max(ratio * median, floor)).nonzero(as_tuple=True)
    return Massive(positions.cpu(), dims.cpu(), hidden.detach()[positions, dims].float().cpu(), median)


def sink_dimension_score(hidden: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """``max_{d in dims} |h_d| / rms(h)`` for every row of ``hidden`` [S, D] (0 when no dims)."""
    if not len(dims):
        return torch.zeros(hidden.shape[0], device=hidden.device)
    hidden = hidden.detach().float()
    rms = hidden.pow(2).mean(-1).sqrt().clamp(min=1e-12)
    return hidden[:, dims.to(hidden.device)].abs().amax(-1) / rms


MASSIVE_SCHEMA = {"position": pl.Int64, "dim": pl.Int64, "value": pl.Float64, "median": pl.Float64, "role": pl.String}


@register_probe("sinks")
class SinksProbe(Probe):
    signals = (
        SignalSpec("massive_activations", ("tower", "llm"), "table", "one", "none",
                   "entries of the residual stream far above the layer's median magnitude"),
        SignalSpec("sink_share", ("tower", "llm"), "token", "one", "mean",
                   "attention mass on the layer's sink tokens, mean over query rows"),
        SignalSpec("visual_sink_score", ("tower", "llm"), "token", "visual", "none",
                   "VAR: max |h_d| / rms(h) over the sink dimensions, per visual token"),
    )
    needs = frozenset({"hidden_in"})

    def captures(self):
        return self.needs | ({"call"} if "sink_share" in self.wanted else set())

    def observe(self, state: LayerCapture):
        if not state.recorded or state.hidden_in is None:
            return
        options = self.options
        if "massive_activations" in self.wanted:
            found = state.massive  # found already for the layer's sink tokens, with the same thresholds
            if found is None:
                found = massive_activations(state.hidden_in, options.sink_ratio, options.sink_floor, state.roles.valid)
            role = {int(p): "visual" for p in state.roles.visual}
            role.update({int(p): "text" for p in state.roles.text})
            yield TableRows("massive_activations", {
                "position": found.positions.tolist(), "dim": found.dims.tolist(),
                "value": found.values.tolist(), "median": [found.median] * len(found.positions),
                "role": [role.get(int(p), "system") for p in found.positions],
            }, MASSIVE_SCHEMA)
        if "sink_share" in self.wanted and state.call is not None:
            share = state.full_pass.received[:, state.sinks.to(state.full_pass.received.device)].sum(-1)
            yield Observation("sink_share", "tokens", *self.reduce_heads("sink_share", share[:, None, None]))
        if "visual_sink_score" in self.wanted:
            score = sink_dimension_score(state.hidden_in[state.roles.visual.to(state.hidden_in.device)],
                                         state.sink_dims)
            yield Observation("visual_sink_score", "tokens", score[None])
