"""Attention probabilities over the visual keys, recomputed from the q/k captured at the call.

For each requested row kind (``capture.ROW_KINDS``: last, text, cls, visual, mean) and each
recorded layer: the probability each query row gives each visual key, and the total mass it gives
to visual, text, system and sink keys (``capture.KEY_CATEGORIES``; the sink set is the layer's
own, see ``probes/sinks.py``, and may overlap the others). "mean" rows are the attention each key
receives averaged over every non-padding query (the criterion for towers without a [CLS]).

Exact: the same product, scaling, mask and float32 softmax as eager attention, on the model's own
post-RoPE q/k. ``attention_norope`` scores the same rows with the q/k the rotary call received,
i.e. before RoPE; where a module applies no rotary embedding it equals ``attention``.
``attention_norope_visual`` is FEATHER's ranking: the same RoPE-free probabilities with each head's
row renormalised over the visual keys (a softmax over the image keys alone) before the head mean,
so a head that looks mostly at text weighs as much as one that looks at the image.
``attention_logits`` (tower only) holds the scores before the softmax, ``q.k * scaling`` on the
same q/k, for methods whose code ranks by logits (GlobalCom2 averages them over heads); the LLM's
causal mask would leave them infinite, so it is not recorded there.
"""

from __future__ import annotations

import torch

from probes.capture import KEY_CATEGORIES, ROW_KINDS, LayerCapture
from probes.registry import Observation, Probe, SignalSpec, register_probe


def received(state: LayerCapture, rope: bool) -> torch.Tensor:
    """Per-head attention each key receives, averaged over non-padding queries: [H, Sk]."""
    return state.passes(rope).received


def visual_rows(state: LayerCapture, kind: str, rope: bool, per_head: bool,
                weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the rows of ``kind`` to the visual keys, and their category masses:
    [H, R, N] and [H, R, 4] when ``per_head``, else head means [R, N] and [R, 4].

    ``weighted``: each probability times its key's ``value_norms`` (``flow.kobayashi``). Head
    means come from the layer's full sweep when it runs anyway; per-head values are computed for
    the rows asked, in chunks, so the per-head working set stays within the chunk budget.
    """
    visual = state.roles.visual.to(state.call.query.device)
    weight = state.value_norms if weighted else None
    if ROW_KINDS[kind].aggregate:
        mean = received(state, rope)[:, None, :]
        mean = mean if weight is None else mean * weight[:, None, :]
        mean = mean if per_head else mean.mean(0)
        return mean[..., visual], mean @ state.categories
    if not per_head and state.sweep:
        sweep = state.passes(rope)
        matrix = sweep.weighted if weighted and sweep.weighted is not None else None
        if matrix is not None or not weighted:
            rows = (sweep.head_mean if matrix is None else matrix)[state.rows[kind].to(visual.device)]
            return rows[:, visual], rows @ state.categories
    rows = state.rows[kind]
    heads = (state.call.heads,) if per_head else ()
    out = torch.empty(*heads, len(rows), len(visual), device=visual.device)
    mass = torch.empty(*heads, len(rows), len(KEY_CATEGORIES), device=visual.device)
    for part, probs in state.call.chunks(rows, state.chunk_bytes, rope):
        probs = probs if weight is None else probs * weight[:, None, :]
        probs = probs if per_head else probs.mean(0)
        out[..., part, :], mass[..., part, :] = probs[..., visual], probs @ state.categories
    return out, mass


def logit_rows(state: LayerCapture, kind: str, per_head: bool) -> torch.Tensor:
    """Pre-softmax scores (scaled, masked) of the rows of ``kind`` on the visual keys: [H, R, N] when
    ``per_head``, else the head mean [R, N]; an aggregate kind ("mean") averages its rows into one.
    Computed in row chunks so the [H, r, Sk] working set stays within the chunk budget."""
    call = state.call
    visual = state.roles.visual.to(call.query.device)
    rows = state.rows[kind]
    step = max(1, state.chunk_bytes // (2 * 4 * call.heads * call.n_keys))
    parts = [call.logits(rows[start:start + step])[..., visual] for start in range(0, len(rows), step)]
    values = torch.cat(parts, dim=1) if parts else torch.zeros(call.heads, 0, len(visual), device=visual.device)
    if ROW_KINDS[kind].aggregate:
        values = values.mean(1, keepdim=True)
    return values if per_head else values.mean(0)


@register_probe("attention")
class AttentionProbe(Probe):
    signals = (
        SignalSpec("attention", ("tower", "llm"), "query", "visual", "mean",
                   "attention probability of each query row on each visual key"),
        SignalSpec("attention_mass", ("tower", "llm"), "query", "category", "mean",
                   "total attention of each query row on visual, text, system and sink keys"),
        SignalSpec("attention_norope", ("tower", "llm"), "query", "visual", "mean",
                   "attention on visual keys scored with q/k before the rotary embedding"),
        SignalSpec("attention_norope_visual", ("tower", "llm"), "query", "visual", "mean",
                   "RoPE-free attention, each head's softmax taken over the visual keys alone (FEATHER)"),
        SignalSpec("attention_logits", ("tower",), "query", "visual", "mean",
                   "pre-softmax attention scores q.k x scaling of each query row on each visual key (GlobalCom2)"),
    )
    needs = frozenset({"call", "hidden_in"})

    def captures(self):
        norope = {"attention_norope", "attention_norope_visual"} & self.wanted
        return self.needs | ({"norope"} if norope else set())

    def observe(self, state: LayerCapture):
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
            if "attention_norope_visual" in self.wanted:
                values, _ = visual_rows(state, kind, False, per_head=True)
                values = values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
                yield Observation("attention_norope_visual", kind, values if per_head else values.mean(0), per_head)
            if "attention_logits" in self.wanted and state.stack == "tower":
                yield Observation("attention_logits", kind, logit_rows(state, kind, per_head), per_head)
