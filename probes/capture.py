"""Shared capture machinery: what an attention call saw, which rows to score, and the masks.

Every probe that needs attention reads it from an ``AttentionCall``: the query, key and value
tensors exactly as the model hands them to its attention function (``attention_interface`` in
``transformers``), caught by the workbench's registered attention function (``probes/interception.py``;
``CallCollector`` below keeps them until the recorder reads them). At that point
RoPE / M-RoPE is already applied, so recomputing ``softmax(q k^T * scaling + mask)`` for a few
rows gives the model's own probabilities without eager attention and without
``output_attentions``. GQA key/value heads are repeated here the way ``repeat_kv`` does.

Only the rows asked for are computed (rows x all keys). When some signal needs every row anyway
(rollout, "mean" or "visual" rows), one chunked sweep per layer yields head-mean matrices [S, S]
that every head-mean signal reads; chunks are bounded by a byte budget, so no [heads, S, S] tensor
is ever held at once, and a causal call's chunks stop at the keys their last row sees (the
others' probabilities are exactly 0), which halves its sweep. A tower that attends block by block
(one call per image or window) is joined into one call with a block-diagonal mask.

Masks follow the semantics of ``transformers``' SDPA path: a boolean mask keeps ``True``, a float
mask is added to the logits, and with no mask the call is causal when the module says so and there
is more than one query (``is_causal`` with top-left alignment, as ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import bisect
import math
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Mapping, Sequence

import torch

STACKS = ("tower", "llm")  # in the order a VLM runs them
KEY_CATEGORIES = ("visual", "text", "system", "sink")  # columns of the attention-mass signals

DEFAULT_CHUNK_BYTES = 8 * 2**20  # working-set bound of one chunk of attention rows


class CaptureError(RuntimeError):
    """The model's attention call is of a kind the probes cannot reproduce."""


# --- the attention call ------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionCall:
    """One sequence (``view``) of one attention call: q/k/v as the attention function got them.

    ``query`` [H, Sq, d] with RoPE applied; ``key`` [H, Sk, d] and ``value`` [H, Sk, dv] with the
    GQA heads already repeated; ``mask`` additive float32 [1|H, Sq, Sk] (``-inf`` where masked) or
    None; ``causal`` applies when there is no mask. ``query_norope``/``key_norope``: the same
    before the rotary embedding (equal to ``query``/``key`` when the module applies none).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    mask: torch.Tensor | None = None
    causal: bool = False
    query_norope: torch.Tensor | None = None
    key_norope: torch.Tensor | None = None

    @property
    def heads(self) -> int:
        return self.query.shape[0]

    @property
    def n_queries(self) -> int:
        return self.query.shape[1]

    @property
    def n_keys(self) -> int:
        return self.key.shape[1]

    def part(self, span: slice) -> "AttentionCall":
        """The call on the positions ``span`` alone, queries and keys: a sample's rows of a padded
        batch (right-padded and causal, or left-padded under a mask that keeps each sample's rows to
        themselves), whose attention never reaches outside them."""
        def cut(t, axes):
            return None if t is None else t[(slice(None),) + (span,) * axes]
        return AttentionCall(cut(self.query, 1), cut(self.key, 1), cut(self.value, 1), self.scaling,
                             cut(self.mask, 2), self.causal, cut(self.query_norope, 1), cut(self.key_norope, 1))

    def logits(self, rows: torch.Tensor | slice, rope: bool = True, keys: int | None = None) -> torch.Tensor:
        """Masked, scaled logits [H, R, Sk] (float32) for query ``rows`` (positions, or a slice of
        them), computed like eager attention: the product in the model's dtype, then scaling,
        then the mask. ``keys``: the first ``keys`` keys only, where the others are masked for
        every one of these rows (``row_blocks``)."""
        q, k = (self.query, self.key) if rope else (self.query_norope, self.key_norope)
        if q is None or k is None:
            raise CaptureError("this call was captured without its pre-RoPE query and key")
        keys = self.n_keys if keys is None else keys
        if isinstance(rows, slice):  # a view of q, no gather; masking starts at the first row
            span = range(self.n_queries)[rows]
            first, positions = span.start, torch.arange(span.start, span.stop, device=q.device)
        else:
            rows = positions = rows.to(q.device)
            first = 0
        # In place on the fresh product: the same numbers as ``(q k^T * scaling).float() + mask``
        # without a [H, R, Sk] temporary per step (they dominate a sweep's time on a CPU).
        scores = torch.matmul(q[:, rows], k[:, :keys].transpose(-1, -2)).mul_(self.scaling).float()
        if self.mask is not None:
            mask = self.mask[:, rows if isinstance(rows, slice) else rows.to(self.mask.device), :keys]
            return scores.add_(mask)
        if self.causal:  # adding 0 or -inf is keeping or filling; no key before the first row is above a row
            above = torch.arange(first, keys, device=scores.device)[None, None, :] > positions[None, :, None]
            scores[..., first:].masked_fill_(above, -math.inf)
        return scores

    def probs(self, rows: torch.Tensor | slice, rope: bool = True, keys: int | None = None) -> torch.Tensor:
        """Attention probabilities [H, R, Sk] (float32) of query ``rows`` (``keys``: as ``logits``)."""
        probs = torch.softmax(self.logits(rows, rope, keys), dim=-1)
        # A fully masked row (a padding query) is all -inf: softmax gives NaN; it attends nowhere.
        # Only an explicit mask can mask a whole row (a causal row always sees its first key).
        return probs if self.mask is None else probs.nan_to_num_(0.0)

    def chunks(self, rows: torch.Tensor, budget: int = DEFAULT_CHUNK_BYTES,
               rope: bool = True) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(slice into rows, probs [H, r, Sk])`` over ``rows`` in chunks whose float32 working
        set (logits, probabilities, a temporary) stays within ``budget`` bytes."""
        per_row = 3 * 4 * self.heads * self.n_keys
        step = max(1, budget // per_row)
        for start in range(0, len(rows), step):
            part = slice(start, min(start + step, len(rows)))
            yield part, self.probs(rows[part], rope)

    def row_blocks(self, budget: int = DEFAULT_CHUNK_BYTES,
                   rope: bool = True) -> Iterator[tuple[slice, torch.Tensor]]:
        """Every query row, in blocks ``(rows, probs [H, r, n])`` with ``n`` the keys these rows
        can see: all of them, or for a causal call those up to the block's last row, the others
        being exactly 0 (so half of a causal sweep is neither computed nor held). Each block's
        float32 working set (logits, probabilities, a temporary) stays within ``budget`` bytes."""
        per_score = 3 * 4 * self.heads
        start = 0
        while start < self.n_queries:
            if self.causal:  # r rows from ``start`` see start + r keys: the largest r with r (start + r) fitting
                step = (math.isqrt(start * start + 4 * (budget // per_score)) - start) // 2
            else:
                step = budget // (per_score * self.n_keys)
            stop = min(self.n_queries, start + max(1, step))
            keys = min(self.n_keys, stop) if self.causal else self.n_keys
            yield slice(start, stop), self.probs(slice(start, stop), rope, keys)
            start = stop


def repeat_kv_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[Hkv, S, d] -> [Hkv * groups, S, d], each kv head repeated for its query heads (``repeat_kv``)."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=0)


def additive_mask(mask: torch.Tensor | None, view: int, n_keys: int) -> torch.Tensor | None:
    """The call's mask for batch row ``view`` as additive float32 [1|H, Sq, Sk]."""
    if mask is None:
        return None
    mask = mask[min(view, mask.shape[0] - 1)] if mask.dim() == 4 else mask
    if mask.dim() == 2:
        mask = mask[None]
    return as_additive(mask[..., :n_keys])


def as_additive(mask: torch.Tensor) -> torch.Tensor:
    """A mask as additive float32: a boolean one 0 where it lets a query see a key, ``-inf`` elsewhere."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=torch.float32, device=mask.device)
        return torch.where(mask, zero, torch.tensor(-math.inf, device=mask.device))
    return mask.float()


_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "sinks")


def attention_call(module: torch.nn.Module, calls: list[tuple[tuple, Mapping]], view: int = 0,
                   pre_rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> AttentionCall:
    """Build the ``AttentionCall`` of batch row ``view`` from the arguments of the layer's
    ``attention_interface(module, query, key, value, attention_mask, scaling=..., ...)`` calls.

    Several calls in one layer are consecutive blocks of one sequence (a vision tower that attends
    within each image or window, e.g. Qwen2-VL/2.5-VL): they are joined into one call whose mask
    keeps each block to itself, which is exactly the attention the blocks computed.
    """
    parts = [_call_parts(module, args, kwargs, view) for args, kwargs in calls]
    if len(parts) == 1:
        q, k, v, scaling, mask, causal, groups = parts[0]
    else:
        if any(p[4] is not None or p[5] for p in parts):
            raise CaptureError(f"{type(module).__name__}: block-wise attention calls with their own masks")
        q, k, v = (torch.cat([p[i] for p in parts], dim=1) for i in range(3))
        scaling, causal, groups = parts[0][3], False, parts[0][6]
        mask = torch.full((1, q.shape[1], k.shape[1]), -math.inf, device=q.device)
        start = 0
        for p in parts:
            n = p[0].shape[1]
            mask[0, start:start + n, start:start + n] = 0.0
            start += n
    if pre_rope is not None:
        q_pre = as_call_layout(pre_rope[0], _batched_shape(calls, 1, q.shape[1]))[view].detach()
        k_pre = as_call_layout(pre_rope[1], _batched_shape(calls, 2, k.shape[1]))[view].detach()
        k_pre = repeat_kv_heads(k_pre, groups)
    else:
        q_pre, k_pre = q, k
    return AttentionCall(query=q, key=k, value=v, scaling=scaling, mask=mask, causal=causal,
                         query_norope=q_pre, key_norope=k_pre)


def _batched_shape(calls, index: int, length: int) -> torch.Size:
    """The [B, H, S, d] shape the call's tensor ``index`` would have for the whole sequence."""
    shape = calls[0][0][index].shape
    return torch.Size((shape[0], shape[1], length, shape[3]))


def _batch_parts(module, args, kwargs):
    """(query, key, value [B, H|Hkv, S, d], mask, scaling, is_causal, GQA groups) of one call, its batch whole."""
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise CaptureError(f"{type(module).__name__} passes {name!r} to its attention; "
                               "the probes do not reproduce it")
    query, key, value = (args[i] for i in (1, 2, 3))
    mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
    groups = query.shape[1] // key.shape[1]
    scaling = kwargs.get("scaling")
    scaling = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    return query, key, value, mask, scaling, is_causal, groups


def _call_parts(module, args, kwargs, view):
    query, key, value, mask, scaling, is_causal, groups = _batch_parts(module, args, kwargs)
    q = query[view].detach()
    k = repeat_kv_heads(key[view].detach(), groups)
    v = repeat_kv_heads(value[view].detach(), groups)
    causal = mask is None and is_causal and q.shape[1] > 1
    return q, k, v, scaling, additive_mask(mask, view, k.shape[1]), causal, groups


def as_call_layout(states: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Bring a pre-RoPE tensor to the call's [B, H, S, d] layout: it is either already there, or
    [B, S, H, d], or unbatched [S, H, d] (vision towers that run on a flat patch sequence)."""
    if states.shape == shape:
        return states
    if states.dim() == 4 and states.transpose(1, 2).shape == shape:
        return states.transpose(1, 2)
    if states.dim() == 3 and states.transpose(0, 1).unsqueeze(0).shape == shape:
        return states.transpose(0, 1).unsqueeze(0)
    raise CaptureError(f"cannot match pre-RoPE states {tuple(states.shape)} to the call's {tuple(shape)}")


# --- which tokens are which ---------------------------------------------------------------------

@dataclass(frozen=True)
class TokenRoles:
    """Positions of one sequence by role. ``visual`` is in layout order (the order every visual
    key index of a recording refers to); ``system`` is every other non-text, non-padding token
    (BOS, chat-template prefix, image separators, a tower's [CLS])."""

    length: int
    visual: torch.Tensor
    text: torch.Tensor
    system: torch.Tensor
    valid: torch.Tensor  # bool [S]: not padding
    cls: int | None = None

    @staticmethod
    def for_llm(visual_positions, length: int, attention_mask: torch.Tensor | None = None) -> "TokenRoles":
        """Text = non-visual tokens after the last visual token (the question and the answer
        prompt); system = the rest that is not padding."""
        visual = torch.as_tensor(visual_positions, dtype=torch.long)
        valid = torch.ones(length, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
        is_visual = torch.zeros(length, dtype=torch.bool)
        is_visual[visual] = True
        after = torch.arange(length) > (visual.max() if len(visual) else -1)
        text = (~is_visual & after & valid).nonzero().flatten()
        system = (~is_visual & ~after & valid).nonzero().flatten()
        return TokenRoles(length, visual, text, system, valid)

    @staticmethod
    def for_tower(length: int, has_cls: bool) -> "TokenRoles":
        """A tower sequence: a [CLS] first when it has one, then its patches."""
        start = 1 if has_cls else 0
        return TokenRoles(
            length, torch.arange(start, length), torch.zeros(0, dtype=torch.long),
            torch.arange(start), torch.ones(length, dtype=torch.bool), 0 if has_cls else None,
        )

    def category(self, name: str, sinks: torch.Tensor) -> torch.Tensor:
        return {"visual": self.visual, "text": self.text, "system": self.system, "sink": sinks}[name]


@dataclass(frozen=True)
class RowKind:
    """A kind of query row: how to find its positions, and whether its rows are averaged."""

    name: str
    stacks: tuple[str, ...]
    aggregate: bool
    description: str


ROW_KINDS: dict[str, RowKind] = {
    kind.name: kind for kind in (
        RowKind("last", ("llm",), False, "the last token (the one that predicts the answer)"),
        RowKind("text", ("llm",), False, "every text token after the image"),
        RowKind("cls", ("tower",), False, "the vision tower's [CLS] token"),
        RowKind("visual", ("tower", "llm"), False, "the visual tokens themselves (visual->visual)"),
        RowKind("mean", ("tower", "llm"), True, "the mean over every non-padding query row"),
    )
}


def row_positions(kind: str, roles: TokenRoles, stack: str) -> torch.Tensor | None:
    """Query positions of row kind ``kind`` in a sequence, or None where it does not apply."""
    if kind not in ROW_KINDS:
        raise ValueError(f"unknown row kind {kind!r}; available: {', '.join(ROW_KINDS)}")
    if stack not in ROW_KINDS[kind].stacks:
        return None
    if kind == "last":
        return roles.valid.nonzero().flatten()[-1:]
    if kind == "text":
        return roles.text
    if kind == "cls":
        return None if roles.cls is None else torch.tensor([roles.cls])
    if kind == "visual":
        return roles.visual
    return roles.valid.nonzero().flatten()


# --- one layer, as the probes see it ------------------------------------------------------------

@dataclass(frozen=True)
class FullPass:
    """Aggregates of every query row of a layer, from one chunked sweep.

    ``head_mean`` [Sq, Sk]: head-mean attention (the only kind of full matrix ever held);
    ``weighted`` [Sq, Sk] or None: head mean of ``alpha_hik * w_hk`` for the layer's key weights
    (``LayerCapture.value_norms``: Kobayashi's norms), on the rows of the layer's non-aggregate row
    kinds (the only ones read; the others are 0); ``received`` [H, Sk]: per-head attention each
    key receives, averaged over non-padding rows.
    """

    head_mean: torch.Tensor
    received: torch.Tensor
    weighted: torch.Tensor | None = None


def value_output_norms(value: torch.Tensor, out_slices: torch.Tensor | None,
                       gram: torch.Tensor | None = None) -> torch.Tensor:
    """||v_k^h W_O^h||_2 for every head and key: value [H, S, dv], out_slices [H, D, dv] -> [H, S].

    From the per-head Gram matrix ``W_O^h^T W_O^h`` [dv, dv] (``gram``, when already at hand), so no
    [S, D] product is formed."""
    gram = output_grams(out_slices) if gram is None else gram
    squared = ((value.float() @ gram) * value.float()).sum(-1)
    return squared.clamp(min=0).sqrt()


def output_grams(out_slices: torch.Tensor) -> torch.Tensor:
    """``W_O^h^T W_O^h`` [H, dv, dv] of the per-head slices [H, D, dv] of an output projection."""
    return torch.einsum("hda,hdb->hab", out_slices.float(), out_slices.float())


def output_row_norms(out_slices: torch.Tensor) -> torch.Tensor:
    """``||W_O^h[d, :]||_2`` [H, D]: the norm of each output dimension's row of each head's slice."""
    return torch.linalg.vector_norm(out_slices.float(), dim=-1)


_PER_WEIGHT: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, tuple[tuple, torch.Tensor]]]" = \
    weakref.WeakKeyDictionary()


def _per_weight(out_proj: torch.nn.Linear, heads: int, compute) -> torch.Tensor:
    """``compute(head_slices(out_proj, heads))``, kept per module while its weight is unchanged: it
    depends on the weights alone, so a model recorded on many samples computes it once."""
    weight = out_proj.weight
    version = (weight.data_ptr(), weight._version, weight.dtype, weight.device, heads)
    kept = _PER_WEIGHT.setdefault(out_proj, {})
    cached = kept.get(compute.__name__)
    if cached is None or cached[0] != version:
        with torch.no_grad():
            cached = kept[compute.__name__] = (version, compute(head_slices(out_proj, heads)))
    return cached[1]


def projection_grams(out_proj: torch.nn.Linear, heads: int) -> torch.Tensor:
    """``output_grams`` of ``out_proj`` (D x dv^2 per head, a few percent of a layer's FLOPs at 7B
    scale), computed once per weight."""
    return _per_weight(out_proj, heads, output_grams)


def projection_row_norms(out_proj: torch.nn.Linear, heads: int) -> torch.Tensor:
    """``output_row_norms`` of ``out_proj``, computed once per weight."""
    return _per_weight(out_proj, heads, output_row_norms)


@dataclass(frozen=True)
class LayerCapture:
    """Everything captured at one layer for one sequence of one stack.

    ``hidden_in``/``hidden_out`` [S, D]: the residual stream entering / leaving the layer.
    ``rows``: the requested row kinds that apply here, with their positions.
    ``sinks``: sink tokens of the residual stream entering the layer (massive activations).
    ``recorded``: False on layers visited only to carry state (rollout) to a later recorded layer.
    ``sweep``: some signal needs every query row anyway (rollout, "mean" or "visual" rows), so
    head-mean rows are read from that one sweep instead of being computed again.
    ``weighted``: that sweep also accumulates the Kobayashi-weighted head mean.
    """

    stack: str
    layer: int
    view: int
    roles: TokenRoles
    rows: Mapping[str, torch.Tensor]
    call: AttentionCall | None = None
    hidden_in: torch.Tensor | None = None
    hidden_out: torch.Tensor | None = None
    out_proj: torch.nn.Module | None = None
    final_norm: torch.nn.Module | None = None  # the decoder's last norm (llm stack), for normed states
    sinks: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    sink_dims: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    massive: object | None = None  # ``probes.sinks.Massive`` of ``hidden_in`` when the sinks were found from it
    recorded: bool = True
    sweep: bool = False
    weighted: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @cached_property
    def full_pass(self) -> FullPass:
        return self._sweep(rope=True)

    @cached_property
    def full_pass_norope(self) -> FullPass:
        return self._sweep(rope=False)

    def passes(self, rope: bool) -> FullPass:
        return self.full_pass if rope else self.full_pass_norope

    @cached_property
    def value_norms(self) -> torch.Tensor:
        """||v_k^h W_O^h|| for every head and key, [H, Sk]."""
        return value_output_norms(self.call.value, None, projection_grams(self.out_proj, self.call.heads))

    @cached_property
    def categories(self) -> torch.Tensor:
        """[Sk, 4] indicator of each key's categories (``KEY_CATEGORIES``), for masses as a matmul."""
        out = torch.zeros(self.call.n_keys, len(KEY_CATEGORIES), device=self.call.query.device)
        for column, name in enumerate(KEY_CATEGORIES):
            out[self.roles.category(name, self.sinks).to(out.device), column] = 1.0
        return out

    def _sweep(self, rope: bool) -> FullPass:
        call = self.call
        device = call.query.device
        valid = self.roles.valid.to(device)
        every_row_valid = bool(valid.all())
        weights = self.value_norms if self.weighted and rope else None
        head_mean = torch.zeros(call.n_queries, call.n_keys, device=device)  # keys a row cannot see stay 0
        weighted = torch.zeros_like(head_mean) if weights is not None else None
        received = torch.zeros(call.heads, call.n_keys, device=device)
        # Weighted rows are read for the row kinds asked for alone ("mean" reads ``received``).
        asked = sorted(set().union(*(self.rows[kind].tolist() for kind in self.rows if not ROW_KINDS[kind].aggregate)))
        for part, probs in call.row_blocks(self.chunk_bytes, rope):
            seen = probs.shape[-1]
            head_mean[part, :seen] = probs.mean(0)
            received[:, :seen] += probs.sum(1) if every_row_valid else (probs * valid[part][None, :, None]).sum(1)
            here = asked[bisect.bisect_left(asked, part.start):bisect.bisect_left(asked, part.stop)]
            if weights is not None and here:
                picked = torch.tensor(here, device=device)
                weighted[picked, :seen] = (probs[:, picked - part.start] * weights[:, None, :seen]).mean(0)
        return FullPass(head_mean, received / valid.sum().clamp(min=1), weighted)


def output_projection(attention: torch.nn.Module) -> torch.nn.Linear:
    """The attention module's output projection (heads -> hidden); the name differs by family."""
    for name in ("o_proj", "out_proj", "proj", "dense", "c_proj"):
        module = getattr(attention, name, None)
        if isinstance(module, torch.nn.Linear):
            return module
    raise CaptureError(f"no output projection found in {type(attention).__name__}")


def head_slices(out_proj: torch.nn.Linear, heads: int) -> torch.Tensor:
    """The output projection's weight split by head: [H, D_out, dv] (W_O^h acts on head h's slice)."""
    weight = out_proj.weight
    return weight.reshape(weight.shape[0], heads, -1).permute(1, 0, 2)


# --- what a layer's attention calls were, as the workbench's attention function saw them ---------

@dataclass(frozen=True)
class SiteReading:
    """One attention module's calls in one forward: their (args, kwargs) in the
    ``attention_interface(module, query, key, value, attention_mask, **kwargs)`` form, the pre-RoPE
    (q, k) or None, and the calls' (output, weights) when they were kept."""

    module: torch.nn.Module
    calls: list
    pre_rope: tuple | None = None
    outputs: list = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.calls[0][0][1].shape[0]

    def call(self, view: int = 0) -> AttentionCall:
        return attention_call(self.module, self.calls, view, self.pre_rope)

    def row_probs(self, views: Sequence[int], rows: Sequence[int]) -> torch.Tensor:
        """Attention probabilities [n, H, Sk] (float32) of query row ``rows[i]`` of batch row
        ``views[i]``, for every i in one product: row i is ``call(views[i]).probs(rows[i:i + 1])[:, 0]``
        up to float rounding: in one product for a single call with a 4-D mask or none (a decoder
        layer's under SDPA or eager attention), else row by row."""
        args, kwargs = self.calls[0]
        query, key, _, mask, scaling, is_causal, groups = _batch_parts(self.module, args, kwargs)
        if len(self.calls) != 1 or (mask is not None and mask.dim() != 4):
            return torch.stack([self.call(int(view)).probs(torch.tensor([int(row)]))[:, 0]
                                for view, row in zip(views, rows)])
        views = torch.as_tensor(views, dtype=torch.long).to(query.device)
        rows = torch.as_tensor(rows, dtype=torch.long).to(query.device)
        keys = key.detach().index_select(0, views).repeat_interleave(groups, dim=1)  # [n, H, Sk, d]
        picked = query.detach()[views, :, rows].unsqueeze(2)  # [n, H, 1, d]
        scores = torch.matmul(picked, keys.transpose(-1, -2))[:, :, 0].mul_(scaling).float()
        if mask is not None:
            batch_rows = (views if mask.shape[0] > 1 else torch.zeros_like(views)).to(mask.device)
            rows_mask = as_additive(mask[batch_rows, :, rows.to(mask.device), :keys.shape[2]])  # [n, 1|H, Sk]
            return torch.softmax(scores.add_(rows_mask.to(scores.device)), -1).nan_to_num_(0.0)
        if is_causal and query.shape[2] > 1:
            above = torch.arange(keys.shape[2], device=scores.device)[None, None, :] > rows[:, None, None]
            scores.masked_fill_(above, -math.inf)
        return torch.softmax(scores, -1)


class CallCollector:
    """An ``AttentionListener`` (``probes/interception.py``) that keeps the calls of chosen
    attention modules until they are taken, and their outputs when ``outputs`` is set (they stay
    in the autograd graph, for gradients with respect to them)."""

    def __init__(self, modules, outputs: bool = False):
        self.watched = {id(m) for m in modules}
        self.keep_outputs = outputs
        self.calls: dict[int, list] = {}
        self.outputs: dict[int, list] = {}

    def called(self, module, query, key, value, attention_mask, kwargs) -> None:
        if id(module) in self.watched:
            self.calls.setdefault(id(module), []).append(((module, query, key, value, attention_mask), dict(kwargs)))

    def returned(self, module, output, weights) -> None:
        if self.keep_outputs and id(module) in self.watched:
            self.outputs.setdefault(id(module), []).append((output, weights))

    def take(self, module: torch.nn.Module, pre_rope: tuple | None = None) -> SiteReading:
        """The calls ``module`` made since the last ``take`` (several for a tower that attends block
        by block), and let them go."""
        calls = self.calls.pop(id(module), None)
        if not calls:
            raise CaptureError(f"{type(module).__name__} made no attention call through the workbench's "
                               "attention function (was the model loaded through an adapter?)")
        return SiteReading(module, calls, pre_rope, self.outputs.pop(id(module), []))
