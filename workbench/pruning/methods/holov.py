"""HoloV: share the budget among runs of the visual-token sequence ("crops") by a holistic score
(attention + within-crop similarity variance), then keep each crop's top tokens by attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.methods.cls_attention import REFERENCE_FEED_LAYER, cls_need, row_scores, tower_layer
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

PROJECTED = SignalNeed("visual_states", "llm", 0)
EPS = 1e-6  # the reference's ``esp``
ATTENTION_SCALE = 1e3  # the reference scales attention by 1e3 (it cancels against the variance scaling)


def chunk_count(n_tokens: int, n_keep: int) -> int:
    """The reference's number of crops for a budget: ``max(1, int((1024 / 576) * N / keep))`` (its
    Qwen2.5-VL port; 16 for LLaVA-1.5's 576 tokens at 64, the only setting its LLaVA code ships)."""
    return max(1, int(((1024 / 576) * n_tokens) / n_keep))


def chunks(n_tokens: int, n_chunks: int) -> list[np.ndarray]:
    """Contiguous runs of the token sequence: ``N // n`` tokens each, the first ``N % n`` one more;
    empty runs are dropped."""
    size, extra = divmod(n_tokens, n_chunks)
    out, start = [], 0
    for p in range(n_chunks):
        end = start + size + (1 if p < extra else 0)
        if end > start:
            out.append(np.arange(start, end))
        start = end
    return out


def crop_score(features: np.ndarray, attention: np.ndarray, alpha: float) -> float:
    """One crop's holistic score: the mean over its tokens of ``1e3 * attention + alpha * variance``,
    the variance being of each token's cosine similarities to the crop (its own entry zeroed and
    counted, divided by n - 1, as the reference), rescaled to the mean magnitude of the scaled
    attention. A crop of one token scores its plain attention (the reference's special case)."""
    n = len(attention)
    if n <= 1:
        return float(attention.mean()) if n else 0.0
    unit = features / (np.linalg.norm(features, axis=1, keepdims=True) + EPS)
    s = unit @ unit.T
    np.fill_diagonal(s, 0.0)
    mean = s.sum(axis=1) / (n - 1)
    variance = ((s - mean[:, None]) ** 2).sum(axis=1) / (n - 1)
    scaled = attention * ATTENTION_SCALE
    variance = variance * (np.abs(scaled).mean() / (np.abs(variance).mean() + EPS))
    return float((scaled + alpha * variance).mean())


OVERFLOWS = ("drop", "reallocate")


def allocate(scores, total: int, caps, overflow: str = "reallocate") -> list[int]:
    """The reference's allocation: ``floor(w * total)`` with ``w = s / (sum s + 1e-6)``, then one more
    token to each of the ``remaining`` highest-weight crops (ties: the earlier crop). A crop allotted
    more than it holds keeps all its tokens; its overflow is lost (``"drop"``, the reference, which
    then pads with zero embeddings) or allocated the same way among the crops with room
    (``"reallocate"``)."""
    scores = np.asarray(scores, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    shares = np.zeros(len(scores), dtype=np.int64)
    left = int(total)
    while left > 0:
        open_ = np.flatnonzero(shares < caps)
        w = scores[open_] / (scores[open_].sum() + EPS)
        add = np.floor(w * left).astype(np.int64)
        extra = left - int(add.sum())
        order = np.lexsort((np.arange(len(open_)), -w))
        add[order[: min(extra, len(open_))]] += 1
        room = caps[open_] - shares[open_]
        shares[open_] += np.minimum(add, room)
        if overflow == "drop":
            break
        left = int(total - shares.sum())
        if left > 0 and not (shares < caps).any():
            raise ValueError(f"cannot keep {total} tokens out of {int(caps.sum())}")
    return [int(s) for s in shares]


@register_method("holov")
@dataclass(frozen=True)
class HoloV(PreLLMMethod):
    """HoloV, before the LLM:

    1. Crops: the visual tokens in sequence order are cut into ``n`` contiguous runs (``chunks``);
       ``n = num_patches`` when given, else the reference's budget rule ``chunk_count``.
    2. Crop score (``crop_score``): mean of ``1e3 * attention + alpha * rescaled similarity variance`` of
       the crop's projected tokens (the LLM input embeddings, as the code: after the projector).
    3. Allocation (``allocate``): the budget in proportion to the crop scores; each crop keeps its
       share of tokens with the highest attention (ties: lower index).

    As the code is written, the variance is rescaled per crop to the crop's mean scaled attention before
    the crop's mean is taken, so a crop's score equals ``(1 + alpha) * 1e3 * its mean attention`` whenever
    its similarity variance is not zero: the variance term does not change the allocation (we reproduce
    this; see the tests).

    Attention: with a [CLS] tower, the head-mean [CLS] row at the projector-feed layer (``attentions[-2]``
    in the LLaVA code); without one, the attention each token receives, head mean and mean over query
    rows, at the last tower layer (the reference's Qwen2.5-VL port), folded onto the layout's tokens by
    the tower map (the mean over a merged token's patches, as the port).

    Paper vs code: the paper distributes the budget "across different spatial crops"; the code's crops are
    contiguous runs of the flattened token sequence (36 tokens = 1.5 rows of LLaVA-1.5's 24x24 grid; on
    LLaVA-NeXT the thumbnail then the unpadded tiles, newlines excluded). We follow the code. Its LLaVA code
    hard-codes 16 crops and 64 tokens; its Qwen2.5-VL port derives the count from the budget (16 at 64 of
    576); we use the port's rule by default. Where a crop is allotted more tokens than it holds, the
    reference drops the overflow (``overflow="drop"``, the default: fewer tokens than the budget are
    kept) and pads the sequence with zero embeddings, which a plan cannot insert (not reproduced);
    ``overflow="reallocate"`` gives the overflow to the other crops by the same rule and keeps exactly
    the budget. The reference also orders each crop's kept tokens by attention in the sequence; the
    executor keeps the layout order (same kept set). ``Stage.scores``: the attention.
    """

    scored_by: ClassVar[str] = "visual_attention"

    reference: ClassVar[str] = (
        "Zou et al., 'Don't Just Chase \"Highlighted Tokens\" in MLLMs: Revisiting Visual Holistic Context "
        "Retention' (HoloV, NeurIPS 2025), arXiv:2510.02912. Code: github.com/obananas/HoloV, llava/model/utils.py "
        "(HoloV: contiguous chunks, 1e3 * attention + 0.09 * rescaled similarity variance, floor + top-weight "
        "allocation, per-chunk top-k by attention), llava/model/llava_arch.py (num_patches=16, 64 tokens; "
        "projected features) and qwen-model-HoloV/ (chunk count max(1, int(1024/576 * N / keep)); last-layer "
        "received attention without [CLS]). The paper speaks of spatial crops, the code cuts the token sequence "
        "(followed); a crop's overflow is dropped as the code (its zero-embedding padding is not inserted); "
        "overflow='reallocate' keeps exactly the budget.")

    alpha: float = 0.09
    num_patches: int | None = None
    overflow: str = "drop"

    def __post_init__(self):
        super().__post_init__()
        check_choice("holov", "overflow", self.overflow, OVERFLOWS)
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha < 0:
            raise ValueError(f"holov: alpha must be a finite number >= 0, got {self.alpha!r}")
        if self.num_patches is not None and (isinstance(self.num_patches, bool)
                                             or not isinstance(self.num_patches, (int, np.integer))
                                             or self.num_patches < 1):
            raise ValueError(f"holov: num_patches must be None (the reference's budget rule) or an int >= 1, "
                             f"got {self.num_patches!r}")

    def attention_need(self, model: ModelFacts) -> SignalNeed:
        if model.has_cls_token:
            return cls_need(tower_layer(REFERENCE_FEED_LAYER, model))
        return SignalNeed("attention", "tower", model.vision_layers - 1, "mean")

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return tuple(sorted({self.attention_need(model), PROJECTED}))

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        n, n_keep = context.n_visual, context.n_keep
        attention = row_scores(context, self.attention_need(model))
        features = context.signal(PROJECTED)
        if features.shape[0] != n:
            raise ValueError(f"holov: {features.shape[0]} recorded visual states for {n} tokens")
        kept: list[int] = []
        if n_keep > 0:
            runs = chunks(n, self.num_patches or chunk_count(n, n_keep))
            scores = [crop_score(features[run], attention[run], self.alpha) for run in runs]
            for run, k in zip(runs, allocate(scores, n_keep, [len(r) for r in runs], self.overflow)):
                kept += [int(i) for i in top_k(attention, k, among=run)]
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), tuple(attention), position=self.entry_position(context))])
