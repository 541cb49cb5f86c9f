"""Shared pieces of the parity tests: the models and samples, the model's own tensors read without the
workbench's recorder (eager attention through ``output_attentions``, ``output_hidden_states``, plain
forward hooks), and the workbench's kept set from ``method.select`` on a recording of the same sample.

Each ``test_<method>.py`` writes an independent reference of the official selection rule (file and
lines cited) as a plain function of those tensors and asserts the kept sets are identical
(Jaccard 1.0) at several budgets.
"""

from __future__ import annotations

import copy
import math
import functools

import numpy as np
import torch

from workbench.pruning.method import ModelFacts, SelectionContext
from workbench.pruning.run import record_needs

N_SHIPPED = 3  # eval samples of the shipped model per test


@functools.lru_cache(maxsize=None)
def shipped():
    """(adapter, [prepared inputs]) of the shipped model on the first ``N_SHIPPED`` eval samples."""
    from workbench.models.loading import load
    from workbench.samples import read_dataset

    adapter = load("shapes-vlm")
    samples = read_dataset("data/eval/samples.jsonl", limit=N_SHIPPED)
    return adapter, [adapter.prepare(s.load_image(), s.question) for s in samples]


@functools.lru_cache(maxsize=None)
def tiny(family: str):
    """(adapter, [prepared input]) of a tiny ``family`` model on its test image."""
    from tests.tiny_models import QUESTION, TINY_SPECS, noise_image, tiny_adapter

    adapter = tiny_adapter(family)
    return adapter, [adapter.prepare(noise_image(TINY_SPECS[family].image_size), QUESTION)]


def labels(families=()):
    """Test ids: every shipped sample, then each tiny family given (built lazily by ``case``)."""
    return [f"shipped-{i}" for i in range(N_SHIPPED)] + [f"tiny-{f}" for f in families]


def case(label: str):
    """(adapter, prepared input) of a ``labels`` entry."""
    if label.startswith("shipped-"):
        adapter, prepared = shipped()
        return adapter, prepared[int(label.split("-")[1])]
    adapter, prepared = tiny(label[len("tiny-"):])
    return adapter, prepared[0]


@functools.lru_cache(maxsize=None)
def eager_model(adapter):
    """A deep copy of the adapter's model running transformers' own eager attention (not the
    workbench's listened kernel), so attention maps come from ``output_attentions``."""
    model = copy.deepcopy(adapter.model)
    model.set_attn_implementation("eager")
    return model.eval()


def _key(prepared):
    return id(prepared)


_EAGER: dict = {}


@torch.no_grad()
def eager_forward(adapter, prepared):
    """The unpruned forward of the eager copy with ``output_attentions`` and ``output_hidden_states``."""
    key = (id(adapter), _key(prepared))
    if key not in _EAGER:
        _EAGER[key] = eager_model(adapter)(**prepared.inputs, output_attentions=True, output_hidden_states=True)
    return _EAGER[key]


@torch.no_grad()
def eager_tower(adapter, prepared, pixel_values=None):
    """The eager copy's vision tower on the sample's pixels: ``output_attentions`` [views, H, P, P]
    per layer and ``hidden_states`` (0 = embeddings) per layer."""
    model = eager_model(adapter)
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    pixels = prepared.inputs["pixel_values"] if pixel_values is None else pixel_values
    return tower(pixels, output_attentions=True, output_hidden_states=True)


def facts(adapter) -> ModelFacts:
    return ModelFacts.of(adapter)


def workbench_plan(method, adapter, prepared, budget):
    """The workbench's plan: ``method.select`` on the workbench recorder's recording of the sample."""
    f = facts(adapter)
    recording = record_needs(adapter, prepared, [method])
    return method.select(SelectionContext(prepared.layout, budget, recording, f))


def n_keep(prepared, budget) -> int:
    return SelectionContext(prepared.layout, budget).n_keep


def jaccard(a, b) -> float:
    a, b = set(int(i) for i in a), set(int(i) for i in b)
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def visual_positions(prepared) -> np.ndarray:
    """Sequence positions of the visual tokens in layout order."""
    return np.asarray(prepared.layout.positions, dtype=np.int64)


def torch_topk(scores, k: int) -> np.ndarray:
    """``scores.topk(k).indices`` as the official code calls it, sorted. ``torch.topk`` leaves the
    choice among EXACTLY tied scores unspecified (identical background patches tie exactly where no
    position enters the score, e.g. FEATHER's RoPE-free attention); the reference breaks such ties
    by the lower index (a stable sort), as the workbench's ``top_k`` documents."""
    scores = torch.as_tensor(np.asarray(scores), dtype=torch.float64)
    return np.sort(torch.sort(-scores, stable=True).indices[:k].numpy())


@torch.no_grad()
def tower_key_states(adapter, prepared, layer: int) -> torch.Tensor:
    """[views, tokens, heads*head_dim] output of ``k_proj`` of tower layer ``layer`` on the eager copy,
    caught by a plain forward hook."""
    model = eager_model(adapter)
    tower = model.vision_tower if hasattr(model, "vision_tower") else model.model.vision_tower
    from workbench.models.base import encoder_layers

    caught = {}
    handle = encoder_layers(tower)[layer].self_attn.k_proj.register_forward_hook(
        lambda m, a, out: caught.setdefault("k", out.detach().clone()))
    try:
        tower(prepared.inputs["pixel_values"])
    finally:
        handle.remove()
    return caught["k"]


# --- in-LLM methods: the decoder run by hand on a physically pruned sequence ----------------------

def language_model(model):
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model  # Idefics3, SmolVLM


def causal_mask(length: int, dtype=torch.float32) -> torch.Tensor:
    """[1, 1, S, S] additive causal mask (eager attention with no mask would attend everywhere)."""
    return torch.full((length, length), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


@torch.no_grad()
def layer_attention(lm, index: int, states: torch.Tensor, positions: torch.Tensor, rows,
                    rope: bool = True, logits: bool = False) -> torch.Tensor:
    """[H, R, S] softmax attention of query ``rows`` in decoder layer ``index`` on ``states``, from the
    layer's own input norm and q/k projections (with RoPE at ``positions`` unless ``rope=False``),
    causal; as the official PyramidDrop / FEATHER / TransPrune code recomputes it. ``logits``: the
    scaled, masked scores before the softmax."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = lm.layers[index]
    attn = layer.self_attn
    h = layer.input_layernorm(states)
    length, d = h.shape[1], attn.head_dim
    q = attn.q_proj(h).view(1, length, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(1, length, -1, d).transpose(1, 2)
    if rope:
        cos, sin = lm.rotary_emb(h, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows = torch.as_tensor(rows, dtype=torch.long)
    weights = q[:, :, rows] @ k.transpose(2, 3) / math.sqrt(d) + causal_mask(length)[:, :, rows]
    return weights[0] if logits else torch.softmax(weights.float(), dim=-1)[0]


@torch.no_grad()
def run_pruned(adapter, prepared, cut):
    """The eager copy's decoder layers called by hand on the sample's decoder input (the eager
    forward's ``hidden_states[0]``, 1-D positions ``0..L-1``). Before each layer i,
    ``cut(i, lm, states, positions, kinds)`` may return (kept original visual indices, "reindex" |
    "original"); the other visual rows are then removed. ``kinds``: per row, the original visual
    index or -1. Returns the final hidden states and ``{layer: kept}``."""
    model = eager_model(adapter)
    lm = language_model(model)
    states = eager_forward(adapter, prepared).hidden_states[0].clone()
    length = states.shape[1]
    positions = torch.arange(length).unsqueeze(0)
    kinds = np.full(length, -1)
    kinds[visual_positions(prepared)] = np.arange(prepared.layout.n_tokens)
    stages = {}
    for i, layer in enumerate(lm.layers):
        out = cut(i, lm, states, positions, kinds)
        if out is not None:
            kept, policy = out
            stages[i] = tuple(sorted(int(v) for v in kept))
            rows = np.flatnonzero((kinds < 0) | np.isin(kinds, list(kept)))
            states, kinds = states[:, rows], kinds[rows]
            positions = (torch.arange(len(rows)).unsqueeze(0) if policy == "reindex"
                         else positions[:, torch.as_tensor(rows)])
        out = layer(states, attention_mask=causal_mask(states.shape[1]), position_ids=positions,
                    position_embeddings=lm.rotary_emb(states, positions))
        states = out[0] if isinstance(out, tuple) else out
    return states, stages


def workbench_stages(method, adapter, prepared, budget, max_new_tokens: int = 1):
    """{layer: kept} of every stage the workbench executed for ``method`` (planned and callback stages),
    via ``run_method`` on the workbench recorder's recording."""
    from workbench.pruning.run import run_method

    execution = run_method(adapter, prepared, method, budget, max_new_tokens=max_new_tokens)
    return {s.where: s.kept for s in execution.plan.stages}
