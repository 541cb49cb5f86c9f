"""AIM (Zhong et al. 2025): similarity merging before the LLM, PageRank-ranked pruning inside it.

Before the LLM the visual embeddings are merged by repeated bipartite soft matching (ToMe): the
tokens are split alternately into sources (even places) and destinations (odd places), the ``r``
sources most similar to a destination (cosine) are averaged into it, and the result is ordered
[unmerged sources, destinations]. Inside the LLM, from the middle layer on, every layer's attention
(temperature 0.1) is run as a Markov chain for a few PageRank steps; the visual tokens with the
least stationary mass (root mean square over the heads) are dropped, a fixed share of the LLM's
visual input per layer, until none is left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed
from workbench.pruning.plan import DROP_POLICIES, PRE_LLM, Append, KeepPlan, Merge, Stage, among
from workbench.pruning.ranking import normalized, top_k
from workbench.pruning.registry import register_method

# "code": the merged tokens enter the LLM in the code's order [unmerged sources, destinations],
# numbered 0..L-1 in that order; "layout": each at its destination's place in layout order.
ORDERS = ("code", "layout")

def code_steps(n: int, count: int) -> list[int]:
    """The code's own merging: ``count`` steps of ``r = n // 2, n // 4, ...`` (each at most half the
    current tokens); ``count=2`` is its default (25 % kept)."""
    steps, current = [], n
    for i in range(1, count + 1):
        r = min(n >> i, current // 2)
        if r <= 0:
            break
        steps.append(r)
        current -= r
    return steps


def merge_steps(n: int, n_keep: int) -> list[int]:
    """Tokens removed by each bipartite step taking ``n`` tokens to ``n_keep``: the reference's
    ``r = n // 2, n // 4, ...`` (each at most half the current tokens), the last step cut so that
    exactly ``n_keep`` remain (``n_keep = n/4`` gives the code's two steps, 50 % then 25 % kept)."""
    steps, current, i = [], n, 1
    while current > n_keep:
        r = min(max(n >> i, 1), current - n_keep, current // 2)
        if r <= 0:
            break
        steps.append(r)
        current -= r
        i += 1
    return steps


def bipartite_step(order: np.ndarray, weights: np.ndarray, x: np.ndarray, r: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One ``bipartite_soft_matching_merge`` step on the current tokens.

    ``order``: the representative original index of each current token, in the current order;
    ``weights`` [T, N]: each current token as a weighted sum of the original tokens ``x`` [N, D]
    (the metric is that weighted sum, as the code merges the features it compares). Sources are the
    even places, destinations the odd ones; each source's best destination (first on ties); the ``r``
    sources with the highest best similarity (stable: the earlier source on ties) are averaged into
    their destinations (``scatter_reduce(mean)`` with the destination itself counted); the new order
    is [unmerged sources by descending similarity, destinations]."""
    t = len(order)
    r = min(r, t // 2)
    if r <= 0:
        return order, weights
    metric = normalized(weights @ x)
    a, b = np.arange(0, t, 2), np.arange(1, t, 2)
    scores = metric[a] @ metric[b].T
    node_idx = np.argmax(scores, axis=1)
    node_max = scores[np.arange(len(a)), node_idx]
    edge = np.argsort(-node_max, kind="stable")
    src, unm = edge[:r], edge[r:]
    dst_weights = weights[b].copy()
    counts = np.ones(len(b))
    for s in src:
        dst_weights[node_idx[s]] += weights[a[s]]
        counts[node_idx[s]] += 1
    dst_weights /= counts[:, None]
    new_order = np.concatenate([order[a[unm]], order[b]])
    return new_order, np.concatenate([weights[a[unm]], dst_weights])


def merge_before_llm(x: np.ndarray, steps) -> tuple[tuple[int, ...], list[Merge], np.ndarray]:
    """(kept representatives in layout order, merges, final order) of the iterative merging of the
    visual embeddings ``x`` [N, D] by bipartite steps removing ``steps`` tokens each. A merged token
    is placed on its destination's original index; its sources are every other original token
    folded into it."""
    n = len(x)
    order, weights = np.arange(n), np.eye(n)
    for r in steps:
        order, weights = bipartite_step(order, weights, x, r)
    merges = []
    for rep, row in zip(order, weights):
        sources = [int(j) for j in np.flatnonzero(row) if j != rep]
        if sources:
            merges.append(Merge(int(rep), tuple(sources), (float(row[rep]),) + tuple(float(row[j]) for j in sources)))
    return tuple(sorted(int(i) for i in order)), merges, order


def in_code_order(order: np.ndarray, merges: list[Merge]) -> tuple[Append, ...]:
    """The merged tokens as the code concatenates them: every one (its merge, if any) appended at the
    end of the visual block in the merging's final ``order``, so they sit in that order."""
    by_target = {m.target: m for m in merges}
    return tuple(Append(int(t), by_target[t].sources, by_target[t].weights) if t in by_target
                 else Append(int(t), (), (1.0,)) for t in order)


def pagerank_importance(probs, temperature: float = 0.1, iterations: int = 5, damping: float = 0.0) -> np.ndarray:
    """[S] importance of every token from attention probabilities ``probs`` [H, S, S] (rows: queries).

    The reference (``get_importance``) turns the layer's masked attention logits into a transition
    matrix ``softmax(logits / temperature)``; from the probabilities that is ``p ** (1/temperature)``
    renormalised per row (masked keys stay 0). Then ``iterations`` steps of ``d <- (d M)(1 - damping)
    + damping / S`` from the uniform distribution, and the root mean square of ``d`` over the heads."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        logits = np.log(p) / temperature
    logits -= np.max(logits, axis=-1, keepdims=True, initial=-np.inf, where=np.isfinite(logits))
    m = np.where(np.isfinite(logits), np.exp(logits), 0.0)
    m /= np.maximum(m.sum(-1, keepdims=True), 1e-300)
    h, s, _ = m.shape
    dist = np.full((h, 1, s), 1.0 / s)
    for _ in range(iterations):
        dist = (dist @ m) * (1 - damping) + damping / s
    return np.sqrt((dist[:, 0] ** 2).mean(0))


def aim_schedule(model: ModelFacts, n_llm: int, first_layer: int, rate_step: float
                 ) -> tuple[tuple[int, int, int], ...]:
    """((scoring layer, pruned-before layer, visual tokens kept), ...) on ``model``'s decoder.

    Reference layer ``first_layer + j`` (j = 0, 1, ...) scores and the stage before the next layer
    keeps ``int(n_llm * (1 - (j + 1) * rate_step))`` of the ``n_llm`` visual tokens the LLM received
    (the code's ``retain_rate``, floored), down to 0. Scoring layers are placed with ``scaled_layer``
    (at most depth - 2, so the stage lands inside the decoder); reference layers that land on the same
    layer fold into one stage keeping the later count."""
    depth = model.decoder_layers
    folded: dict[int, int] = {}
    j = 0
    while True:
        rate = max(0.0, 1.0 - (j + 1) * rate_step)
        layer = min(scaled_layer(first_layer + j, depth), depth - 2)
        folded[layer] = int(n_llm * rate)
        if rate <= 0.0 or first_layer + j + 1 >= 32:
            break
        j += 1
    counts, previous = [], n_llm
    for layer in sorted(folded):
        previous = min(previous, folded[layer])
        counts.append((layer, layer + 1, previous))
    return tuple(counts)


@register_method("aim")
@dataclass(frozen=True)
class AIM(PreLLMMethod):
    """AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning (Zhong et al., ICCV
    2025, arXiv 2412.03248); code github.com/LaVi-Lab/AIM: merging ``llava/model/token_merge.py``
    (``bipartite_soft_matching_merge``) called in ``llava/model/llava_arch.py`` (``get_2dPool``, two
    steps ``r = n // 2`` then ``r = n // 4``: 25 % kept), pruning in
    ``other_packages/transformers/src/transformers/models/qwen2/modeling_qwen2.py`` (``get_importance``:
    temperature 0.1, 5 iterations, damping 0; ``Qwen2Model.forward``: ``retain_rate = 1 - (i - 13) *
    0.125`` after layer i >= 14 of Qwen2-7B's 28, text tokens protected).

    What we follow (the code):
    * before the LLM, ToMe bipartite merging of the projected visual embeddings (the LLM's input,
      recorded as ``visual_states`` of decoder layer 0) with the embeddings themselves as metric,
      sources = even places, ``scatter_reduce(mean)`` into the destination, re-ordered [unmerged,
      destinations] between steps (so later steps pair tokens as the code does). Steps ``r = n//2,
      n//4, ...`` until ``n_keep`` tokens remain (the budget fixes the merged count; the code's
      default is 25 %, which these steps reproduce exactly at n_keep = N/4);
      ``reference_steps=2`` runs the code's own two steps and ignores the budget;
    * the merged tokens enter the LLM in the code's order (``order="code"``): ``get_2dPool`` returns
      them as [unmerged sources, destinations] of the last step and ``prepare_inputs_labels_for_multimodal``
      concatenates that with the text and numbers the sequence 0..L-1. The plan appends every merged
      token at the end of the visual block in that order (``Append``), positions re-numbered;
    * inside the LLM, layer i's own attention on the whole sequence (``LayerState.attention``), all
      query rows, ``softmax(logits / 0.1)`` per head, 5 PageRank steps from uniform, RMS over heads;
      the visual tokens are ranked (text is never dropped) and the stage before layer i+1 keeps
      ``int(M * rate)``, M = visual tokens the LLM received, rate falling by ``rate_step`` per layer
      from ``first_layer`` until 0;
    * the tokens a stage drops are masked, not removed (``dropped="masked"``): the code ANDs them out
      of its 2-D attention mask, which ``_prepare_4d_causal_attention_mask_with_cache_position`` turns
      into masked KEYS for every query (their own rows included); their rows stay in the sequence,
      every later layer still computes them (so they cost what a kept token costs: ``Execution.
      tokens_per_layer`` and the FLOPs count them), and ``get_importance`` still runs PageRank over
      all rows, so their query rows pass mass on to the visible tokens and the uniform start is over
      all rows. The mask is kept for decoding (``attention_mask_cache``). Positions never change.
      ``visual_tokens_per_layer`` counts the visible visual tokens (what the layers attend to).

    Named alternatives (the old behaviour): ``dropped="removed"`` takes the dropped tokens out of the
    sequence (only live tokens take part in PageRank: Jaccard 0.947 and 0.973 against the code at a
    second stage on 2 of 3 shipped samples with a two-stage schedule; the answer is the same, as a
    masked key reaches no visible row); ``order="layout"`` keeps every merged token at its
    destination's original place in layout order.

    Layers: the code's first scoring layer 14 of 28 (half depth) is 16 of 32 (``first_layer``),
    8 layers of 12.5 % each; on a shallow decoder the layers fold (later count wins), capped so the
    last stage is before the decoder's last layer. Like the reference default, no visual token
    reaches the deepest layers (``kept_counts`` ends at 0; with masking they are still computed).

    Deviations: the released code merges only video frames (``get_2dPool``); the paper applies the
    same merging to images, which we do, over all visual tokens of the sample as one set (tiles not
    merged separately; the layout's separators stay in their places, the merged tokens follow the
    last visual token). The code's order needs the sequence re-numbered: under ``position="original"``,
    and on M-RoPE models (whose multi-axis ids cannot be re-numbered, see ``entry_position``), the
    merged tokens stay in layout order. Consecutive stages are exact: the scores for the stage before
    layer i+1 are layer i's attention with the keys that the stage before layer i drops hidden
    (renormalised; with ``dropped="removed"`` also their rows left out), which equals layer i's
    attention on that sequence. The temperature is applied to the probabilities
    ``LayerState.attention`` returns (``softmax(l / tau)`` is ``p ** (1 / tau)`` renormalised), exact
    up to float32 underflow of negligible probabilities. The layout's separators (image-newline
    tokens) are never dropped; the code ranks them with the visual tokens. Top-k ties: the lower
    index (the code's ``torch.sort`` leaves them open).
    """

    scored_by: ClassVar[str] = "text_attention"

    reference: ClassVar[str] = (
        "AIM: Adaptive Inference of Multi-Modal LLMs via Token Merging and Pruning (ICCV 2025, arXiv 2412.03248); "
        "github.com/LaVi-Lab/AIM llava/model/token_merge.py (bipartite_soft_matching_merge, r=n//2 then n//4), "
        "qwen2/modeling_qwen2.py (get_importance: PageRank on softmax(logits/0.1), 5 iterations, RMS over heads; "
        "retain_rate 1-(i-13)*0.125 from layer 14 of 28; pruned tokens masked as keys, still computed). Code "
        "followed: merged tokens in the code's order, re-numbered; dropped tokens masked. Merging applied to images "
        "(paper; the code merges video frames), merged count = budget, first scoring layer 16 of 32. "
        "dropped=removed: dropped tokens leave the sequence (the old behaviour); order=layout: merged tokens stay "
        "in layout order (the old behaviour).")

    first_layer: int = 16  # 14 of Qwen2-7B's 28 layers, on the 32-layer reference
    rate_step: float = 0.125
    temperature: float = 0.1
    iterations: int = 5
    damping: float = 0.0
    reference_steps: int | None = None  # None: merge down to n_keep; k: the code's k steps, budget ignored
    dropped: str = "masked"  # "masked": hidden as keys, still computed (the code); "removed": out of the sequence
    order: str = "code"  # "code": merged tokens in the code's order; "layout": in layout order

    def __post_init__(self):
        super().__post_init__()
        if self.reference_steps is not None and (isinstance(self.reference_steps, bool) or not isinstance(
                self.reference_steps, (int, np.integer)) or self.reference_steps < 0):
            raise ValueError(f"aim: reference_steps must be None (merge to the budget) or an int >= 0 (the code "
                             f"uses 2), got {self.reference_steps!r}")
        if isinstance(self.first_layer, bool) or not isinstance(self.first_layer, (int, np.integer)) \
                or self.first_layer < 1:
            raise ValueError(f"aim: first_layer must be an int >= 1 (reference 16 of 32), got {self.first_layer!r}")
        check_reference_layers("aim", "first_layer", int(self.first_layer))
        for name, low, high in (("rate_step", 0.0, 1.0), ("temperature", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
                raise ValueError(f"aim: {name} must be a number in ({low}, {high}], got {value!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)) \
                or self.iterations < 1:
            raise ValueError(f"aim: iterations must be an int >= 1 (reference 5), got {self.iterations!r}")
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 <= self.damping < 1:
            raise ValueError(f"aim: damping must be a number in [0, 1) (reference 0), got {self.damping!r}")
        if self.dropped not in DROP_POLICIES:
            raise ValueError(f"aim: dropped must be one of {DROP_POLICIES} (the code masks), got {self.dropped!r}")
        if self.order not in ORDERS:
            raise ValueError(f"aim: order must be one of {ORDERS} (the code's is 'code'), got {self.order!r}")

    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return (f"its in-LLM stages score a layer and prune before the next one, which needs at least 2 "
                    f"decoder layers; this one has {model.decoder_layers}")
        return None

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("visual_states", "llm", 0),)

    def steps(self, context: SelectionContext) -> list[int]:
        """Tokens removed by each bipartite step: down to ``n_keep``, or the code's own steps."""
        if self.reference_steps is None:
            return merge_steps(context.n_visual, context.n_keep)
        return code_steps(context.n_visual, self.reference_steps)

    def merged_count(self, context: SelectionContext) -> int:
        """Visual tokens entering the LLM: ``n_keep`` (1 when a budget of 0 asks for less than one
        bipartite step can leave), or what the code's steps leave."""
        return context.n_visual - sum(self.steps(context))

    def schedule(self, context: SelectionContext) -> tuple[tuple[int, int, int], ...]:
        return aim_schedule(context.require_model(), self.merged_count(context), self.first_layer, self.rate_step)

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return (self.merged_count(context),) + tuple(count for _, _, count in self.schedule(context))

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        x = context.signal(SignalNeed("visual_states", "llm", 0))
        kept, merges, order = merge_before_llm(x, self.steps(context))
        position = self.entry_position(context)
        if self.order == "code" and position == "reindex":
            stage = Stage(PRE_LLM, kept, None, position=position, appends=in_code_order(order, merges))
        else:
            stage = Stage(PRE_LLM, kept, None, tuple(merges), position)
        return self.plan(context, [stage])

    def layer_callback(self, context: SelectionContext):
        schedule = self.schedule(context)
        scoring = {score: (before, count) for score, before, count in schedule}
        counts = {before: count for _, before, count in schedule}
        n_visual = context.n_visual
        pending: dict[int, np.ndarray] = {}

        def callback(layer, state):
            alive = np.asarray(state.visual_indices, dtype=np.int64)
            stage = None
            if layer in counts:
                scores = pending.pop(layer)
                kept = top_k(scores, min(counts[layer], len(alive)), among=alive)
                stage = Stage(layer, tuple(int(i) for i in kept), tuple(scores), position="original",
                              dropped=self.dropped)
            if layer in scoring:
                # Layer ``layer``'s attention on the sequence it will actually see (after ``stage``): the
                # keys of the tokens ``stage`` drops hidden (masked: every row still a query; removed:
                # their rows left out too), renormalised by the PageRank's own row normalisation.
                visible = np.ones(state.n_rows, dtype=bool)
                visual_rows = np.asarray(state.visual_rows, dtype=np.int64)
                if stage is not None:
                    visible[visual_rows[~among(alive, stage.kept_array)]] = False
                nodes = np.arange(state.n_rows) if self.dropped == "masked" else np.flatnonzero(visible)
                probs = state.attention(torch.from_numpy(nodes))[:, :, nodes].double().cpu().numpy()  # [H, S', S']
                probs[:, :, ~visible[nodes]] = 0.0
                importance = pagerank_importance(probs, self.temperature, self.iterations, self.damping)
                place = np.full(state.n_rows, -1)
                place[nodes] = np.arange(len(nodes))
                live = visible[visual_rows]
                scores = np.full(n_visual, np.nan)
                scores[alive[live]] = importance[place[visual_rows[live]]]
                pending[scoring[layer][0]] = scores
            return stage

        return callback
