"""MMTok: keep the visual tokens that best cover both the text tokens and all visual tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix
from workbench.pruning.registry import register_method

VISION_SPACES = ("tower", "llm")
# P's rows (the text the visual tokens must cover): the question's keywords as the code embeds them
# (``probes.keywords``), or every text token after the image as it enters the decoder.
TEXT_SIGNALS = {"keywords": "question_keywords", "prompt": "text_states"}


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def greedy_max_coverage(coverage, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy maximum coverage: ``coverage`` [R, N] says how much candidate column j covers row r;
    a set covers row r by its best member. Each step adds the column with the largest gain
    sum_r max(coverage[r, j] - covered[r], 0) (ties: lower index). Returns (picks in order,
    [N] gain of each pick when picked, NaN for columns never picked)."""
    c = np.asarray(coverage, dtype=np.float64)
    n = c.shape[1]
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} tokens")
    covered = np.zeros(c.shape[0])
    taken = np.zeros(n, dtype=bool)
    gains = np.full(n, np.nan)
    picks = []
    for _ in range(k):
        gain = np.clip(c - covered[:, None], 0.0, None).sum(axis=0)
        pick = int(np.argmax(np.where(taken, -np.inf, gain)))
        picks.append(pick)
        gains[pick] = gain[pick]
        taken[pick] = True
        covered = np.maximum(covered, c[:, pick])
    return np.array(picks, dtype=np.int64), gains


@register_method("mmtok")
@dataclass(frozen=True)
class MMTok(PreLLMMethod):
    """MMTok (Dong et al.): before the LLM, keep the budget's worth of visual tokens chosen by
    greedy maximum coverage of two targets at once. Text->vision coverage P [T, N]: cosine of
    each text token's LLM input embedding with each projected visual token, softmax over the
    visual tokens at temperature ``tv_temperature``, divided by T. Vision->vision coverage Q [N, N]:
    cosine between visual tokens in ``vision_space``, softmax per row at ``vv_temperature``,
    divided by N, times ``alpha``. A set covers each row by its best member; each greedy step adds
    the token with the largest summed coverage gain (ties: lower index).

    ``vision_space="tower"`` (reference): Q on the features the projector receives (the tower's
    output at the projector feed layer, no [CLS]), read per tower view and folded onto the LLM's
    visual tokens by the layout's tower map (``workbench.tower_map.tower_features``: the mean of the
    patches each token owns -- tiles of LLaVA-NeXT/OneVision, Qwen2-VL's 2x2 merged patches,
    Idefics3's pixel shuffle; the identity on LLaVA-1.5); ``"llm"``: Q on the projected tokens.
    ``text="keywords"`` (the code's): P's rows are the question's keywords as the code builds them
    (``probes.keywords``: the user turn "<image>", a newline and the question, the two answer-format
    instructions deleted, stop words dropped, the words tokenised pre-split, no BOS, rows of the
    decoder's input embedding table); ``"prompt"``: every text token after the image (question and
    answer prompt) as it enters the decoder."""

    scored_by: ClassVar[str] = "similarity"

    alpha: float = 0.5
    tv_temperature: float = 0.02
    vv_temperature: float = 0.2
    vision_space: str = "tower"
    text: str = "keywords"

    reference: ClassVar[str] = (
        "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (arXiv 2508.18264); "
        "Ironieser/MMTok, mmtok/core/semantic_selector.py (mm_coverage_selection, greedy_merged_jit_kernel), "
        "mmtok/core/mmtok_core.py, mmtok/llava/clip_encoder_mmtok.py and llava_inject.py (defaults alpha=0.5, "
        "softmax_tv_temperature=0.02, softmax_vv_temperature=0.2). Paper: a submodular maximum-coverage objective "
        "over text and vision; code fixes it as Combined=[softmax(P/0.02)/m ; alpha*softmax(Q/0.2)/n] with P on "
        "projected vision tokens vs LLM token embeddings of the question keywords (mmtok/core/text_processor.py "
        "extract_keywords_simple, mmtok_core.py _encode_text_with_token_pooling), Q on CLIP hidden_states[-2] "
        "(pre-projector). We follow the code; text='prompt' covers every text token after the image instead."
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("alpha", "tv_temperature", "vv_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"mmtok: {name} must be a finite number, got {value!r}")
        if self.alpha < 0:
            raise ValueError(f"mmtok: alpha must be >= 0, got {self.alpha}")
        if self.tv_temperature <= 0 or self.vv_temperature <= 0:
            raise ValueError("mmtok: temperatures must be > 0, got "
                             f"tv={self.tv_temperature}, vv={self.vv_temperature}")
        check_choice("mmtok", "vision_space", self.vision_space, VISION_SPACES)
        check_choice("mmtok", "text", self.text, tuple(TEXT_SIGNALS))

    def _vision_need(self, model: ModelFacts) -> SignalNeed:
        if self.vision_space == "tower":
            return SignalNeed("visual_states_out", "tower", model.projector_feed_tower_layer)
        return SignalNeed("visual_states", "llm", 0)

    def _text_need(self) -> SignalNeed:
        return SignalNeed(TEXT_SIGNALS[self.text], "llm", 0)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return tuple(sorted({SignalNeed("visual_states", "llm", 0), self._text_need(),
                             self._vision_need(model)}))

    def _vision_features(self, context: SelectionContext) -> np.ndarray:
        """[N, D] features of the visual tokens in ``vision_space``. The tower's are read per tower view
        (crop, tile, frame) and folded onto the layout's tokens by its tower map (the mean of the patches
        each token owns: the identity on LLaVA-1.5-style towers)."""
        try:
            return context.features(self._vision_need(context.require_model()))
        except ValueError as error:
            raise ValueError(f"mmtok: the tower features cannot be placed on the {context.n_visual} visual "
                             f"tokens ({error}); use vision_space='llm'") from error

    def select(self, context: SelectionContext) -> KeepPlan:
        n = context.n_visual
        projected = context.signal(SignalNeed("visual_states", "llm", 0))
        text = context.signal(self._text_need())
        vision = self._vision_features(context)
        if projected.shape[0] != n:
            raise ValueError(f"mmtok: {projected.shape[0]} recorded visual states for {n} visual tokens")
        rows = []
        if len(text):
            rows.append(_softmax_rows(cosine_matrix(text, projected) / self.tv_temperature) / len(text))
        rows.append(self.alpha * _softmax_rows(cosine_matrix(vision) / self.vv_temperature) / n)
        picks, gains = greedy_max_coverage(np.concatenate(rows, axis=0), context.n_keep)
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(int(i) for i in picks)), tuple(gains), position=self.entry_position(context))])
