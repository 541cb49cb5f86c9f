"""TopV: rank the visual tokens by what they contribute to a layer's output under an optimal-transport
plan whose cost mixes feature distance with spatial distances, then recover a few pruned tokens evenly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.layout import VisualLayout
from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import POSITION_POLICIES, KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix, top_k
from workbench.pruning.registry import register_method


def visual_cost(sources: np.ndarray, targets: np.ndarray, layout: VisualLayout, spatial: float,
                central: float) -> np.ndarray:
    """[N, N] cost of moving source token i to target token j: feature distance ``1 - cos`` plus
    ``spatial`` x the distance between their boxes' centres and ``central`` x the distance of the
    source's centre from the image centre, both divided by the diagonal of the image extent."""
    boxes = np.asarray(layout.boxes, dtype=np.float64)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    low, high = boxes[:, :2].min(axis=0), boxes[:, 2:].max(axis=0)
    diagonal = float(np.linalg.norm(high - low)) or 1.0
    relative = np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1) / diagonal
    absolute = np.linalg.norm(centres - (low + high) / 2, axis=-1) / diagonal
    return (1.0 - cosine_matrix(sources, targets)) + spatial * relative + central * absolute[:, None]


def contributions(cost: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """The entropic transport plan between uniform source and target masses by Sinkhorn scaling,
    ending on the target side: ``iterations`` target-side scalings, each after the first preceded by
    a source-side one. The last step makes every target receive exactly 1/N, so the row sums say how
    much of the layer's output each source token supplies (with many rounds every row tends to 1/N)."""
    n, m = cost.shape
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    # Shift each column by its minimum: Sinkhorn's plan is unchanged, and exp stays finite.
    kernel = np.exp(-(cost - cost.min(axis=0, keepdims=True)) / epsilon)
    u, v = np.ones(n), np.ones(m)
    for step in range(iterations):
        if step:
            u = a / np.maximum(kernel @ v, 1e-300)
        v = b / np.maximum(kernel.T @ u, 1e-300)
    return u[:, None] * kernel * v[None, :]


def even_pick(candidates: np.ndarray, count: int) -> np.ndarray:
    """``count`` of the sorted ``candidates`` spread evenly over them (the middle of equal strides)."""
    if count <= 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    picks = np.floor((np.arange(count) + 0.5) * len(candidates) / count).astype(np.int64)
    return np.asarray(candidates, dtype=np.int64)[picks]


@register_method("topv")
@dataclass(frozen=True)
class TopV(PruningMethod):
    """TopV: Compatible Token Pruning with Inference Time Optimization for Fast and Low-Memory
    Multimodal Vision Language Model (Yang et al., arXiv 2503.18278, CVPR 2025). No code was
    released: this follows the paper's text and figure.

    In layer ``L_i`` (``layer=2`` on the 32-layer reference decoder, "following FastV"; placed as
    FastV's K with ``scaled_layer``) the visual tokens entering the layer are the SOURCES and the
    same tokens leaving it, normalised, the TARGETS. Pruning is an optimal-transport problem between
    them under a visual-aware cost (``visual_cost``): feature distance ``1 - cos(source_i,
    target_j)``, plus ``spatial`` x the relative spatial distance of the two tokens, plus ``central``
    x the source's absolute distance from the image centre. Sinkhorn scaling (``epsilon``,
    ``iterations``) gives the contribution matrix; a source's importance is its row sum, the share
    of the layer's output it supplies. The top tokens survive, and a share ``recover`` of the budget
    is given back to pruned tokens picked evenly over the image (in layout order) "to maintain
    structural integrity". The stage acts before layer K, positions kept (``position="original"``):
    pruning once in the prefill keeps the KV cache and FlashAttention usable, the paper's point.

    Where we had to choose (the paper's text available to us gives the design, not every
    constant): the targets are the layer's output after the decoder's FINAL norm (the recorded
    ``visual_states_normed`` entering layer K), standing in for the paper's "output after the
    Post-LN" of the same layer, and the sources the input normed the same way; distances are between
    the tokens' pixel-box centres over the diagonal of the image extent; both marginals are uniform
    and the plan ends on the target side (``contributions``), since a fully converged balanced plan
    gives every source the same row sum (after two rounds the rows are already nearly equal, so one
    round, a per-target softmax over the sources, is the default); ``spatial=central=1``,
    ``epsilon=0.1``, ``iterations=1``
    and ``recover=0.1`` are our defaults. The scores come from the unpruned forward, which is exact:
    nothing is pruned before layer K.
    """

    scored_by: ClassVar[str] = "similarity"

    reference: ClassVar[str] = (
        "TopV: Compatible Token Pruning with Inference Time Optimization (arXiv 2503.18278, CVPR 2025); paper "
        "only, no released code. At layer L_i=2 (FastV's K, scaled): sources = visual tokens entering the layer, "
        "targets = them leaving it after a norm; cost = (1 - cosine) + spatial * relative box distance + central * "
        "distance from the image centre; Sinkhorn plan, importance = a source's row sum; top tokens kept plus a "
        "share 'recover' of pruned tokens picked evenly; one stage before layer K, original positions. Ours: the "
        "final norm for the paper's Post-LN, uniform marginals with the plan ending on the target side, and the "
        "constants (spatial=central=1, epsilon=0.1, iterations=1, recover=0.1).")

    layer: int = 2
    spatial: float = 1.0
    central: float = 1.0
    epsilon: float = 0.1
    iterations: int = 1
    recover: float = 0.1
    position: str = "original"

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) or self.layer < 1:
            raise ValueError(f"topv: layer must be an int >= 1 (the paper uses 2), got {self.layer!r}")
        check_reference_layers("topv", "layer", int(self.layer))
        for name in ("spatial", "central"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"topv: {name} must be a number >= 0, got {value!r}")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) or not self.epsilon > 0:
            raise ValueError(f"topv: epsilon must be a number > 0, got {self.epsilon!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)) \
                or self.iterations < 1:
            raise ValueError(f"topv: iterations must be an int >= 1, got {self.iterations!r}")
        if isinstance(self.recover, bool) or not isinstance(self.recover, (int, float)) or not 0 <= self.recover < 1:
            raise ValueError(f"topv: recover must be a share in [0, 1), got {self.recover!r}")
        check_choice("topv", "position", self.position, POSITION_POLICIES)

    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 2:
            return f"TopV prunes inside the LLM and needs at least 2 decoder layers, this one has {model.decoder_layers}"
        return None

    def prune_layer(self, model: ModelFacts) -> int:
        return scaled_layer(self.layer, model.decoder_layers)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        k = self.prune_layer(model)
        return (SignalNeed("visual_states_normed", "llm", k - 1), SignalNeed("visual_states_normed", "llm", k))

    def importance(self, context: SelectionContext) -> np.ndarray:
        source_need, target_need = self.needs(context.require_model())
        sources, targets = context.signal(source_need), context.signal(target_need)
        if sources.shape[0] != context.n_visual or targets.shape[0] != context.n_visual:
            raise ValueError(f"topv: recorded {sources.shape[0]} sources / {targets.shape[0]} targets for "
                             f"{context.n_visual} visual tokens")
        cost = visual_cost(sources, targets, context.layout, float(self.spatial), float(self.central))
        return contributions(cost, float(self.epsilon), int(self.iterations)).sum(axis=1)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        importance = self.importance(context)
        n_keep = context.n_keep
        n_recover = min(int(round(self.recover * n_keep)), context.n_visual - n_keep)
        best = top_k(importance, n_keep - n_recover)
        pruned = np.setdiff1d(np.arange(context.n_visual), best)
        kept = np.union1d(best, even_pick(pruned, n_recover))
        return self.plan(context, [Stage(self.prune_layer(model), tuple(int(i) for i in kept), tuple(importance),
                                         position=self.position)])
