"""``record(adapter, prepared, request) -> Recording``: one traced forward, probes attached.

The model runs once, with its own attention kernel (SDPA as loaded), under nnsight
(``NNsight(model).trace``) with the recording session as the attention listener
(``probes/interception.py``). For each visited layer, in execution order, the trace reads the
layer's input hidden state and the outputs of the projections that make its query and key before
the rotary embedding (when pre-RoPE q/k are needed; ``ModelAdapter.rope_free_qk``), both as
nnsight module inputs and outputs; the listener then runs the probes that read the attention call
while the model waits at it, and the trace runs the probes of the layer's output once it exists.
Nothing per layer outlives its layer but what is recorded. Saliency signals then run their own
passes (``probes/saliency.py``).

Several samples whose image tensors stack (``views_key``: one image, or its tiles and crops, of
the same shape) are recorded in one traced forward (``recording_groups``, ``record_together``):
their tower views side by side, sample after sample, and in the decoder one row of the batch each,
padded on the right, so each sample's rows come first and its causal attention never reaches the
padding. The probes see each sample's rows alone, cut to its length, and write to its own recording.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import nnsight
import polars as pl
import torch
from transformers import BatchFeature

from probes import saliency
from probes.keywords import TEXT_RULES, text_embeddings
from probes.projected import PROJECTED_PATCHES, projected_patches
from probes.capture import (ROW_KINDS, STACKS, CaptureError, LayerCapture, SiteReading, TokenRoles,
                            output_projection, row_positions)
from probes.interception import listening
from probes.registry import PROBES, Observation, TableRows, probes_for, signal_spec
from probes.sinks import massive_activations
from workbench.memory import DEFAULT_LIMIT, check_memory
from workbench.models.base import ModelAdapter, PreparedInput, RopeFreeQK, stacked_inputs, tower_rows, views_key
from workbench.recording import CaptureRequest, EntryKey, Identity, Recording

_TRACED: "weakref.WeakKeyDictionary[torch.nn.Module, nnsight.NNsight]" = weakref.WeakKeyDictionary()


def traced(module: torch.nn.Module) -> nnsight.NNsight:
    """The nnsight wrapper of ``module``, built once (building it instruments the modules)."""
    if module not in _TRACED:
        _TRACED[module] = nnsight.NNsight(module)
    return _TRACED[module]


_PATHS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, str]]" = weakref.WeakKeyDictionary()


def envoys_of(root: nnsight.NNsight, model: torch.nn.Module, modules) -> list:
    """The nnsight envoys of ``modules`` (submodules of ``model``) in its wrapper ``root``."""
    if model not in _PATHS:  # walking every module of a large model on each recording adds up
        _PATHS[model] = {id(m): name for name, m in model.named_modules()}
    paths = _PATHS[model]
    return [root.get(paths[id(m)]) if paths[id(m)] else root for m in modules]


def _first(value):
    """A layer's hidden state from its (args, kwargs) inputs or its output (tensor or tuple)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
        args, kwargs = value
        return args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
    return value[0] if isinstance(value, (tuple, list)) else value


def resolve_layers(asked: tuple[int, ...] | None, count: int, stack: str) -> tuple[int, ...]:
    if asked is None:
        return tuple(range(count))
    out = []
    for layer in asked:
        if not -count <= layer < count:
            raise ValueError(f"{stack} layer {layer} is out of range: the model has {count} {stack} layers")
        out.append(layer % count)
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class StackPlan:
    stack: str
    layers: tuple  # the layer modules
    attention: tuple  # their attention modules
    visit: tuple[int, ...]
    recorded: frozenset[int]


def plan_stacks(adapter: ModelAdapter, request: CaptureRequest, all_layers: bool) -> list[StackPlan]:
    plans = []
    for stack in STACKS:
        if stack not in request.stacks:
            continue
        layers = tuple(adapter.vision_layers() if stack == "tower" else adapter.decoder_layers())
        attention = tuple((adapter.vision_attention if stack == "tower" else adapter.decoder_attention)(i)
                          for i in range(len(layers)))
        recorded = resolve_layers(request.layers_of(stack), len(layers), stack)
        visit = tuple(range(max(recorded) + 1)) if all_layers and recorded else recorded
        plans.append(StackPlan(stack, layers, attention, visit, frozenset(recorded)))
    return plans


class UnstackedBatch(CaptureError):
    """The model did not run samples recorded together as their inputs say (the tower's batch is not
    their views side by side): they are to be recorded one at a time."""


class _Builder:
    """Collects observations and table rows as the probes emit them."""

    def __init__(self):
        self.tensors: dict[EntryKey, torch.Tensor] = {}
        self.per_head: set[EntryKey] = set()
        self.tables: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        self.schemas: dict[str, dict] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self.notes: list[str] = []

    def add(self, item, stack: str, layer: int, view: int) -> None:
        if isinstance(item, Observation):
            key = EntryKey(item.signal, stack, layer, item.rows, view)
            self.tensors[key] = item.value.detach().float().cpu().contiguous()
            if item.per_head:
                self.per_head.add(key)
        elif isinstance(item, TableRows):
            table = self.tables[item.table]
            self.schemas[item.table] = {"stack": pl.String, "layer": pl.Int64, "view": pl.Int64, **(item.schema or {})}
            n = len(next(iter(item.columns.values()), []))
            for column, values in {"stack": [stack] * n, "layer": [layer] * n, "view": [view] * n,
                                   **item.columns}.items():
                table[column].extend(values)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def frames(self) -> dict[str, pl.DataFrame]:
        return {name: pl.DataFrame(dict(columns), schema_overrides=self.schemas.get(name))
                for name, columns in self.tables.items()}


@dataclass
class _Pending:
    """A layer being visited: what its attention call's probes read, gathered as the trace reaches it."""

    plan: StackPlan
    layer: int
    hidden_in: torch.Tensor | None = None
    pre_rope: tuple | None = None
    calls: list = field(default_factory=list)  # the blocks of a tower that attends block by block
    observed: bool = False


def _blockwise(module: torch.nn.Module) -> bool:
    """Whether the attention module attends block by block (one call per ``cu_seqlens`` segment)."""
    return "cu_seqlens" in inspect.signature(type(module).forward).parameters


class _Session:
    """State of one record() call inside the trace: probes, sink dimensions, token roles. It is
    also the attention listener of the traced forward (``called``)."""

    def __init__(self, adapter: ModelAdapter, samples: Sequence[PreparedInput], request: CaptureRequest,
                 builders: Sequence[_Builder]):
        self.adapter, self.samples, self.request, self.builders = adapter, list(samples), request, list(builders)
        # Several samples ride the batch axis, right-padded in the decoder (``stacked_inputs``): a
        # sample's rows are its first ones, so its causal attention never reaches the padding; in
        # the tower their views sit side by side, sample after sample.
        self.batched = len(self.samples) > 1
        self.lengths = [sample.inputs["input_ids"].shape[1] for sample in self.samples]
        self.views, self.spans = 1, None
        if self.batched:
            self.views, patches = tower_rows(self.samples[0].inputs)
            if patches is not None:  # one tower sequence: each sample's patches after the previous one's
                counts = [tower_rows(sample.inputs)[1] for sample in self.samples]
                ends = list(itertools.accumulate(counts))
                self.spans = [slice(end - count, end) for end, count in zip(ends, counts)]
        options = request.probe_options()
        single = [s for s in request.signals if not signal_spec(s).extra_pass]
        self.probes = [PROBES[name](wanted, options) for name, wanted in probes_for(single).items()]
        self.captures = frozenset().union(*(p.captures() for p in self.probes)) if self.probes else frozenset()
        self.at_output = [p for p in self.probes if "hidden_out" in p.captures()]
        self.at_call = [p for p in self.probes if "hidden_out" not in p.captures()]
        self.needs_sinks = bool({"attention_mass", "sink_share", "visual_sink_score"} & set(single))
        # Every query row is swept anyway for these; head-mean rows are then read from that sweep.
        self.sweep = bool({"rollout", "sink_share"} & set(single) or {"mean", "visual"} & set(request.rows))
        self.weighted = "kobayashi" in single and self.sweep and not request.per_head
        self.sink_dims: dict[tuple[str, int], torch.Tensor] = {}
        self.pending: dict[int, _Pending] = {}  # attention module -> the layer being visited

    def roles(self, stack: str, length: int, sample: int) -> TokenRoles:
        if stack == "llm":
            prepared = self.samples[sample]
            mask = prepared.inputs.get("attention_mask")
            return TokenRoles.for_llm(prepared.layout.positions, length, None if mask is None else mask[0])
        return TokenRoles.for_tower(length, self.adapter.has_cls_token)

    def parts(self, stack: str, batch: int, length: int) -> list[tuple[int, int, int, slice | None]]:
        """(batch row, sample, view, its rows there or None for all) of every sequence in ``stack``'s
        batch of ``batch`` rows of ``length``: one sample's own tower views; or the samples' decoder
        rows (each its first rows), tower views (each sample's in turn) or tower patches (each
        sample's span of the one sequence)."""
        if not self.batched:
            return [(index, 0, index, None) for index in range(batch)]
        if stack == "llm":
            holds = batch == len(self.samples)
            parts = [(b, b, 0, slice(0, n)) for b, n in enumerate(self.lengths)]
        elif self.spans is not None:
            holds = batch == 1 and length == self.spans[-1].stop
            parts = [(0, b, 0, span) for b, span in enumerate(self.spans)]
        else:
            holds = batch == len(self.samples) * self.views
            parts = [(index, *divmod(index, self.views), None) for index in range(batch)]
        if not holds:
            raise UnstackedBatch(f"the {stack}'s batch does not hold the {len(self.samples)} samples stacked "
                                 f"together as their inputs say ({batch} sequences of {length})")
        return parts

    def visit(self, plan: StackPlan, layer: int, envoys: dict) -> None:
        """Read one layer inside the trace, in execution order, and run the probes on it.

        What the layer's attention call needs (its input, the pre-RoPE q/k) is left for the
        listener (``called``), which runs the probes that read only the call while the model waits
        at it, so q/k/v are let go before the MLP, where a forward's memory peaks. A tower that
        attends block by block is read once its layer has run, all blocks joined.
        """
        layer_envoy = envoys["layer"][layer]
        module = plan.attention[layer]
        pending = self.pending[id(module)] = _Pending(plan, layer)
        if "hidden_in" in self.captures or self.needs_sinks:
            pending.hidden_in = _first(layer_envoy.inputs)
        rope_free = envoys["rope_free"][layer]
        if "norope" in self.captures and rope_free is not None:
            pending.pre_rope = rope_free.qk.split([envoy.output for envoy in rope_free.envoys])
        hidden_out = _first(layer_envoy.output)  # the layer has run: every call of it has been seen
        del self.pending[id(module)]
        if not pending.observed:
            if not pending.calls:
                raise CaptureError(f"{type(module).__name__} made no attention call through the workbench's "
                                   "attention function (was the model loaded through an adapter?)")
            self.at_attention(pending, SiteReading(module, pending.calls, pending.pre_rope))
        if self.at_output:
            self.observe(plan, layer, self.at_output, pending.hidden_in, hidden_out=hidden_out)

    # --- the attention listener ---------------------------------------------------------------------
    def called(self, module, query, key, value, attention_mask, kwargs) -> None:
        pending = self.pending.get(id(module))
        if pending is None:
            return
        call = ((module, query, key, value, attention_mask), dict(kwargs))
        if _blockwise(module):
            pending.calls.append(call)
        else:
            self.at_attention(pending, SiteReading(module, [call], pending.pre_rope))

    def returned(self, module, output, weights) -> None:
        pass

    def at_attention(self, pending: "_Pending", reading: SiteReading) -> None:
        pending.observed = True
        if self.at_call:
            self.observe(pending.plan, pending.layer, self.at_call, pending.hidden_in, reading=reading)
        # Let go before the MLP, where a forward's memory peaks: the pre-RoPE q/k and, unless a
        # probe of the layer's output reads it, the layer's input.
        pending.pre_rope = None
        if not self.at_output:
            pending.hidden_in = None

    def observe(self, plan: StackPlan, layer: int, probes: list, hidden_in, reading=None, hidden_out=None) -> None:
        if reading is not None:
            # query [B, H, S, d] of each call (several: the blocks of one sequence)
            batch, length = reading.batch, sum(args[1].shape[2] for args, _ in reading.calls)
        else:
            hidden = hidden_in if hidden_in is not None else hidden_out
            batch = hidden.shape[0] if hidden.dim() == 3 else 1
            length = hidden.shape[-2]
        out_proj = output_projection(plan.attention[layer]) if "out_proj" in self.captures else None
        final_norm = self.adapter.final_norm() if "final_norm" in self.captures and plan.stack == "llm" else None
        for key, (index, sample, view, span) in enumerate(self.parts(plan.stack, batch, length)):
            builder = self.builders[sample]
            call = reading.call(index) if reading is not None else None
            h_in = _view(hidden_in, index, span)
            h_out = _view(hidden_out, index, span)
            if call is not None and span is not None:
                call = call.part(span)
            length = call.n_queries if call is not None else h_in.shape[0]
            roles = self.roles(plan.stack, length, sample)
            rows = {}
            for kind in self.request.rows:
                positions = row_positions(kind, roles, plan.stack)
                if positions is None or not len(positions):
                    if plan.stack in ROW_KINDS[kind].stacks:
                        builder.note(f"no {kind!r} rows in the {plan.stack}: skipped")
                    continue
                rows[kind] = positions
                builder.rows[f"{plan.stack}/{kind}/{view}"] = positions
            # Sinks belong to the attention phase; the output phase has no use for them. Probes
            # carrying state from layer to layer key it by ``key``, one per (sample, view).
            sinks = self.sinks(plan.stack, key, h_in, roles) if hidden_out is None else {}
            state = LayerCapture(plan.stack, layer, key, roles, rows, call, h_in, h_out, out_proj, final_norm, **sinks,
                               recorded=layer in plan.recorded, sweep=self.sweep, weighted=self.weighted)
            for probe in probes:
                for item in probe.observe(state):
                    signal = item.signal if isinstance(item, Observation) else item.table
                    if plan.stack in signal_spec(signal).stacks:
                        builder.add(item, plan.stack, layer, view)

    def sinks(self, stack: str, view: int, hidden: torch.Tensor | None, roles: TokenRoles) -> dict:
        """Sink tokens of the residual stream entering the layer, and the stack's sink dimensions
        so far (this layer's and every earlier one's), as ``LayerCapture`` fields."""
        if not self.needs_sinks or hidden is None:
            return {}
        found = massive_activations(hidden, self.request.sink_ratio, self.request.sink_floor, roles.valid)
        key = (stack, view)
        dims = torch.unique(torch.cat([self.sink_dims.get(key, torch.zeros(0, dtype=torch.long)), found.dimensions]))
        self.sink_dims[key] = dims
        return {"sinks": found.tokens, "sink_dims": dims, "massive": found}


def _view(hidden, index: int, rows: slice | None = None):
    """Batch row ``index`` of a layer's hidden state, only ``rows`` of it when given."""
    if hidden is None:
        return None
    hidden = hidden[index] if hidden.dim() == 3 else hidden
    return hidden if rows is None else hidden[rows]


@dataclass(frozen=True)
class _RopeFreeEnvoys:
    qk: RopeFreeQK
    envoys: list


def _envoys(root: nnsight.NNsight, adapter: ModelAdapter, plan: StackPlan) -> dict:
    model = adapter.model
    rope_free = {}
    for layer in plan.visit:
        qk = adapter.rope_free_qk(plan.stack, layer)
        rope_free[layer] = None if qk is None else _RopeFreeEnvoys(qk, envoys_of(root, model, qk.modules))
    layers = envoys_of(root, model, [plan.layers[i] for i in plan.visit])
    return {"layer": dict(zip(plan.visit, layers)), "rope_free": rope_free}


_WHOLE_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("whole_forward", default=False)


@contextlib.contextmanager
def whole_forward():
    """Recordings inside it run the model's forward to its end instead of stopping after the last
    layer they read: the layers past it are then the unpruned prefill's (``recorded_prefill``)."""
    token = _WHOLE_FORWARD.set(True)
    try:
        yield
    finally:
        _WHOLE_FORWARD.reset(token)


def record(adapter: ModelAdapter, prepared: PreparedInput, request: CaptureRequest = CaptureRequest(), *,
           sample_id: str = "", question: str = "", answer: str | None = None,
           memory_limit: int | None = DEFAULT_LIMIT) -> Recording:
    """Record ``request`` for one prepared sample: one traced forward, then any saliency passes.

    ``answer``: the answer the saliency signals score (default: the model's greedy answer).
    ``memory_limit``: bytes; the request is refused beforehand if its estimate is above it.
    """
    if memory_limit is not None:
        check_memory(adapter, prepared, request, memory_limit)
    return _record(adapter, [prepared], prepared.inputs, request, [(sample_id, question, answer)])[0]


def record_together(adapter: ModelAdapter, prepared: Sequence[PreparedInput], inputs: BatchFeature,
                    request: CaptureRequest = CaptureRequest()) -> list[Recording]:
    """``record`` of a group from ``recording_groups`` in one traced forward on ``batch_inputs``:
    each recording equals the sample's own up to float rounding."""
    return _record(adapter, list(prepared), inputs, request, [("", "", None)] * len(prepared))


def batch_inputs(adapter: ModelAdapter, prepared: Sequence[PreparedInput]) -> BatchFeature:
    """What a group's recording forward runs on: a sample's own inputs, or the group's stacked
    right-padded (``stacked_inputs``), each sample's rows first."""
    if len(prepared) == 1:
        return prepared[0].inputs
    return stacked_inputs([item.inputs for item in prepared], adapter.tokenizer.pad_token_id, "right")


def recording_groups(adapter: ModelAdapter, prepared: Sequence[PreparedInput], request: CaptureRequest,
                     limit: int | None = DEFAULT_LIMIT) -> list[list[int]]:
    """Indices of ``prepared`` recorded together (``record_together``): samples whose inputs stack
    (``views_key``), while their memory estimates add up within
    ``limit``; each must fit alone (``check_memory`` raises otherwise)."""
    groups: list[list[int]] = []
    filling: dict[tuple, list] = {}  # stack key -> [the group being filled, its estimate so far]
    for i, item in enumerate(prepared):
        size = check_memory(adapter, item, request, limit).total if limit is not None else 0
        key = views_key(item.inputs)
        current = filling.get(key) if key is not None else None
        if current is None or (limit is not None and current[1] + size > limit):
            current = [[], 0]
            groups.append(current[0])
            if key is not None:
                filling[key] = current
        current[0].append(i)
        current[1] += size
    return groups


def _record(adapter: ModelAdapter, prepared: list[PreparedInput], inputs, request: CaptureRequest,
            identities: list[tuple[str, str, str | None]]) -> list[Recording]:
    """One traced forward of ``inputs`` (``prepared``'s own, or several stacked), then each
    sample's saliency passes."""
    builders = [_Builder() for _ in prepared]
    session = _Session(adapter, prepared, request, builders)
    all_layers = any(type(p).all_layers for p in session.probes)
    plans = plan_stacks(adapter, request, all_layers)
    if session.probes and plans:
        root = traced(adapter.model)
        envoys = {plan.stack: _envoys(root, adapter, plan) for plan in plans}
        whole = _WHOLE_FORWARD.get()
        extra = {"logits_to_keep": 1} if whole else {}  # the head's output is never read
        # The tower's views are read one by one where its stack is recorded; else they may share a pass.
        views = contextlib.nullcontext() if any(plan.stack == "tower" for plan in plans) else adapter.distinct_views()
        with torch.no_grad(), views, listening(session), root.trace(**inputs, use_cache=False, **extra) as tracer:
            for plan in plans:
                for layer in plan.visit:
                    session.visit(plan, layer, envoys[plan.stack])
            if not whole:
                tracer.stop()  # nothing past the last visited layer is read: the rest of the forward is skipped
    out = []
    for item, builder, (sample_id, question, answer) in zip(prepared, builders, identities):
        for signal in TEXT_RULES:  # built from the question text, not read from a layer
            if signal in request.signals and "llm" in request.stacks:
                builder.add(Observation(signal, "tokens", text_embeddings(adapter, signal, item.question)), "llm", 0, 0)
        if PROJECTED_PATCHES in request.signals and "tower" in request.stacks:  # from the cached tower pass
            for view, rows in enumerate(projected_patches(adapter, item)):
                builder.add(Observation(PROJECTED_PATCHES, "tokens", rows), "tower", adapter.projector_feed_tower_layer, view)
        answer_text = _saliency(adapter, item, request, builder, plans, answer)
        # the question the sample was prepared with unless told otherwise: a method may read it (CDPruner's CLIP side)
        identity = Identity(adapter.name, sample_id, question or item.question, item.prompt, answer_text,
                            adapter.fingerprint)
        out.append(Recording(identity, request, item.layout, dict(builder.tensors), frozenset(builder.per_head),
                             builder.frames(), dict(builder.rows), tuple(builder.notes)))
    return out


# --- saliency passes ----------------------------------------------------------------------------

def answer_ids(adapter: ModelAdapter, prepared: PreparedInput, request: CaptureRequest,
               answer: str | None) -> torch.Tensor:
    """Token ids of the answer to score: ``answer`` tokenised, or the model's greedy answer."""
    tokenizer = adapter.tokenizer
    if answer is not None:
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("the answer to score is empty")
        return torch.tensor(ids)
    with torch.no_grad():
        out = adapter.model.generate(**prepared.inputs, max_new_tokens=request.max_answer_tokens, do_sample=False)
    stop = set(adapter._eos_ids()) | {tokenizer.pad_token_id}
    ids = []
    for token in out[0, prepared.inputs["input_ids"].shape[1]:].tolist():
        if token in stop:
            break
        ids.append(token)
    return torch.tensor(ids or adapter._eos_ids()[:1])


def _saliency(adapter, prepared, request, builder: _Builder, plans, answer: str | None) -> str | None:
    wanted = [s for s in request.signals if signal_spec(s).extra_pass]
    if not wanted or "llm" not in request.stacks:
        return answer
    ids = answer_ids(adapter, prepared, request, answer)
    lm, head = adapter.language_model(), adapter.model.get_output_embeddings()
    scoring = saliency.scoring_inputs(adapter.model, lm, prepared.inputs, ids.to(adapter.device),
                                      prepared.layout.positions)
    n = prepared.layout.n_tokens
    if "grad_x_input" in wanted:
        value = saliency.gradient_x_input(lm, head, scoring)
        builder.add(Observation("grad_x_input", "answer", value[None]), "llm", -1, 0)
    if "attention_x_gradient" in wanted:
        plan = next(p for p in plans if p.stack == "llm")
        layers = sorted(plan.recorded)
        modules = [plan.attention[i] for i in layers]
        for layer, value in zip(layers, saliency.attention_x_gradient(lm, head, scoring, modules)):
            per_head = request.per_head
            value = value[:, None] if per_head else value.sum(0)[None]
            builder.add(Observation("attention_x_gradient", "answer", value, per_head), "llm", layer, 0)
    if "occlusion" in wanted:
        for k in request.occlusion_groups:
            groups = saliency.grid_groups(prepared.layout.cell, prepared.layout.group, k)
            deltas = saliency.occlusion(lm, head, scoring, groups, request.batch_size)
            value = torch.empty(n)
            for members, delta in zip(groups, deltas):
                value[torch.as_tensor(members, dtype=torch.long)] = delta
            builder.add(Observation("occlusion", f"k{k}", value[None]), "llm", -1, 0)
    return adapter.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip() if answer is None else answer
