"""MMTok: keep the visual tokens that best cover both the text tokens and all visual tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from probes.keywords import QUESTION_KEYWORDS, QUESTION_TEXT
from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.ranking import cosine_matrix
from workbench.pruning.registry import register_method

VISION_SPACES = ("tower", "llm")
# P's rows (the text the visual tokens must cover): "code" the text of the model family's path in the
# code (``CODE_PATHS``); "keywords" / "question" one path's text (``probes.keywords``) on every family;
# "prompt" every text token after the image as it enters the decoder.
TEXT_SIGNALS = {"keywords": QUESTION_KEYWORDS, "question": QUESTION_TEXT, "prompt": "text_states"}
TEXT_CHOICES = ("code", *TEXT_SIGNALS)
COUNT_RULES = ("code", "budget")


@dataclass(frozen=True)
class CodePath:
    """What MMTok's code does on one model path, where the paths differ."""

    text: str  # the recorded text signal it embeds (``probes.keywords.TEXT_RULES``)
    tv_temperature: float  # softmax temperature of the text->vision coverage
    floor_fraction: bool  # a fractional budget keeps ``int(ratio * N)`` (else the workbench's n_keep)


# LLaVA path: mmtok/llava/llava_inject.py (``mmtok``: softmax_tv_temperature 0.02, an absolute
# target_vision_tokens) and mmtok_core.py ``apply_selection`` (the question's keywords).
LLAVA_PATH = CodePath(QUESTION_KEYWORDS, 0.02, floor_fraction=False)
# Qwen2.5-VL path: mmtok/qwen/qwen2_5_vl_mmtok.py (``mmtok_qwen2_5_vl``: softmax_tv_temperature 0.01),
# qwen2_5_VLmodel_mmtok.py (``int(retain_ratio * N)`` tokens) and mmtok_core.py
# ``apply_selection_preprocess_qwen`` ("Question: " + the question, unfiltered).
QWEN_PATH = CodePath(QUESTION_TEXT, 0.01, floor_fraction=True)
# Keyed by ``ModelFacts.family``. The code has paths for LLaVA-1.5, LLaVA-NeXT and Qwen2.5-VL;
# Qwen2-VL shares the project's "qwen2_vl" family with Qwen2.5-VL and takes its path. The families
# the code has no path for (LLaVA-OneVision, Idefics3 / SmolVLM) take the LLaVA path.
CODE_PATHS: dict[str, CodePath] = {"llava": LLAVA_PATH, "llava_next": LLAVA_PATH, "qwen2_vl": QWEN_PATH}


def code_path(model: ModelFacts | None) -> CodePath:
    """The code's path for ``model`` (the LLaVA path without model facts or for a family it has none for)."""
    return CODE_PATHS.get(model.family, LLAVA_PATH) if model is not None else LLAVA_PATH


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
    the token with the largest summed coverage gain (ties: lower index). The text, the text->vision
    temperature and the kept count follow the code's path for the model's family (LLaVA or Qwen).

    The code takes a path per model (``CODE_PATHS``, keyed by the adapter's family), and the
    defaults follow the path of the model the method runs on:

    - LLaVA path (LLaVA-1.5, LLaVA-NeXT; also LLaVA-OneVision, Idefics3 and SmolVLM, which the code
      has no path for): P's rows are the question's keywords (``probes.keywords``: the user turn
      "<image>", a newline and the question, the two answer-format instructions deleted, stop words
      dropped), ``tv_temperature`` 0.02, the budget's count (the code takes a count).
    - Qwen2.5-VL path (also Qwen2-VL, the same family here, which the code has no entry point for):
      P's rows are "Question: " and the question, unfiltered (no stop words dropped, the answer-format
      instruction kept), ``tv_temperature`` 0.01, and a fractional budget keeps ``int(budget * N)``
      (the code's ``int(retain_ratio * N)``, floored; a count is kept as given).

    On both paths the text is tokenised as pre-split words, a leading BOS dropped, and its rows are
    the decoder's input embedding table. Q is the same on both: on Qwen the code means the last tower
    block's output (before the merger's norm) over each token's 2x2 patches and restores the window
    order, which is what ``vision_space="tower"`` reads there.

    ``text``: "code" (default, the path's text), "keywords" (the LLaVA path's keywords on every
    family: the default before the Qwen path was followed), "question" (the Qwen path's text on every
    family), "prompt" (every text token after the image, question and answer prompt, as it enters
    the decoder). ``tv_temperature``: None (default) is the path's; a number overrides it. ``count``:
    "code" (default, the path's rule) or "budget" (the workbench's half-up ``n_keep`` everywhere).
    ``mmtok:text=keywords,tv_temperature=0.02,count=budget`` is the old behaviour on Qwen.

    ``vision_space="tower"`` (reference): Q on the features the projector receives (the tower's
    output at the projector feed layer, no [CLS]), read per tower view and folded onto the LLM's
    visual tokens by the layout's tower map (``workbench.tower_map.tower_features``: the mean of the
    patches each token owns -- tiles of LLaVA-NeXT/OneVision, Qwen2-VL's 2x2 merged patches,
    Idefics3's pixel shuffle; the identity on LLaVA-1.5); ``"llm"``: Q on the projected tokens."""

    scored_by: ClassVar[str] = "similarity"

    alpha: float = 0.5
    tv_temperature: float | None = None
    vv_temperature: float = 0.2
    vision_space: str = "tower"
    text: str = "code"
    count: str = "code"

    reference: ClassVar[str] = (
        "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs (arXiv 2508.18264); "
        "Ironieser/MMTok, mmtok/core/semantic_selector.py (mm_coverage_selection, greedy_merged_jit_kernel), "
        "mmtok/core/mmtok_core.py, mmtok/llava/clip_encoder_mmtok.py and llava_inject.py (LLaVA: alpha=0.5, "
        "softmax_tv_temperature=0.02, softmax_vv_temperature=0.2), mmtok/qwen/qwen2_5_vl_mmtok.py, "
        "qwen2_5_VLmodel_mmtok.py and modeling_qwen2_5_vl_mmtok.py (Qwen2.5-VL: tv 0.01, int(retain_ratio*N) "
        "tokens). Paper: a submodular maximum-coverage objective over text and vision; code fixes it as "
        "Combined=[softmax(P/tv)/m ; alpha*softmax(Q/0.2)/n] with P on projected vision tokens vs LLM token "
        "embeddings of a text that depends on the path: the question keywords on LLaVA "
        "(mmtok/core/text_processor.py extract_keywords_simple, mmtok_core.py _encode_text_with_token_pooling), "
        "'Question: <question>' unfiltered on Qwen2.5-VL (mmtok_core.py apply_selection_preprocess_qwen); Q on "
        "CLIP hidden_states[-2] (LLaVA) or the last tower block's output pooled over each merged token's 2x2 "
        "patches (Qwen). We follow the code per family (Qwen2-VL takes the Qwen path; families without a path "
        "the LLaVA one); text='keywords'/'question'/'prompt', a tv_temperature and count='budget' override it."
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("alpha", "tv_temperature", "vv_temperature"):
            value = getattr(self, name)
            if name == "tv_temperature" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"mmtok: {name} must be a finite number, got {value!r}")
        if self.alpha < 0:
            raise ValueError(f"mmtok: alpha must be >= 0, got {self.alpha}")
        if (self.tv_temperature is not None and self.tv_temperature <= 0) or self.vv_temperature <= 0:
            raise ValueError("mmtok: temperatures must be > 0, got "
                             f"tv={self.tv_temperature}, vv={self.vv_temperature}")
        check_choice("mmtok", "vision_space", self.vision_space, VISION_SPACES)
        check_choice("mmtok", "text", self.text, TEXT_CHOICES)
        check_choice("mmtok", "count", self.count, COUNT_RULES)

    def _vision_need(self, model: ModelFacts) -> SignalNeed:
        if self.vision_space == "tower":
            return SignalNeed("visual_states_out", "tower", model.projector_feed_tower_layer)
        return SignalNeed("visual_states", "llm", 0)

    def _text_need(self, model: ModelFacts | None) -> SignalNeed:
        signal = code_path(model).text if self.text == "code" else TEXT_SIGNALS[self.text]
        return SignalNeed(signal, "llm", 0)

    def text_temperature(self, model: ModelFacts | None) -> float:
        """The text->vision softmax temperature on ``model``: the given one, else its code path's."""
        return code_path(model).tv_temperature if self.tv_temperature is None else float(self.tv_temperature)

    def kept_count(self, context: SelectionContext) -> int:
        """Tokens kept: under ``count="code"`` on a path that floors, ``int(budget * N)`` for a fractional
        budget (Python's float product, as the code computes it); else ``context.n_keep``."""
        budget = context.budget
        if self.count == "code" and code_path(context.model).floor_fraction and isinstance(budget, float):
            return min(int(budget * context.n_visual), context.n_visual)
        return context.n_keep

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return (self.kept_count(context),)

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return tuple(sorted({SignalNeed("visual_states", "llm", 0), self._text_need(model),
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
        text = context.signal(self._text_need(context.model))
        vision = self._vision_features(context)
        if projected.shape[0] != n:
            raise ValueError(f"mmtok: {projected.shape[0]} recorded visual states for {n} visual tokens")
        rows = []
        if len(text):
            tv = self.text_temperature(context.model)
            rows.append(_softmax_rows(cosine_matrix(text, projected) / tv) / len(text))
        rows.append(self.alpha * _softmax_rows(cosine_matrix(vision) / self.vv_temperature) / n)
        picks, gains = greedy_max_coverage(np.concatenate(rows, axis=0), self.kept_count(context))
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(int(i) for i in picks)), tuple(gains), position=self.entry_position(context))])
