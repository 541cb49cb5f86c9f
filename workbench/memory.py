"""Memory guard: estimate what a capture will hold before running it, and refuse oversized ones.

The estimate reads the model's shapes (heads, head size, hidden size from each layer's attention
module; token counts from the prepared inputs) and the request. It counts what the recording
stores (every entry, float32) plus the largest working set one layer needs (a row chunk, the
head-mean attention matrix of a full sweep, the rollout state, one head's value-output product
for contributions), plus, for saliency, the replayed decoder's activations and autograd graph
(approximate: activations are counted as eight hidden-size tensors per token and layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from probes.capture import DEFAULT_CHUNK_BYTES, KEY_CATEGORIES, ROW_KINDS, TokenRoles, output_projection
from probes.registry import signal_spec
from workbench.errors import UserError

DEFAULT_LIMIT = 4 * 2**30
FLOAT = 4


class MemoryBudgetExceeded(UserError):
    """A capture whose estimate is above the memory limit; the message says what to drop."""


@dataclass(frozen=True)
class StackShape:
    stack: str
    layers: int  # recorded layers
    heads: int
    head_dim: int
    hidden: int
    length: int  # tokens per view
    visual: int  # visual keys per view
    views: int
    rows: dict  # row kind -> rows per view
    llm_hidden: int  # the decoder's width: what the projector makes of a tower's features


@dataclass(frozen=True)
class MemoryEstimate:
    total: int
    stored: dict  # what -> bytes
    working: int
    per_layer: dict  # stack -> bytes one more recorded layer costs

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        return sorted(self.stored.items(), key=lambda kv: -kv[1])[:n]


def gib(n: float) -> str:
    """Bytes in the largest unit that keeps a whole number in front: "1.25 GiB", "40.0 MiB"."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{int(n)} B"


def _attention_shape(attention) -> tuple[int, int, int]:
    out = output_projection(attention)
    head_dim = getattr(attention, "head_dim", None)
    head_dim = head_dim or attention.config.hidden_size // attention.config.num_attention_heads
    return out.in_features // head_dim, head_dim, out.out_features


def _tower_tokens(adapter, prepared) -> tuple[int, int]:
    """(tokens per view, views) of the vision tower for these inputs."""
    pixels = prepared.inputs.get("pixel_values")
    config = getattr(adapter.model.config, "vision_config", None)
    patch = getattr(config, "patch_size", None)
    cls = 1 if adapter.has_cls_token else 0
    if pixels is None or patch is None:
        return prepared.layout.n_tokens + cls, 1
    if pixels.dim() == 2:  # a flat patch sequence (Qwen2-VL)
        return pixels.shape[0], 1
    height, width = pixels.shape[-2:]
    views = pixels.shape[0] if pixels.dim() == 4 else pixels.shape[0] * pixels.shape[1]
    return (height // patch) * (width // patch) + cls, views


def stack_shapes(adapter, prepared, request) -> list[StackShape]:
    from workbench.recorder import resolve_layers

    shapes = []
    llm_hidden = _attention_shape(adapter.decoder_attention(0))[2]
    for stack in request.stacks:
        layers = adapter.vision_layers() if stack == "tower" else adapter.decoder_layers()
        attention = adapter.vision_attention(0) if stack == "tower" else adapter.decoder_attention(0)
        heads, head_dim, hidden = _attention_shape(attention)
        recorded = len(resolve_layers(request.layers_of(stack), len(layers), stack))
        if stack == "llm":
            length, views = prepared.inputs["input_ids"].shape[1], 1
            roles = TokenRoles.for_llm(prepared.layout.positions, length)
        else:
            length, views = _tower_tokens(adapter, prepared)
            roles = TokenRoles.for_tower(length, adapter.has_cls_token)
        rows = {"last": 1, "text": len(roles.text), "cls": int(roles.cls is not None),
                "visual": len(roles.visual), "mean": 1}
        shapes.append(StackShape(stack, recorded, heads, head_dim, hidden, length, len(roles.visual), views, rows,
                                 llm_hidden))
    return shapes


# Feature signals keep one row per visual token (or, bounding it, per token of the sequence).
FEATURE_ROW_COUNTS = {"feature": lambda shape: shape.visual, "text_feature": lambda shape: shape.length}


def estimate(adapter, prepared, request) -> MemoryEstimate:
    stored: dict[str, int] = {}
    per_layer: dict[str, int] = {}
    working = 0
    signals = [signal_spec(s) for s in request.signals]
    for shape in stack_shapes(adapter, prepared, request):
        layer_bytes = 0
        for spec in signals:
            if shape.stack not in spec.stacks or spec.extra_pass or spec.rows == "table":
                continue
            keys = {"visual": shape.visual, "category": len(KEY_CATEGORIES), "one": 1, "hidden": shape.hidden,
                    "keys": shape.heads * shape.head_dim, "llm_hidden": shape.llm_hidden}[spec.keys]
            heads = shape.heads if request.per_head and spec.heads != "none" else 1
            kinds = {"query": request.rows, "graph": request.graph_rows}.get(spec.rows, ("tokens",))
            for kind in kinds:
                if kind != "tokens" and (shape.stack not in ROW_KINDS[kind].stacks
                                         or (spec.rows == "graph" and ROW_KINDS[kind].aggregate)):
                    continue
                rows = 1 if kind == "tokens" else shape.rows[kind]
                if spec.rows in FEATURE_ROW_COUNTS:  # one row per token, not per query row
                    rows = FEATURE_ROW_COUNTS[spec.rows](shape)
                size = heads * rows * keys * FLOAT * shape.views
                what = f"{spec.name} on {kind!r} rows" + (", per head" if heads > 1 else "") + f" ({shape.stack})"
                stored[what] = stored.get(what, 0) + size * shape.layers
                layer_bytes += size
        per_layer[shape.stack] = layer_bytes
        length = shape.length
        # One layer at a time: a chunk of rows, up to three [S, S] head means of the full sweeps
        # (with RoPE, Kobayashi-weighted, without RoPE), the rollout state [S, N], a block of the
        # contribution parts (within the chunk budget).
        sweeps = 3 * length * length * FLOAT
        working = max(working, 2 * DEFAULT_CHUNK_BYTES + sweeps + length * shape.visual * FLOAT * shape.views)
    saliency = [s for s in signals if s.extra_pass]
    if saliency and "llm" in request.stacks:
        llm = next(s for s in stack_shapes(adapter, prepared, request) if s.stack == "llm")
        decoder_layers = len(adapter.decoder_layers())
        activations = llm.length * (8 * llm.hidden) * FLOAT  # per layer, with the MLP's wider tensors
        if any(s.name in ("grad_x_input", "attention_x_gradient") for s in saliency):
            working = max(working, decoder_layers * activations)  # the autograd graph of one replay
        if any(s.name == "occlusion" for s in saliency):
            working = max(working, request.batch_size * (activations + llm.length * llm.hidden * FLOAT))
        if any(s.name == "attention_x_gradient" for s in saliency):
            heads = llm.heads if request.per_head else 1
            what = "attention_x_gradient" + (", per head" if heads > 1 else "")
            stored[what] = heads * llm.visual * FLOAT * llm.layers
    total = sum(stored.values()) + working
    return MemoryEstimate(total, stored, working, per_layer)


def check_memory(adapter, prepared, request, limit: int = DEFAULT_LIMIT) -> MemoryEstimate:
    """The estimate, or ``MemoryBudgetExceeded`` naming what to drop when it is above ``limit``."""
    found = estimate(adapter, prepared, request)
    if found.total <= limit:
        return found
    advice = []
    if request.per_head:
        advice.append("drop per-head values (head means are a head-count times smaller)")
    for stack, size in found.per_layer.items():
        if size:
            advice.append(f"record fewer {stack} layers (each costs {gib(size)})")
    for kind in ("visual", "text"):
        size = sum(v for k, v in found.stored.items() if f"{kind!r} rows" in k)
        if kind in request.rows and size:
            advice.append(f"drop the {kind!r} rows (saves {gib(size)})")
    if request.batch_size > 1 and "occlusion" in request.signals:
        advice.append("lower the occlusion batch size")
    parts = ", ".join(f"{what}: {gib(size)}" for what, size in found.largest())
    raise MemoryBudgetExceeded(
        f"this capture needs about {gib(found.total)}, above the {gib(limit)} limit "
        f"(largest parts: {parts}; working memory {gib(found.working)}). To fit: " + "; ".join(advice) + "."
    )
