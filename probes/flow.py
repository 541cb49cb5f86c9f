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
  parts (summed over heads unless per-head values are asked for) and the residual's share. Each
  ``||y - p||_1`` is taken in closed form where no part can outweigh y, so the per-dimension parts
  are formed only where one can (``contributions``).
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
from probes.capture import (ROW_KINDS, AttentionCall, LayerCapture, head_slices, output_row_norms,
                            projection_row_norms, row_positions)
from probes.registry import Observation, Probe, SignalSpec, register_probe

EPS = 1e-5  # the transparency tool's floor for a part's contribution


# --- pure maths ---------------------------------------------------------------------------------

def rollout_step(carried: torch.Tensor, head_mean: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """One rollout layer: ``((1 - residual) A + residual I) @ carried`` with ``carried`` [S, N]."""
    return (1 - residual) * (head_mean @ carried) + residual * carried


def contributions(probs: torch.Tensor, value: torch.Tensor, out_slices: torch.Tensor,
                  resid: torch.Tensor, whole: torch.Tensor, budget: int = 8 * 2**20,
                  row_norms: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention contributions of one layer for some query rows.

    probs [H, R, S], value [H, S, dv], out_slices [H, D, dv], resid (x) [R, D], whole (y) [R, D];
    ``row_norms``: ``capture.output_row_norms(out_slices)`` [H, D] when already at hand.
    Returns (c [H, R, S], c_residual [R]), normalised so that for each row the sum over heads
    and keys plus the residual's share is 1.

    The parts ``p = alpha_hk v_k^h W_O^h`` [D] are not all formed. With ``s = sign(y)`` (+1 where
    y is 0), ``|y_d| - |y_d - p_d| = s_d p_d`` wherever ``|p_d| <= |y_d|``, so
    ``||y||_1 - ||y - p||_1 = alpha_hk v_k^h (W_O^h^T s) - 2 sum_d max(0, s_d p_d - |y_d|)``: one
    product per head and row, plus a correction on the dimensions where a part can outweigh y.
    Cauchy-Schwarz bounds ``|p_d|`` by ``alpha_hk ||v_k^h|| ||W_O^h[d]||``, which finds them: few
    for all but the keys with the most attention. ``p_d`` is formed on those alone, keys taken
    in tiers (1, 3, 12, 48, ... keys) by falling bound, each tier on the dimensions its largest
    bound reaches, within ``budget`` bytes. Exact, and in float32 more accurate than subtracting
    ``||y - p||_1`` from ``||y||_1`` directly, which cancels to noise for the smallest parts.
    """
    heads, rows, keys = probs.shape
    dv = value.shape[-1]
    whole, probs = whole.float(), probs.float()
    size = whole.abs()  # [R, D]
    sign = torch.where(whole >= 0, 1.0, -1.0)
    norms = output_row_norms(out_slices) if row_norms is None else row_norms  # [H, D]
    # The linear part, W_O^h^T s per head (in head groups within the budget: for a half-precision
    # model each group is converted to float32 on its own).
    group = max(1, budget // (4 * out_slices.shape[1] * dv))
    toward = torch.cat([torch.einsum("hdv,rd->hrv", out_slices[h:h + group].float(), sign)
                        for h in range(0, heads, group)])  # [H, R, dv]
    parts = probs * torch.einsum("hkv,hrv->hrk", value.float(), toward)
    # The correction. A dimension can be outweighed only where |y_d| / ||W_O^h[d]|| (its reach)
    # is below the key's bound; rounding is covered by a margin (an extra dimension adds 0).
    bound, ranked = (probs * torch.linalg.vector_norm(value.float(), dim=-1)[:, None, :]).sort(-1, descending=True)
    bound.mul_(1.001)
    reach = torch.where(norms[:, None, :] > 0, size[None] / norms[:, None, :], torch.inf)  # [H, R, D]
    widest = int((reach < bound[..., :1]).sum(-1).max())
    if widest:
        alpha = probs.gather(-1, ranked)
        nearest = reach.topk(widest, dim=-1, largest=False).indices  # [H, R, m], by rising reach
        # Rows of (key or dimension) x head, so one index_select gathers them for every head.
        values = value.transpose(0, 1).reshape(keys * heads, dv)
        slices = out_slices.transpose(0, 1).reshape(-1, dv)
        head = torch.arange(heads, device=probs.device)[:, None, None]
        low = 0
        while low < keys:  # tiers of keys [0, 1), [1, 4), [4, 16), ...
            high = min(keys, max(1, 4 * low))
            dims = int((reach < bound[..., low:low + 1]).sum(-1).max())
            if dims == 0:
                break  # bounds only fall from here
            chosen = nearest[..., :dims]
            reached = size.expand(heads, -1, -1).gather(-1, chosen)[:, :, None]  # [H, R, 1, m]
            signs = sign.expand(heads, -1, -1).gather(-1, chosen)[:, :, None]
            # Heads in groups whose gathered W_O rows take at most half the budget, keys in
            # blocks whose [g, R, k, m] products take the rest.
            group = max(1, min(heads, budget // (2 * 4 * rows * dims * dv)))
            for h in range(0, heads, group):
                hs = slice(h, h + group)
                g = len(range(heads)[hs])
                rows_of = slices.index_select(0, (chosen[hs] * heads + head[hs]).flatten())
                w = rows_of.view(g, rows, dims, dv).float().transpose(-1, -2)  # [g, R, dv, m]
                step = max(1, budget // (2 * 4 * 3 * g * rows * dims))
                for first in range(low, high, step):
                    block = ranked[hs, :, first:min(high, first + step)]  # [g, R, k]
                    v = values.index_select(0, (block * heads + head[hs]).flatten()).view(*block.shape, dv)
                    part = v.float() @ w  # [g, R, k, m]: v_k^h W_O^h[d]
                    part.mul_(alpha[hs, :, first:first + block.shape[-1], None]).mul_(signs[hs])
                    excess = part.sub_(reached[hs]).clamp_(min=0).sum(-1)
                    parts[hs].scatter_add_(-1, block, excess.mul_(-2))
            low = high
    parts = parts.clamp(min=EPS)
    residual = (size.sum(-1) - (whole - resid.float()).abs().sum(-1)).clamp(min=EPS)
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
            parts, residual = contributions(probs, call.value, slices, resid, whole, state.chunk_bytes,
                                            projection_row_norms(state.out_proj, call.heads))
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
