"""CDPruner: instruction-conditioned similarity kernel, tokens chosen by greedy MAP inference of a
determinantal point process (maximum conditional diversity), before the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from probes.projected import PROJECTED_PATCHES
from workbench.pruning import clip_relevance
from workbench.pruning.method import MethodNotApplicable, ModelFacts, PreLLMMethod, SelectionContext, SignalNeed
from workbench.pruning.methods.cls_attention import check_crop_rule, group_members, per_view_count, size_shares
from workbench.pruning.padded_grid import PaddedGrid, code_sequence, padded_grid
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix
from workbench.pruning.registry import register_method
from workbench.tower_map import tower_views

PROJECTED = SignalNeed("visual_states", "llm", 0)  # the visual tokens' LLM input rows: the projector's outputs
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


def projected_patches_need(model: ModelFacts) -> SignalNeed:
    """Every tower patch's projected feature, per view, padding patches included (``probes.projected``)."""
    return SignalNeed(PROJECTED_PATCHES, "tower", model.projector_feed_tower_layer)


def feed_need(model: ModelFacts) -> SignalNeed:
    """The tower's patch features at the projector's feed layer (``hidden_states[projector_feed_layer]``)."""
    if model.projector_feed_layer == 0:
        return SignalNeed("visual_states", "tower", 0)
    return SignalNeed("visual_states_out", "tower", model.projector_feed_tower_layer)


@register_method("cdpruner")
@dataclass(frozen=True)
class CDPruner(PreLLMMethod):
    """CDPruner. Before the LLM:

    1. Similarity S: cosine between the projected visual tokens (the ``mm_projector`` outputs), as the code.
    2. Relevance r: each visual token's cosine with the instruction, averaged over the instruction's
       embeddings, negated (the code's sign), min-max normalised (``relevance_scores``).
    3. Kernel ``L = diag(r) S diag(r)``; the tokens by greedy MAP inference of the DPP (``greedy_dpp``).

    Multi-crop layouts (LLaVA-NeXT, AnyRes), ``crops="reference"`` (the default), as the code
    (llava_arch.py lines 141-187 on the views concatenated at lines 199-203, lines 208 and 249-255): S and r are
    taken on the projected features of every patch of every view (the base image, each crop, the
    crops' padding patches included; the recorded tower signal ``projected_patches``), r min-max
    normalised over all of them at once; each view runs the greedy MAP on its own kernel with the same
    count T (``visual_token_num``, the budget's ratio of a view, ``per_view_count``); the LLM gets the
    base view's chosen patches, then the crops' on the PADDED stitched grid in raster order, no
    unpadding, no newline (the code drops ``_unpad`` from the merge type): a chosen padding patch
    enters as its projected tower feature at its raster place (``padded_patch``, ``code_sequence``) and
    the layout's newlines are left out (``separators="dropped"``). ``kept_counts`` says how many tokens
    that is (every view's T, not the budget). ``crops="budget"`` (the old rule, a deviation): the LLM
    input's visual tokens, r normalised over them, each token group (base view, stitched unpadded
    tiles) with its share of exactly the budget by size, in the model's own arrangement (Jaccard
    0.54-0.76 against the code on the tiny LLaVA-NeXT). The code has no path for a multi-view layout
    that is not LLaVA-NeXT's stitched crop grid (LLaVA-OneVision pools its crops); there that rule runs.

    Instruction embedding: the code embeds the question (answer-format sentence removed) with CLIP's
    text tower, in 77-token segments, and compares it with the CLIP-projected patch features
    (``visual_projection(post_layernorm(hidden_states[-2]))``, clip_encoder.py). ``clip=PATH`` (a
    local CLIP checkpoint saved with transformers' ``CLIPModel.save_pretrained``, with its tokenizer:
    the one the model's tower came from) does exactly that (``workbench.pruning.clip_relevance``; the
    recorded feed-layer patch features through that checkpoint's ``post_layernorm`` and
    ``visual_projection``, the question from the recording). Our models carry no CLIP text tower, so
    without it (``clip=None``, the default, a deviation) the closest substitute the recording offers
    stands in: the text tokens after the image as embedded at the LLM input (``text_states`` at layer
    0) against the projected visual tokens, the space in which the projector aligned vision with the
    LLM's text embeddings; relevance is then the mean over those text tokens (not over CLIP segments)
    and, lacking token strings, includes the answer-format prompt and chat-template tokens.

    Sign (paper vs code): the paper scores relevance by the cosine; the code negates it
    (``(-relevance).mean``, llava_arch.py line 159), which the authors attribute to a phenomenon they
    observed in CLIP's penultimate-layer features (issues #14 / #19 of the reference repository). The
    default is the code's sign (``negate_relevance=True``); ``negate_relevance=False`` is the paper's.
    ``theta`` (None = off, as the code) is the code's commented-out exponential weighting.

    On a single-view layout (LLaVA-1.5, the shipped model) ``crops`` changes nothing and the code and the
    default differ only in the instruction embedding (the stand-in unless ``clip`` is given). When the
    kernel's rank is below a view's count (small feature dimension) the reference would divide by
    zero; we take the remaining tokens by their kernel diagonal (relevance^2).
    Without ``clip``, a sample without text after the image is refused (MethodNotApplicable).
    ``Stage.scores``: the conditional gain of each kept token when picked.
    """

    scored_by: ClassVar[str] = "similarity"

    reference: ClassVar[str] = (
        "Zhang et al., 'Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in "
        "MLLMs' (CDPruner), arXiv:2506.10967. Code: github.com/Theia-4869/CDPruner, llava/model/llava_arch.py "
        "(encode_images: cosine of mm_projector outputs, relevance = min-max of -mean cosine with CLIP text "
        "embeds, kernel r S r, fast greedy MAP loop; multi-crop lines 141-187, 199-208, 249-255: every view of "
        "the image at once, padding patches included, r normalised over all of them, the same count T per view, the base view's "
        "patches then the crops' on the padded stitched grid in raster order, no unpadding, no newlines; "
        "crops=budget: per-group shares of the LLM input's tokens) and llava/model/multimodal_encoder/clip_encoder.py "
        "(CLIP text tower on the question in 77-token segments, visual_projection(post_layernorm(hidden_states[-2]))): "
        "clip=PATH uses a local CLIP checkpoint's, as the code; without it (the default, a deviation: no CLIP text "
        "tower in these models) the instruction is the text tokens' LLM input embeddings vs the projected visual "
        "tokens. Relevance sign: the code's negation by default; negate_relevance=False is the paper's sign.")

    negate_relevance: bool = True
    theta: float | None = None
    crops: str = "reference"
    clip: str | None = None

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.negate_relevance, bool):
            raise ValueError(f"cdpruner: negate_relevance must be True or False, got {self.negate_relevance!r}")
        if self.theta is not None and (isinstance(self.theta, bool) or not isinstance(self.theta, (int, float))
                                       or not 0.0 <= self.theta < 1.0):
            raise ValueError(f"cdpruner: theta must be None or a number in [0, 1), got {self.theta!r}")
        check_crop_rule("cdpruner", self.crops)
        if self.clip is not None:
            clip_relevance.check_checkpoint("cdpruner", self.clip)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        # every tower patch's projected feature for the multi-crop code path (a multi-view model under
        # crops="reference"); the LLM input's visual rows for every other layout
        text = (feed_need(model),) if self.clip is not None else (TEXT,)
        crops = (projected_patches_need(model),) if model.multi_view and self.crops == "reference" else ()
        return text + (PROJECTED,) + crops

    def code_grid(self, context: SelectionContext) -> PaddedGrid | None:
        """The padded stitched grid of the code's multi-crop path (``crops="reference"`` on a multi-view
        layout with LLaVA-NeXT's stitched crops), None where the layout's own tokens are selected among."""
        if self.crops != "reference" or not context.require_model().multi_view or len(context.layout.tower_owner) < 2:
            return None
        return padded_grid(context.layout)

    def relevance(self, context: SelectionContext, visual: np.ndarray, clip_features=None) -> np.ndarray:
        """[rows of ``visual``] normalised relevance: against CLIP's text embeddings of the question from
        ``clip_features`` (the feed-layer tower features of the same rows) under ``clip``, else against
        the text after the image at the LLM input."""
        if self.clip is not None:
            question = getattr(getattr(context.recording, "identity", None), "question", "")
            if not question:
                raise MethodNotApplicable("cdpruner: clip needs the sample's question, and the recording has none")
            text = clip_relevance.text_embeds(self.clip, question)
            visual = clip_relevance.image_embeds(self.clip, clip_features)
        else:
            text = context.signal(TEXT)
            if len(text) == 0:
                raise MethodNotApplicable("cdpruner: no text token after the image to condition on")
        return relevance_scores(visual, text, self.negate_relevance, self.theta)

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        if self.code_grid(context) is not None:  # every view's own count T (``select_views``)
            sizes = [len(owner) for owner in context.layout.tower_owner]
            return (sum(min(per_view_count(context.layout, context.n_keep, size), size) for size in sizes),)
        return (context.n_keep,)

    def select_views(self, context: SelectionContext, grid: PaddedGrid) -> KeepPlan:
        """The code's multi-crop rule on every patch of every view, and its LLM sequence (``code_sequence``)."""
        layout, model = context.layout, context.require_model()
        need = projected_patches_need(model)
        views = tower_views(context.recording, layout, need.signal, need.layer, need.rows)
        clip_features = None
        if self.clip is not None:
            feed = feed_need(model)
            clip_features = np.concatenate(tower_views(context.recording, layout, feed.signal, feed.layer, feed.rows))
        relevance = self.relevance(context, np.concatenate(views), clip_features)  # one min-max over every view
        scores = np.full(context.n_visual, np.nan)
        chosen, start = {}, 0
        for view, (features, owner) in enumerate(zip(views, layout.tower_owner)):
            r = relevance[start:start + len(features)]
            start += len(features)
            kernel = r[:, None] * cosine_matrix(features) * r[None, :]
            picks, gains = greedy_dpp(kernel, min(per_view_count(layout, context.n_keep, len(features)), len(features)))
            chosen[view] = np.sort(picks)
            scored = (owner >= 0) & ~np.isnan(gains)
            scores[owner[scored]] = gains[scored]
        kept, appends = code_sequence(layout, grid, chosen)
        return self.plan(context, [Stage(PRE_LLM, kept, tuple(scores), position=self.entry_position(context),
                                         appends=appends, separators="dropped")])

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        grid = self.code_grid(context)
        if grid is not None:
            return self.select_views(context, grid)
        visual = context.signal(PROJECTED)
        if visual.shape[0] != context.n_visual:
            raise ValueError(f"cdpruner: {visual.shape[0]} recorded visual states for {context.n_visual} tokens")
        clip_features = context.features(feed_need(model)) if self.clip is not None else None
        relevance = self.relevance(context, visual, clip_features)
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
