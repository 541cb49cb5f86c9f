"""SparseVLM: text-rater-guided progressive pruning inside the LLM, with recycling of deleted tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import MethodNotApplicable, ModelFacts, PruningMethod, SelectionContext, SignalNeed
from workbench.pruning.plan import KeepPlan, Merge, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

REFERENCE_TOKENS = 576  # LLaVA-1.5's visual tokens, for which the schedules are written
# ``sparse_token_list_<budget>`` of llava/model/language_model/score.py (version 1.0).
REFERENCE_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
POSITIONS = ("reindex", "original")


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
    indexing ``centres``. No tie-breaking noise (the reference adds rand * 1e-6 to the density)."""
    x = np.asarray(x, dtype=np.float64)
    n, c = x.shape
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / np.sqrt(c)
    nearest = np.sort(dist, axis=1)[:, :n_clusters]
    density = np.exp(-(nearest ** 2).mean(axis=1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    parent = np.where(denser, dist, dist.max()).min(axis=1)
    centres = top_k(parent * density, n_clusters)
    labels = np.argmin(dist[centres], axis=0)
    labels[centres] = np.arange(n_clusters)
    return centres, labels


def sparse_stage(layer: int, alive: np.ndarray, relation: np.ndarray, count: int, states: np.ndarray | None,
                 n_visual: int, position: str, recycle: bool = True) -> Stage:
    """One SparseVLM step on the live ``alive`` tokens (original indices) scored by ``relation``:
    keep the top ``min(count, M - 1)``; recycle the top 30 % (+1) of the deleted by score, cluster
    them on ``states`` (their hidden states, rows aligned with ``alive``) and merge each cluster
    (plain mean, as the reference's cluster average) into its centre, which is kept."""
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
        for c, centre in enumerate(centres):
            members = chosen[labels == c]
            sources = [int(t) for t in members if t != chosen[centre]]
            if sources:
                merges.append(Merge.mean(int(chosen[centre]), sources))
        kept = np.union1d(kept, chosen[centres])
    return Stage(layer, tuple(kept), tuple(scores), tuple(merges), position=position)


@register_method("sparsevlm")
@dataclass(frozen=True)
class SparseVLM(PruningMethod):
    """SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language
    Model Inference", arXiv 2410.04417; code Gumpest/SparseVLMs, version 1.0:
    ``llava/model/language_model/modelling_sparse_llama.py``, ``score.py``, ``utils.py``).

    Raters: at the LLM input, softmax(V T^T) over the text axis (V: visual embeddings, T: every token
    after the image), averaged over the visual tokens; text tokens above the mean rate (read from
    the recorded layer-0 ``visual_states``/``text_states``). At layers 2, 6, 15 the reference runs
    the layer, takes ITS attention (head mean) of the rater rows on the live visual tokens, averages
    the raters, keeps the top ``min(schedule[s], M - 1)`` and prunes the layer's OUTPUT. Here: a
    callback computes layer k's attention on its live input (``LayerState.attention``) and returns the
    stage before layer k+1. Placed on this decoder: k -> ``scaled_layer(k)`` capped at depth-2; a
    reference layer whose scaled scoring layer would be the previous stage's layer (the callback
    cannot score a layer on a sequence it is about to cut) folds into the next one.

    Recycling: the top 30 % (+1) of the deleted tokens by the same score are clustered (DPC-kNN,
    ``int(m/10)+1`` clusters) on the layer's output states and each cluster is averaged into a new
    token. We represent a recycled token by the cluster's DPC centre, kept at its own position, with
    its cluster merged into it (``Merge.mean``); the reference appends the new tokens after the kept
    visual tokens. Version 1.0 numbers the pruned sequence contiguously: ``position="reindex"``;
    on M-RoPE models (no re-indexing in the executor) it falls back to ``"original"``.

    Budget: the reference's per-layer schedules exist for 192/128/96/64 of 576 tokens (each
    averaging that many tokens over the 32 layers); the one whose fraction is nearest to n_keep/N
    is used, each count scaled by N/576. ``kept_counts`` returns the resulting kept counts
    (schedule count + recycled cluster tokens at each stage).
    """

    scored_by: ClassVar[str] = "text_attention"

    reference: ClassVar[str] = (
        "SparseVLM (arXiv 2410.04417); code Gumpest/SparseVLMs v1.0, llava/model/language_model/"
        "modelling_sparse_llama.py, score.py (sparse_token_list_192/128/96/64), utils.py (cluster_and_merge). "
        "Raters = text tokens above the mean of mean_v softmax_t(V T^T); at layers 2/6/15 (scaled) the "
        "raters' head-mean attention of that layer ranks the live visual tokens, the layer's output is "
        "pruned, 30% of the deleted are DPC-kNN clustered and recycled, positions re-indexed. Deviations: "
        "recycled tokens = cluster centres with their cluster merged in, at their own positions; schedule "
        "chosen by the nearest reference budget fraction, scaled to N; 'original' positions on M-RoPE.")

    layers: tuple[int, ...] = (2, 6, 15)
    recycle: bool = True
    position: str = "reindex"

    def __post_init__(self):
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if len(layers) != 3 or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0
                                   for k in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"sparsevlm: layers must be three increasing ints >= 0 (one per schedule "
                             f"entry), got {self.layers!r}")
        check_reference_layers("sparsevlm", "layers", layers)
        if not isinstance(self.recycle, bool):
            raise ValueError(f"sparsevlm: recycle must be a bool, got {self.recycle!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"sparsevlm: position must be one of {POSITIONS}, got {self.position!r}")

    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return f"it scores with one layer and prunes before the next, this decoder has {model.decoder_layers}"
        return None

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("text_states", "llm", 0), SignalNeed("visual_states", "llm", 0))

    def reference_budget(self, context: SelectionContext) -> int:
        fraction = context.n_keep / context.n_visual if context.n_visual else 0.0
        return min(REFERENCE_SCHEDULES, key=lambda b: (abs(b / REFERENCE_TOKENS - fraction), -b))

    def scoring_schedule(self, context: SelectionContext) -> tuple[tuple[int, int], ...]:
        """((scoring layer, schedule count), ...); each stage acts before scoring layer + 1."""
        depth = context.require_model().decoder_layers
        counts = REFERENCE_SCHEDULES[self.reference_budget(context)]
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
            alive = keep + (recycle_count(alive - keep)[1] if self.recycle else 0)
            counts.append(alive)
        return tuple(counts)

    def raters(self, context: SelectionContext) -> np.ndarray:
        text = context.signal(SignalNeed("text_states", "llm", 0))
        visual = context.signal(SignalNeed("visual_states", "llm", 0))
        return select_raters(visual, text)

    def select(self, context: SelectionContext) -> KeepPlan:
        self.check_applies(context.require_model())
        return self.plan(context, [])  # every stage is chosen on the live state by the callback

    def layer_callback(self, context: SelectionContext):
        schedule = dict(self.scoring_schedule(context))
        raters = torch.as_tensor(self.raters(context), dtype=torch.long)
        n_visual = context.n_visual
        pending = {}

        def callback(layer, state):
            stage = None
            if layer - 1 in schedule and "relation" in pending:
                alive = np.asarray(state.visual_indices)
                if not np.array_equal(alive, pending["alive"]):
                    raise RuntimeError("sparsevlm: the visual tokens changed between scoring and pruning")
                states = state.hidden_states[0, state.visual_rows].double().cpu().numpy() if self.recycle else None
                stage = sparse_stage(layer, alive, pending.pop("relation"), schedule[layer - 1], states,
                                     n_visual, self.position if state.position_ids.dim() == 2 else "original",
                                     self.recycle)
            if layer in schedule:
                if len(raters) == 0 or len(state.text_rows) == 0:
                    raise MethodNotApplicable("sparsevlm: no text rater token after the image")
                probs = state.attention(state.text_rows[raters])  # [H, R, S]
                relation = probs.mean(0)[:, state.visual_rows.to(probs.device)].mean(0)
                pending["relation"] = relation.double().cpu().numpy()
                pending["alive"] = np.asarray(state.visual_indices)
            return stage

        return callback
