"""Information flow into the visual tokens: norm-weighted attention, rollout, contributions, FlowCut.

All exact given the captured q/k/v and the layer's weights; none materialises [S, S, H, d].

* ``kobayashi`` (Kobayashi et al. 2020, "Attention is not only a weight"): per head,
  ``||alpha_ij v_j^h W_O^h|| = alpha_ij ||v_j^h W_O^h||``, where ``W_O^h`` is head h's slice of the
  output projection. The norms come from the per-head Gram matrix ``W_O^h^T W_O^h`` [dv, dv]
  (``capture.value_output_norms``), so no [S, D] product per head is formed. The head reduction
  is the mean of the per-head values (not the norm of their sum, which is a different quantity).
* ``rollout`` (Abnar & Zuidema 2020): ``R_l = (0.5 A_l + 0.5 I) R_{l-1}`` with ``A_l`` the head-mean
  attention of layer l, starting from the identity at the stack's input. Only the columns of the
  visual sources are carried ([S, N]), so each layer costs one head-mean attention sweep.
* ``contribution`` (the LLM transparency tool's attention contributions, Ferrando & Voita 2024):
  for a chosen query row with residual input ``x`` and ``y = x + attn_out`` (output bias included),
  the parts are ``p_hk = alpha_hk v_k^h W_O^h`` (v includes the value bias) plus ``x`` itself;
  ``c = max(||y||_1 - ||y - p||_1, eps)``, normalised over all parts. Recorded: the visual keys'
  parts (summed over heads unless per-head values are asked for) and the residual's share.
* ``flowcut`` (FlowCut, Tong et al. 2025). The abstract only says the [CLS] token relays the
  information flow; the formula follows the released code (PyPI ``flowcut`` 1.0.1:
  ``utils_flowcut.compute_score`` fed by ``modeling_clip_flowcut.CLIPAttention_forward``): in a
  tower with [CLS], per patch j, ``(a_j / sum a + s_j / sum s) * ||v̄_j||_1`` with ``a`` the
  head-mean [CLS] attention row, ``s`` the head-mean of ``softmax_j(v_cls^h . v_j^h)`` (unscaled,
  over all keys), and ``v̄`` the head-mean value vector (the code's ``/ value.shape[-1]`` is
  commented out; so it is here). The layer-to-layer accumulation
  (0.5 old + 0.5 new) and the adaptive pruning ratio belong to the method, not the probe.
"""

from __future__ import annotations

import torch

from probes.attention import visual_rows
from probes.capture import ROW_KINDS, AttentionCall, LayerCapture, head_slices, row_positions
from probes.registry import Observation, Probe, SignalSpec, register_probe

EPS = 1e-5  # the transparency tool's floor for a part's contribution


# --- pure maths ---------------------------------------------------------------------------------

def rollout_step(carried: torch.Tensor, head_mean: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """One rollout layer: ``((1 - residual) A + residual I) @ carried`` with ``carried`` [S, N]."""
    return (1 - residual) * (head_mean @ carried) + residual * carried


def contributions(probs: torch.Tensor, value: torch.Tensor, out_slices: torch.Tensor,
                  resid: torch.Tensor, whole: torch.Tensor, budget: int = 8 * 2**20
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention contributions of one layer for some query rows.

    probs [H, R, S], value [H, S, dv], out_slices [H, D, dv], resid (x) [R, D], whole (y) [R, D].
    Returns (c [H, R, S], c_residual [R]), normalised so that for each row the sum over heads
    and keys plus the residual's share is 1. The per-key parts ``v_k^h W_O^h`` are formed a
    block of keys at a time, so the working set stays within ``budget`` bytes.
    """
    heads, rows, keys = probs.shape
    whole = whole.float()
    whole_norm = whole.abs().sum(-1)  # [R]
    parts = torch.empty(heads, rows, keys, device=probs.device)
    step = min(keys, max(1, budget // (4 * 3 * whole.shape[-1])))
    # Two [k, D] buffers reused for every block: the element-wise passes over them cost more than
    # the product itself on a CPU when each allocates (and faults in) fresh pages.
    per_key = torch.empty(step, whole.shape[-1], device=probs.device)
    scratch = torch.empty_like(per_key)
    for h in range(heads):
        out_h = out_slices[h].float().T  # [dv, D]
        for start in range(0, keys, step):
            block = slice(start, start + step)
            n = min(step, keys - start)
            torch.matmul(value[h, block].float(), out_h, out=per_key[:n])  # [k, D]: v_k^h W_O^h
            for r in range(rows):
                scaled = torch.mul(per_key[:n], probs[h, r, block, None], out=scratch[:n])
                distance = torch.sub(whole[r], scaled, out=scaled).abs_().sum(-1)
                parts[h, r, block] = (whole_norm[r] - distance).clamp(min=EPS)
    residual = (whole_norm - (whole - resid).abs().sum(-1)).clamp(min=EPS)
    total = parts.sum((0, 2)) + residual
    return parts / total[None, :, None], residual / total


def flowcut_score(call: AttentionCall, cls: int, patches: torch.Tensor) -> torch.Tensor:
    """FlowCut's per-patch score [N] for one tower layer (see the module docstring)."""
    relation = call.probs(torch.tensor([cls], device=call.query.device)).mean(0)[0]  # [S]
    value = call.value.float()
    semantic = torch.softmax(value[:, cls:cls + 1] @ value.transpose(-1, -2), dim=-1).mean(0)[0]  # [S]
    magnitude = value.mean(0).abs().sum(-1)  # L1 norm of the head-mean value vector
    relation, semantic, magnitude = relation[patches], semantic[patches], magnitude[patches]
    return (relation / relation.sum() + semantic / semantic.sum()) * magnitude


# --- probes -------------------------------------------------------------------------------------

@register_probe("flow")
class FlowProbe(Probe):
    signals = (
        SignalSpec("kobayashi", ("tower", "llm"), "query", "visual", "mean",
                   "attention x ||v W_O|| per head (Kobayashi et al. 2020)"),
        SignalSpec("contribution", ("tower", "llm"), "graph", "visual", "sum",
                   "share of the attention block's output each visual key makes up (transparency tool)"),
        SignalSpec("contribution_residual", ("tower", "llm"), "graph", "one", "none",
                   "share of the residual stream in the same normalisation"),
        SignalSpec("flowcut", ("tower",), "token", "visual", "none",
                   "FlowCut's [CLS]-relay score of each patch"),
    )
    needs = frozenset({"call", "hidden_in", "out_proj"})

    def observe(self, state: LayerCapture):
        if not state.recorded or state.call is None:
            return
        call = state.call
        visual = state.roles.visual.to(call.query.device)
        slices = head_slices(state.out_proj, call.heads) if state.out_proj is not None else None
        if "kobayashi" in self.wanted:
            for kind in state.rows:
                values, _ = visual_rows(state, kind, True, self.options.per_head, weighted=True)
                yield Observation("kobayashi", kind, values, self.options.per_head)
        if {"contribution", "contribution_residual"} & self.wanted:
            yield from self._contributions(state, slices, visual)
        if "flowcut" in self.wanted and state.stack == "tower" and state.roles.cls is not None:
            score = flowcut_score(call, state.roles.cls, visual)
            yield Observation("flowcut", "tokens", score[None])

    def _contributions(self, state: LayerCapture, slices: torch.Tensor, visual: torch.Tensor):
        call = state.call
        for kind in self.options.graph_rows:
            if kind not in ROW_KINDS or ROW_KINDS[kind].aggregate:
                continue
            rows = row_positions(kind, state.roles, state.stack)
            if rows is None or not len(rows):
                continue
            probs = call.probs(rows)  # [H, R, S]
            resid = state.hidden_in[rows.to(state.hidden_in.device)].float()
            context = torch.einsum("hrk,hkd->rhd", probs, call.value.float()).reshape(len(rows), -1)
            whole = resid + state.out_proj(context.to(state.out_proj.weight.dtype)).float()
            parts, residual = contributions(probs, call.value, slices, resid, whole, state.chunk_bytes)
            if "contribution" in self.wanted:
                yield Observation("contribution", kind, *self.reduce_heads("contribution", parts[..., visual]))
            if "contribution_residual" in self.wanted:
                yield Observation("contribution_residual", kind, residual[:, None])


@register_probe("rollout")
class RolloutProbe(Probe):
    signals = (
        SignalSpec("rollout", ("tower", "llm"), "query", "visual", "none",
                   "attention rollout from the stack's input, 0.5 A + 0.5 I (Abnar & Zuidema 2020)"),
    )
    needs = frozenset({"call"})
    all_layers = True

    def __init__(self, wanted, options):
        super().__init__(wanted, options)
        self.carried: dict[tuple[str, int], torch.Tensor] = {}

    def observe(self, state: LayerCapture):
        if state.call is None:
            return
        key = (state.stack, state.view)
        if key not in self.carried:
            visual = state.roles.visual
            start = torch.zeros(state.call.n_keys, len(visual), device=state.call.query.device)
            start[visual, torch.arange(len(visual))] = 1.0
            self.carried[key] = start
        carried = self.carried[key] = rollout_step(self.carried[key], state.full_pass.head_mean)
        if not state.recorded:
            return
        valid = state.roles.valid.to(carried.device)
        for kind, rows in state.rows.items():
            value = carried[valid].mean(0, keepdim=True) if ROW_KINDS[kind].aggregate else carried[rows]
            yield Observation("rollout", kind, value)
