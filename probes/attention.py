"""Attention probabilities over the visual keys, recomputed from the q/k captured at the call.

For each requested row kind (``capture.ROW_KINDS``: last, text, cls, visual, mean) and each
recorded layer: the probability each query row gives each visual key, and the total mass it gives
to visual, text, system and sink keys (``capture.KEY_CATEGORIES``; the sink set is the layer's
own, see ``probes/sinks.py``, and may overlap the others). "mean" rows are the attention each key
receives averaged over every non-padding query (the criterion for towers without a [CLS]).

Exact: the same product, scaling, mask and float32 softmax as eager attention, on the model's own
post-RoPE q/k. ``attention_norope`` (FEATHER's criterion) scores the same rows with the q/k the
rotary call received, i.e. before RoPE; where a module applies no rotary embedding it equals
``attention``.
"""

from __future__ import annotations

import torch

from probes.capture import KEY_CATEGORIES, ROW_KINDS, LayerState
from probes.registry import Observation, Probe, SignalSpec, register_probe


def category_mass(probs: torch.Tensor, state: LayerState) -> torch.Tensor:
    """[H, R, Sk] -> [H, R, 4]: total probability on each key category."""
    columns = [probs[..., state.roles.category(name, state.sinks).to(probs.device)].sum(-1)
               for name in KEY_CATEGORIES]
    return torch.stack(columns, dim=-1)


def received(state: LayerState, rope: bool) -> torch.Tensor:
    """Per-head attention each key receives, averaged over non-padding queries: [H, Sk]."""
    if rope:
        return state.full_pass.received
    call = state.call
    valid = state.roles.valid.to(call.query.device)
    rows = torch.arange(call.n_queries, device=call.query.device)
    total = torch.zeros(call.heads, call.n_keys, device=call.query.device)
    for part, probs in call.chunks(rows, state.chunk_bytes, rope=False):
        total += (probs * valid[part][None, :, None]).sum(1)
    return total / valid.sum().clamp(min=1)


def visual_rows(state: LayerState, kind: str, rope: bool, per_head: bool,
                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the rows of ``kind`` to the visual keys, and their category masses:
    [H, R, N] and [H, R, 4] when ``per_head``, else head means [R, N] and [R, 4].

    ``weight`` [H, Sk] multiplies every row's probabilities first (``flow.kobayashi``). Heads are
    reduced chunk by chunk, so the per-head working set stays within the chunk budget.
    """
    visual = state.roles.visual.to(state.call.query.device)

    def finish(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weighted = probs if weight is None else probs * weight[:, None, :]
        values, mass = weighted[..., visual], category_mass(weighted, state)
        return (values, mass) if per_head else (values.mean(0), mass.mean(0))

    if ROW_KINDS[kind].aggregate:
        return finish(received(state, rope)[:, None, :])
    rows = state.rows[kind]
    heads = (state.call.heads,) if per_head else ()
    out = torch.empty(*heads, len(rows), len(visual), device=visual.device)
    mass = torch.empty(*heads, len(rows), len(KEY_CATEGORIES), device=visual.device)
    for part, probs in state.call.chunks(rows, state.chunk_bytes, rope):
        out[..., part, :], mass[..., part, :] = finish(probs)
    return out, mass


@register_probe("attention")
class AttentionProbe(Probe):
    signals = (
        SignalSpec("attention", ("tower", "llm"), "query", "visual", "mean",
                   "attention probability of each query row on each visual key"),
        SignalSpec("attention_mass", ("tower", "llm"), "query", "category", "mean",
                   "total attention of each query row on visual, text, system and sink keys"),
        SignalSpec("attention_norope", ("tower", "llm"), "query", "visual", "mean",
                   "attention on visual keys scored with q/k before the rotary embedding (FEATHER)"),
    )
    needs = frozenset({"call", "hidden_in"})

    def captures(self):
        return self.needs | ({"norope"} if "attention_norope" in self.wanted else set())

    def observe(self, state: LayerState):
        if not state.recorded or state.call is None:
            return
        per_head = self.options.per_head
        for kind in state.rows:
            if {"attention", "attention_mass"} & self.wanted:
                values, mass = visual_rows(state, kind, True, per_head)
                if "attention" in self.wanted:
                    yield Observation("attention", kind, values, per_head)
                if "attention_mass" in self.wanted:
                    yield Observation("attention_mass", kind, mass, per_head)
            if "attention_norope" in self.wanted:
                values, _ = visual_rows(state, kind, False, per_head)
                yield Observation("attention_norope", kind, values, per_head)
