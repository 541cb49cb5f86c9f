"""CDPruner: instruction-conditioned similarity kernel, tokens chosen by greedy MAP inference of a
determinantal point process (maximum conditional diversity), before the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import MethodNotApplicable, ModelFacts, PreLLMMethod, SelectionContext, SignalNeed
from workbench.pruning.methods.cls_attention import group_members, size_shares
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix
from workbench.pruning.registry import register_method

PROJECTED = SignalNeed("visual_states", "llm", 0)
TEXT = SignalNeed("text_states", "llm", 0)
EXHAUSTED = 1e-10  # a conditional gain at or below this: the kernel has no volume left


def relevance_scores(visual, text, negate: bool = False, theta: float | None = None) -> np.ndarray:
    """[N] instruction relevance: the mean over text rows of the cosine with each visual token
    (negated when ``negate``), min-max normalised as the reference, ``(r - min + 1e-6) / (max - min)``
    (all ones when every token ties); with ``theta`` the reference's optional
    ``exp(theta / (2 * (1 - theta)) * r)``."""
    r = cosine_matrix(visual, text).mean(axis=1)
    if negate:
        r = -r
    spread = r.max() - r.min()
    r = (r - r.min() + 1e-6) / spread if spread > 0 else np.ones_like(r)
    if theta is not None:
        r = np.exp(theta / (2.0 * (1.0 - theta)) * r)
    return r


def greedy_dpp(kernel, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fast greedy MAP inference of a DPP (Chen et al. 2018, the reference's loop): each step picks the
    candidate with the largest conditional gain ``d_j^2`` (the kernel diagonal minus its projection on
    the picked tokens; ties: lower index), then updates every gain by the incremental Cholesky row.
    Once no candidate has a gain above ``EXHAUSTED`` (k beyond the kernel's rank), the rest are taken
    by their kernel diagonal (ties: lower index). Returns (picks in order, [n] gain at pick, NaN else)."""
    L = np.asarray(kernel, dtype=np.float64)
    n = len(L)
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} tokens")
    gains = np.diag(L).copy()
    rows = np.zeros((k, n))
    taken = np.zeros(n, dtype=bool)
    scores = np.full(n, np.nan)
    picks: list[int] = []
    for i in range(k):
        candidate = np.where(taken, -np.inf, gains)
        j = int(np.argmax(candidate))
        if candidate[j] <= EXHAUSTED:
            rest = np.flatnonzero(~taken)
            order = rest[np.lexsort((rest, -np.diag(L)[rest]))][: k - i]
            scores[order] = np.maximum(gains[order], 0.0)
            picks += [int(t) for t in order]
            break
        picks.append(j)
        scores[j] = gains[j]
        taken[j] = True
        e = (L[j] - rows[:i, j] @ rows[:i]) / math.sqrt(gains[j])
        rows[i] = e
        gains = gains - e ** 2
    return np.array(picks, dtype=np.int64), scores


@register_method("cdpruner")
@dataclass(frozen=True)
class CDPruner(PreLLMMethod):
    """CDPruner. Before the LLM:

    1. Similarity S: cosine between the projected visual tokens (the LLM input embeddings), as the code.
    2. Relevance r: each visual token's cosine with the instruction, averaged over the instruction's
       embeddings, min-max normalised (``relevance_scores``).
    3. Kernel ``L = diag(r) S diag(r)``; the budget's tokens by greedy MAP inference of the DPP
       (``greedy_dpp``), per token group (crop) with its share of the budget by size.

    Instruction embedding (deviation, documented): the reference embeds the question (answer-format
    sentence removed) with CLIP's text tower and compares it with the CLIP-projected patch features
    (``visual_projection(post_layernorm(hidden_states[-2]))``). Our models carry no CLIP text tower, so
    the closest faithful substitute the recording offers is used: the text tokens after the image as
    embedded at the LLM input (``text_states`` at layer 0) against the projected visual tokens, the
    space in which the projector aligned vision with the LLM's text embeddings; relevance is the mean
    over those text tokens (not over 77-token CLIP segments) and, lacking token strings, includes the
    answer-format prompt and chat-template tokens.

    Sign (paper vs code): the paper scores relevance by the cosine; the code negates it
    (``(-relevance).mean``, llava_arch.py line 159), which the authors attribute to a phenomenon they
    observed in CLIP's penultimate-layer features (issues #14 / #19 of the reference repository). The
    default is the code's sign (``negate_relevance=True``); ``negate_relevance=False`` is the paper's.
    ``theta`` (None = off, as the code) is the code's commented-out exponential weighting.

    Deviations: on multi-crop (LLaVA-NeXT) layouts the reference normalises relevance min-max over
    every patch of every view (base image and crops, the crops' padding patches included), keeps the
    same count T in every view and passes the crops' kept patches on in raster order of the padded
    stitched grid, without unpadding or newlines (llava_arch.py lines 141-208, 248-255); we normalise
    over the layout's visual tokens and share the budget among its groups by size, because a method
    reads no projected features of the padding patches. When the kernel's rank is below the budget (small feature dimension) the reference would
    divide by zero; we take the remaining tokens by their kernel diagonal (relevance^2). A sample
    without text after the image is refused (MethodNotApplicable). ``Stage.scores``: the conditional
    gain of each kept token when picked.
    """

    scored_by: ClassVar[str] = "similarity"

    reference: ClassVar[str] = (
        "Zhang et al., 'Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in "
        "MLLMs' (CDPruner), arXiv:2506.10967. Code: github.com/Theia-4869/CDPruner, llava/model/llava_arch.py "
        "(encode_images: cosine of mm_projector outputs, relevance = min-max of -mean cosine with CLIP text "
        "embeds, kernel r S r, fast greedy MAP loop) and llava/model/multimodal_encoder/clip_encoder.py "
        "(CLIP text tower, visual_projection of hidden_states[-2]). Deviation: no CLIP text tower here, so the "
        "instruction is the text tokens' LLM input embeddings vs the projected visual tokens. Relevance sign: the "
        "code's negation by default; negate_relevance=False is the paper's sign.")

    negate_relevance: bool = True
    theta: float | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.negate_relevance, bool):
            raise ValueError(f"cdpruner: negate_relevance must be True or False, got {self.negate_relevance!r}")
        if self.theta is not None and (isinstance(self.theta, bool) or not isinstance(self.theta, (int, float))
                                       or not 0.0 <= self.theta < 1.0):
            raise ValueError(f"cdpruner: theta must be None or a number in [0, 1), got {self.theta!r}")

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (TEXT, PROJECTED)

    def select(self, context: SelectionContext) -> KeepPlan:
        visual = context.signal(PROJECTED)
        text = context.signal(TEXT)
        if visual.shape[0] != context.n_visual:
            raise ValueError(f"cdpruner: {visual.shape[0]} recorded visual states for {context.n_visual} tokens")
        if len(text) == 0:
            raise MethodNotApplicable("cdpruner: no text token after the image to condition on")
        relevance = relevance_scores(visual, text, self.negate_relevance, self.theta)
        similarity = cosine_matrix(visual)
        kernel = relevance[:, None] * similarity * relevance[None, :]
        scores = np.full(context.n_visual, np.nan)
        kept = []
        for members, share in zip(group_members(context.layout), size_shares(context.layout, context.n_keep)):
            if share == 0:
                continue
            picks, gains = greedy_dpp(kernel[np.ix_(members, members)], share)
            kept += [int(members[p]) for p in picks]
            scores[members] = np.where(np.isnan(gains), scores[members], gains)
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(kept)), tuple(scores), position=self.entry_position(context))])
