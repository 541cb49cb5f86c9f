"""SparseVLM: text-rater-guided progressive pruning inside the LLM, with recycling of deleted tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import MethodNotApplicable, ModelFacts, PruningMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import Append, KeepPlan, Merge, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

REFERENCE_TOKENS = 576  # LLaVA-1.5's visual tokens, for which the schedules are written
# ``sparse_token_list_<budget>`` of llava/model/language_model/score.py lines 11-14, per ``USE_VERSION``.
REFERENCE_SCHEDULES = {
    "1_0": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2_0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
VERSIONS = tuple(REFERENCE_SCHEDULES)
POSITIONS = ("reindex", "original")
# Where a recycled cluster token goes: "end", after the kept visual tokens (modelling_sparse_llama.py
# lines 295-298); "centre", written into the cluster's DPC centre at that token's own place.
RECYCLE_PLACES = ("end", "centre")
# Version 2.0 keeps the ``topk(14)`` heads (score.py line 53) of LLaVA-1.5-7B's 32; other decoders keep
# the same fraction of theirs.
PRIORITY_HEADS, REFERENCE_HEADS = 14, 32
MERGE_EPS = 1e-6  # cluster_and_merge divides each member by (cluster size + 1e-6), utils.py line 229


def select_raters(visual: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Indices (into the text tokens after the image) of the raters: softmax(V T^T) over the text
    axis for each visual token, averaged over the visual tokens; raters score above the mean."""
    logits = np.asarray(visual, dtype=np.float64) @ np.asarray(text, dtype=np.float64).T  # [N, T]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    relevance = probs.mean(axis=0)  # [T]
    return np.flatnonzero(relevance > relevance.mean())


def recycle_count(n_deleted: int, fraction: float = 0.3, per_cluster: int = 10) -> tuple[int, int]:
    """(deleted tokens recycled, clusters they form): ``int(n * 0.3) + 1`` and ``int(m / 10) + 1``."""
    if n_deleted <= 0:
        return 0, 0
    recycled = min(int(n_deleted * fraction) + 1, n_deleted)
    return recycled, int(recycled / per_cluster) + 1


def dpc_knn(x: np.ndarray, n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """DPC-kNN clustering as the reference's ``cluster_and_merge``: distances / sqrt(C), density from
    the ``n_clusters`` nearest (self included), distance to the nearest denser token (the largest
    distance for the densest), centres = top ``n_clusters`` of density * that distance, every token
    to its nearest centre, centres to themselves. Returns (centres, label per token) with labels
    indexing ``centres``; the centres in the reference's ``topk`` order (score descending, ties: the
    lower index), which is the order its merged tokens are appended in. No tie-breaking noise (the
    reference adds rand * 1e-6 to the density)."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / np.sqrt(c)
    nearest = np.sort(dist, axis=1)[:, :n_clusters]
    density = np.exp(-(nearest ** 2).mean(axis=1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = np.where(denser, dist, dist.max()).min(axis=1)
    score = parent * density
    centres = top_k(score, n_clusters)
    centres = centres[np.lexsort((centres, -score[centres]))]
    labels = np.argmin(dist[centres], axis=0)
    labels[centres] = np.arange(n_clusters)
    return centres, labels


def sparse_stage(layer: int, alive: np.ndarray, relation: np.ndarray, count: int, states: np.ndarray | None,
                 n_visual: int, position: str, recycle: bool = True, recycle_at: str = "end") -> Stage:
    """One SparseVLM step on the live ``alive`` tokens (original indices) scored by ``relation``:
    keep the top ``min(count, M - 1)``; recycle the top 30 % (+1) of the deleted by score, cluster
    them on ``states`` (their hidden states, rows aligned with ``alive``) and make each cluster's
    average (weights ``1 / (size + 1e-6)``, as ``cluster_and_merge``) a new token named by its
    centre: appended after the kept visual tokens in the reference's cluster order (``"end"``), or
    written into the centre at its own place (``"centre"``; a one-token cluster then stays as it is)."""
    scores = np.full(n_visual, np.nan)
    scores[alive] = relation
    kept = top_k(scores, max(min(count, len(alive) - 1), 0), among=alive)
    deleted = np.setdiff1d(alive, kept)
    recycled, n_clusters = recycle_count(len(deleted)) if recycle else (0, 0)
    merges = []
    if recycled:
        chosen = top_k(scores, recycled, among=deleted)
        row_of = {int(t): i for i, t in enumerate(alive)}
        centres, labels = dpc_knn(states[[row_of[int(t)] for t in chosen]], n_clusters)
        appends = []
        for c, centre in enumerate(centres):
            members = chosen[labels == c]
            sources = [int(t) for t in members if t != chosen[centre]]
            weights = (1.0 / (len(members) + MERGE_EPS),) * len(members)
            if recycle_at == "end":
                appends.append(Append(int(chosen[centre]), sources, weights))
            elif sources:
                merges.append(Merge(int(chosen[centre]), sources, weights))
        kept = np.union1d(kept, chosen[centres])
        return Stage(layer, tuple(kept), tuple(scores), tuple(merges), position=position, appends=tuple(appends))
    return Stage(layer, tuple(kept), tuple(scores), tuple(merges), position=position)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_gravity(cos: torch.Tensor, sin: torch.Tensor, rows, cols) -> torch.Tensor:
    """[R, C] version 2.0's "attention gravity": the scaled dot product of an all-ones query at
    ``rows`` with an all-ones key at ``cols`` after rotary embedding (``cos``/``sin`` [S, d] of the
    sequence), i.e. the part of an attention logit that only RoPE contributes."""
    ones = cos.new_ones(cos.shape)
    rotated = ones * cos + _rotate_half(ones) * sin
    return rotated[rows] @ rotated[cols].T / math.sqrt(cos.shape[-1])


def priority_head_count(n_heads: int) -> int:
    return max(1, min(n_heads, int(round(PRIORITY_HEADS * n_heads / REFERENCE_HEADS))))


def relation_v2(probs: torch.Tensor, gravity: torch.Tensor) -> torch.Tensor:
    """[M] version 2.0's score of the live visual tokens from the raters' attention ``probs`` [H, R, M]
    on them: divided by the RoPE gravity [R, M] (modelling_sparse_llama.py lines 242-251), the heads
    with the largest total rater-to-visual attention kept (score.py ``select_attn_head_by_sum``, ties:
    lower index), their mean, then the mean over the raters (``attn_postprocess_topk``)."""
    corrected = probs.double() / gravity.double()[None]
    heads = torch.sort(-corrected.sum(dim=(1, 2)), stable=True).indices[:priority_head_count(len(probs))]
    return corrected[heads].mean(0).mean(0)


@register_method("sparsevlm")
@dataclass(frozen=True)
class SparseVLM(PruningMethod):
    """SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
    Model Inference", arXiv 2410.04417; code Gumpest/SparseVLMs: ``llava/model/language_model/
    modelling_sparse_llama.py``, ``score.py``, ``utils.py``; ``version`` = its ``USE_VERSION``).

    Raters: at the LLM input, softmax(V T^T) over the text axis (V: visual embeddings, T: every token
    after the image), averaged over the visual tokens; text tokens above the mean rate (read from
    the recorded layer-0 ``visual_states``/``text_states``). At layers 2, 6, 15 the reference runs
    the layer, takes ITS attention (head mean) of the rater rows on the live visual tokens, averages
    the raters, keeps the top ``min(schedule[s], M - 1)`` and prunes the layer's OUTPUT. Here: a
    callback computes layer k's attention on its live input (``LayerState.attention``) and returns the
    stage before layer k+1. Placed on this decoder: k -> ``scaled_layer(k)`` capped at depth-2; a
    reference layer whose scaled scoring layer would be the previous stage's layer (the callback
    cannot score a layer on a sequence it is about to cut) folds into the next one.

    Version ``"1_0"`` (default, as the code's default): recycling: the top 30 % (+1) of the deleted
    tokens by the same score are clustered (DPC-kNN, ``int(m/10)+1`` clusters) on the layer's output
    states and each cluster is averaged (weights ``1 / (size + 1e-6)``) into a new token, appended
    after the kept visual tokens in the code's cluster order (``recycle_at="end"``, lines 290-298:
    the plan's ``Append``, named by the cluster's DPC centre; later stages score, keep and recycle
    it like any live token, as the code does); the pruned sequence is numbered contiguously
    (``position="reindex"``, line 302; on M-RoPE models, which the executor cannot re-index,
    ``"original"``, where each appended token takes the position id of the last visual token).
    ``recycle_at="centre"`` instead writes each cluster's average into its centre at the centre's own
    place in the sequence (a one-token cluster then stays as it is). Version ``"2_0"`` (SparseVLM+): its own schedules; the raters'
    attention is divided by the RoPE-only logit of all-ones queries and keys ("gravity correction",
    ``rope_gravity``), only the 14 of 32 heads with the largest rater-to-visual total are averaged
    (the same fraction of this decoder's heads), no recycling, and the kept tokens keep their position
    ids (``"original"``). ``recycle`` and ``position`` default to the version's choice.

    The reference adds ``rand * 1e-6`` to the DPC densities to break ties (and ``topk`` orders tied
    centres arbitrarily); we break both by the lower index.

    Budget: the reference's per-layer schedules exist for 192/128/96/64 of 576 tokens (each
    averaging that many tokens over the 32 layers); the one whose fraction is nearest to n_keep/N
    is used, each count scaled by N/576. ``kept_counts`` returns the resulting kept counts
    (schedule count + recycled cluster tokens at each stage).
    """

    scored_by: ClassVar[str] = "text_attention"

    reference: ClassVar[str] = (
        "SparseVLM (arXiv 2410.04417); code Gumpest/SparseVLMs (USE_VERSION 1_0 default, 2_0 = version='2_0'), "
        "llava/model/language_model/modelling_sparse_llama.py, score.py (sparse_token_list_192/128/96/64, "
        "select_attn_head_by_sum), utils.py (cluster_and_merge). Raters = text tokens above the mean of "
        "mean_v softmax_t(V T^T); at layers 2/6/15 (scaled) the raters' attention of that layer ranks the live "
        "visual tokens and the layer's output is pruned. v1.0: head mean, 30% of the deleted DPC-kNN clustered "
        "and recycled, positions re-indexed. v2.0: attention / RoPE gravity, top 14/32 heads, no recycling, "
        "original positions. Recycled tokens are appended after the kept visual tokens (lines 290-302). Variants: "
        "recycle=False, position='original'|'reindex', recycle_at='centre' (each cluster's average written into "
        "its centre at the centre's place). Deviations: schedule chosen by the nearest reference budget fraction, "
        "scaled to N; 'original' positions on M-RoPE; DPC ties by the lower index instead of random noise.")

    layers: tuple[int, ...] = (2, 6, 15)
    version: str = "1_0"
    recycle: bool | None = None
    position: str | None = None
    recycle_at: str = "end"

    def __post_init__(self):
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if len(layers) != 3 or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0
                                   for k in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"sparsevlm: layers must be three increasing ints >= 0 (one per schedule "
                             f"entry), got {self.layers!r}")
        check_reference_layers("sparsevlm", "layers", layers)
        check_choice("sparsevlm", "version", self.version, VERSIONS)
        if self.recycle is not None and not isinstance(self.recycle, bool):
            raise ValueError(f"sparsevlm: recycle must be a bool (or None: the version's), got {self.recycle!r}")
        check_choice("sparsevlm", "recycle_at", self.recycle_at, RECYCLE_PLACES)
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"sparsevlm: position must be one of {POSITIONS} (or None: the version's), "
                             f"got {self.position!r}")

    @property
    def recycles(self) -> bool:
        """Whether deleted tokens are recycled: version 1.0 does, 2.0 cancels it (line 274)."""
        return self.version == "1_0" if self.recycle is None else self.recycle

    @property
    def positions(self) -> str:
        """Version 1.0 re-numbers the pruned sequence (line 314), 2.0 keeps the position ids (line 312)."""
        if self.position is not None:
            return self.position
        return "reindex" if self.version == "1_0" else "original"

    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return f"it scores with one layer and prunes before the next, this decoder has {model.decoder_layers}"
        if self.version == "2_0" and model.mrope:
            return "version 2_0's gravity correction is written for one-axis RoPE, this decoder uses M-RoPE"
        return None

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("text_states", "llm", 0), SignalNeed("visual_states", "llm", 0))

    def reference_budget(self, context: SelectionContext) -> int:
        fraction = context.n_keep / context.n_visual if context.n_visual else 0.0
        return min(REFERENCE_SCHEDULES[self.version], key=lambda b: (abs(b / REFERENCE_TOKENS - fraction), -b))

    def scoring_schedule(self, context: SelectionContext) -> tuple[tuple[int, int], ...]:
        """((scoring layer, schedule count), ...); each stage acts before scoring layer + 1."""
        depth = context.require_model().decoder_layers
        counts = REFERENCE_SCHEDULES[self.version][self.reference_budget(context)]
        scale = context.n_visual / REFERENCE_TOKENS
        out: list[list[int]] = []
        for k, count in zip(self.layers, counts):
            layer = max(min(scaled_layer(max(k, 1), depth), depth - 2), 0)
            count = int(round(count * scale))
            if out and layer <= out[-1][0] + 1:  # same layer, or scoring where the previous stage cuts
                out[-1] = [max(layer, out[-1][0]), count]
            else:
                out.append([layer, count])
        return tuple((a, b) for a, b in out)

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        alive, counts = context.n_visual, []
        for _, count in self.scoring_schedule(context):
            keep = max(min(count, alive - 1), 0)
            alive = keep + (recycle_count(alive - keep)[1] if self.recycles else 0)
            counts.append(alive)
        return tuple(counts)

    def raters(self, context: SelectionContext) -> np.ndarray:
        text = context.signal(SignalNeed("text_states", "llm", 0))
        visual = context.signal(SignalNeed("visual_states", "llm", 0))
        return select_raters(visual, text)

    def select(self, context: SelectionContext) -> KeepPlan:
        self.check_applies(context.require_model())
        return self.plan(context, [])  # every stage is chosen on the live state by the callback

    def relation(self, state, raters: torch.Tensor) -> np.ndarray:
        """[M] the raters' score of the live visual tokens in this layer (the version's rule)."""
        rows = state.text_rows[raters]
        probs = state.attention(rows)  # [H, R, S]
        visual = state.visual_rows.to(probs.device)
        if self.version == "1_0":
            return probs.mean(0)[:, visual].mean(0).double().cpu().numpy()
        cos, sin = (t.reshape(-1, t.shape[-1]).to(probs.device, torch.float64) for t in state.position_embeddings)
        gravity = rope_gravity(cos, sin, rows.to(probs.device), visual)
        return relation_v2(probs[:, :, visual], gravity).cpu().numpy()

    def layer_callback(self, context: SelectionContext):
        schedule = dict(self.scoring_schedule(context))
        raters = torch.as_tensor(self.raters(context), dtype=torch.long)
        n_visual = context.n_visual
        recycle = self.recycles
        pending = {}

        def callback(layer, state):
            stage = None
            if layer - 1 in schedule and "relation" in pending:
                alive = np.asarray(state.visual_indices)
                if not np.array_equal(alive, pending["alive"]):
                    raise RuntimeError("sparsevlm: the visual tokens changed between scoring and pruning")
                states = state.hidden_states[0, state.visual_rows].double().cpu().numpy() if recycle else None
                stage = sparse_stage(layer, alive, pending.pop("relation"), schedule[layer - 1], states,
                                     n_visual, self.positions if state.position_ids.dim() == 2 else "original",
                                     recycle, self.recycle_at)
            if layer in schedule:
                if len(raters) == 0 or len(state.text_rows) == 0:
                    raise MethodNotApplicable("sparsevlm: no text rater token after the image")
                pending["relation"] = self.relation(state, raters)
                pending["alive"] = np.asarray(state.visual_indices)
            return stage

        return callback
