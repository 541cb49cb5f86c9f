"""VFlowOpt (Yang et al. 2025): one tower-attention importance, pruned progressively with recycling.

At a late tower layer every token's importance is the attention it receives from the "global"
tokens -- those whose received attention exceeds ``t`` times the mean -- (plus ``alpha_v`` times the
softmax of its image patch's pixel entropy). Before the LLM the least important tokens are dropped;
part of them is recycled: grouped by an ``m x m`` spatial grid, each group is averaged (weighted by
importance) into its most important member, which is kept. Inside the LLM, at two layers, the
least important remaining tokens (by the same tower score) are dropped again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.layout import VisualLayout
from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed
from workbench.pruning.plan import PRE_LLM, KeepPlan, Merge, Stage
from workbench.pruning.registry import register_method
from workbench.tower_map import tower_to_layout, tower_views

# m_grid: "code" uses vit_m as is on every grid (the code's ``a``, base and tiles alike); "scaled" multiplies
# it by each grid's side / 27, keeping the 27 x 27 grouping's shape on other grids.
M_GRID_RULES = ("code", "scaled")
# recycling: "code" merges only on layouts with a base view plus other views (the code's AnyRes branch);
# a single-view layout takes the code's flat branch, a plain top-k. "always" recycles on every layout.
RECYCLING_RULES = ("code", "always")
# newlines: "count": the counts L (merged-token count) and M (in-LLM drops) include the layout's separators,
# as the code's image_newline entries (scored 1, never dropped) on the AnyRes branch; "ignore": visual only.
NEWLINE_RULES = ("count", "ignore")
REFERENCE_GRID = 27  # SigLIP's 27 x 27 patch grid (LLaVA-OneVision), for which ``vit_m`` is written
# The searched settings of ``lmms_eval/models/llava_onevision_training_free.py`` (illava_config):
# label -> (vit_t, alpha_v, vit_m, vit_r, llm_ratios).
SEARCHED = {
    0.5: (28.683047941520474, 0.0, 11.756787150848968, 0.7233201448753168, (0.748747637472693, 0.487)),
    0.25: (34.759552803070484, 0.0, 15.580797034937687, 0.2651026358526424, (0.9833433139039235, 0.8773258179532721)),
    0.1: (39.26492840997221, 0.0, 17.386981849158786, 0.11661529508161146, (1.0, 0.6011)),
}


def global_attention(attention: np.ndarray, t: float) -> np.ndarray:
    """[P] importance from a head-mean attention map [P, P] (rows: queries): the code's
    ``received = A.mean(0)``, global queries ``received > t * mean(received)``, importance = the mean
    of their rows. When no token passes the threshold (the code would average an empty set: NaN) the
    token receiving the most attention stands in as the one global query (our fallback)."""
    a = np.asarray(attention, dtype=np.float64)
    received = a.mean(0)
    chosen = np.flatnonzero(received > t * received.mean())
    if len(chosen) == 0:
        chosen = np.array([int(np.argmax(received))])
    return a[chosen].mean(0)


def lowest(scores: np.ndarray, count: int, among: np.ndarray) -> np.ndarray:
    """The ``count`` lowest-scored of ``among`` (ascending sort; ties: the lower index counts as lower)."""
    among = np.asarray(among, dtype=np.int64)
    order = np.lexsort((among, scores[among]))
    return among[order[:count]]


def recycle(layout: VisualLayout, scores: np.ndarray, low: np.ndarray, m: float) -> tuple[np.ndarray, list[Merge]]:
    """The code's recycling of the ``low`` tokens: grouped per layout grid by the cell
    ``(floor(row / m), floor(col / m))``; each group's weighted average (weights = scores / their sum)
    replaces its highest-scored member (the first on ties), which is kept. Returns (kept members, merges)."""
    representatives, merges = [], []
    keys = {}
    for t in low:
        row, col = layout.cell[t]
        keys.setdefault((int(layout.group[t]), int(math.floor(row / m)), int(math.floor(col / m))), []).append(int(t))
    for key in sorted(keys):
        members = np.asarray(sorted(keys[key]), dtype=np.int64)
        values = scores[members]
        rep = int(members[int(np.argmax(values))])
        representatives.append(rep)
        if len(members) > 1:
            total = values.sum()
            weights = values / total if total > 0 else np.full(len(members), 1.0 / len(members))
            sources = [int(s) for s in members if s != rep]
            merges.append(Merge(rep, tuple(sources), (float(weights[members == rep][0]),)
                                + tuple(float(weights[members == s][0]) for s in sources)))
    return np.asarray(sorted(representatives), dtype=np.int64), merges


@register_method("vflowopt")
@dataclass(frozen=True)
class VFlowOpt(PreLLMMethod):
    """VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization
    (Yang et al., ICCV 2025, arXiv 2508.05211); code github.com/sihany077/VFlowOpt, inference rule in
    ``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py`` (``SigLipEncoderLayer``:
    ``received_attn``, ``global_token_indice = received > t * mean``, ``combined_attn``, ``+ alpha_v *
    softmax(entropy)``; patch entropy in ``SigLipVisionEmbeddings.forward``),
    ``src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py`` (pre-LLM drop and
    recycling: ``reduce_tokens = round(L * (1 - vit_r))``, ``int(L / m^2)`` more low tokens grouped on an
    m x m grid and merged) and ``src/transformers-4.46.0/.../qwen2/modeling_qwen2.py``
    (``forward_illava``, the cache path: before layers ``illava_llm_k`` the lowest
    ``round(M * (1 - r))`` by the same tower score are removed, positions kept). Searched settings
    from ``src/lmms_eval-0.2.4/lmms_eval/models/llava_onevision_training_free.py`` (``illava_config``;
    the 10 % one is active): t=39.26, alpha_v=0, m=17.39, vit_r=0.1166, llm_r=[1.0, 0.6011],
    ``illava_vit_k=[25]`` (SigLIP's last used layer = the projector's feed layer), ``illava_llm_k=9-18``
    (of Qwen2-7B's 28 layers; 10 and 21 of 32 here, placed with ``scaled_layer``).

    The optimisation (Bayesian search of these settings, ``llava_ov_opt_all.py``) is not rerun: its
    results are parameters (``SEARCHED`` holds all three). Budget: ``vit_r=None`` (default) keeps
    ``n_keep`` tokens out of the tower before recycling (``reduce = N - n_keep``); a float uses the
    searched ratio and ignores n_keep. Recycling drops ``int(L / m^2)`` more and adds back one token per
    non-empty m x m cell; ``kept_counts`` runs the selection.

    As the code by default: ``vit_m`` is used as is on every grid (``m_grid="scaled"``: scaled by the
    grid's side / 27); recycling runs only on layouts with a base view plus other views (the code's AnyRes
    branch, lines 553-630), single-view layouts take its flat branch (lines 645-672: top-k, no merge;
    ``recycling="always"`` recycles there too); the image-newline separators count in L and in the in-LLM
    M as the code's newline entries do (``newlines="ignore"``: visual tokens only).

    Deviations: the score is read from the UNPRUNED recording at the projector's feed layer (the code
    also computes it from a full tower pass) as the head-mean visual->visual attention (a [CLS] row and
    column, where the tower has one, is left out; SigLIP has none). Patch entropy needs the image's
    pixels, which the recording does not hold: ``alpha_v`` must be 0 (every searched setting has 0). Multi-view towers
    (tiles) are folded onto the layout by its tower map (mean per token) and one ranking runs over
    all tokens (the code ranks base image and tiles together too, with the image-newline tokens
    given score 1; our layouts keep separators). The pre-LLM stage renumbers positions (the code
    concatenates the kept features; "original" on M-RoPE models); the in-LLM stages keep them.
    Empty global set: see ``global_attention``. Ties: the lower index is dropped first.
    """

    scored_by: ClassVar[str] = "visual_attention"

    reference: ClassVar[str] = (
        "VFlowOpt (ICCV 2025, arXiv 2508.05211); github.com/sihany077/VFlowOpt siglip_encoder.py (importance = mean "
        "attention row of tokens receiving > t x mean, + alpha_v softmax(patch entropy)), llava_qwen_training_free.py "
        "(drop round(L(1-vit_r)) lowest + recycle int(L/m^2) more on an m x m grid, importance-weighted into the "
        "group's best), qwen2/modeling_qwen2.py forward_illava (drop the lowest round(M(1-r)) before layers 9/18 of "
        "28). Searched 10% setting as defaults; the search itself not rerun. Score read from the unpruned recording; "
        "alpha_v fixed at 0 (no pixels in the recording); n_keep replaces vit_r unless given. Named deviations: "
        "m_grid='scaled', recycling='always', newlines='ignore'.")

    vit_t: float = SEARCHED[0.1][0]
    alpha_v: float = SEARCHED[0.1][1]
    vit_m: float = SEARCHED[0.1][2]
    vit_r: float | None = None  # None: the budget sets the pre-LLM count; SEARCHED[0.1][3] = 0.1166
    llm_layers: tuple[int, ...] = (10, 21)  # illava_llm_k = 9, 18 of 28
    llm_ratios: tuple[float, ...] = SEARCHED[0.1][4]
    m_grid: str = "code"
    recycling: str = "code"
    newlines: str = "count"

    def __post_init__(self):
        super().__post_init__()
        def number(name, low, high, low_open=True):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or (value <= low if low_open else value < low) or value > high:
                raise ValueError(f"vflowopt: {name} must be a number in {'(' if low_open else '['}{low}, {high}], "
                                 f"got {value!r}")
        number("vit_t", 0.0, math.inf, low_open=False)
        number("vit_m", 0.0, math.inf)
        if self.alpha_v != 0:
            raise ValueError(f"vflowopt: alpha_v must be 0 (the patch-entropy term needs the image's pixels, which the "
                             f"recording does not hold; every searched setting uses 0), got {self.alpha_v!r}")
        if self.vit_r is not None:
            number("vit_r", 0.0, 1.0)
        object.__setattr__(self, "llm_layers", tuple(self.llm_layers))
        object.__setattr__(self, "llm_ratios", tuple(self.llm_ratios))
        if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in self.llm_layers) \
                or list(self.llm_layers) != sorted(set(self.llm_layers)):
            raise ValueError(f"vflowopt: llm_layers must be strictly increasing ints >= 1, got {self.llm_layers!r}")
        check_reference_layers("vflowopt", "llm_layers", self.llm_layers)
        if len(self.llm_ratios) != len(self.llm_layers) or any(
                isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1 for r in self.llm_ratios):
            raise ValueError(f"vflowopt: llm_ratios must hold one keep ratio in [0, 1] per llm layer, got "
                             f"{self.llm_ratios!r} for layers {self.llm_layers}")
        for name, allowed in (("m_grid", M_GRID_RULES), ("recycling", RECYCLING_RULES), ("newlines", NEWLINE_RULES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"vflowopt: {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def applicability(self, model: ModelFacts) -> str | None:
        if self.llm_layers and model.decoder_layers < 2:
            return "its in-LLM stages need a decoder of at least 2 layers"
        return None

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("attention", "tower", model.projector_feed_tower_layer, "visual"),)

    def importance(self, context: SelectionContext) -> np.ndarray:
        model = context.require_model()
        layer = model.projector_feed_tower_layer
        views = tower_views(context.recording, context.layout, "attention", layer, "visual")
        scores = tower_to_layout(context.layout, [global_attention(v, self.vit_t) for v in views])
        if np.isnan(scores).any():
            raise ValueError(f"vflowopt: {int(np.isnan(scores).sum())} visual tokens own no tower patch in the "
                             "layout's tower map")
        return scores

    def llm_schedule(self, model: ModelFacts) -> tuple[tuple[int, tuple[float, ...]], ...]:
        """((decoder layer, keep ratios applied there in turn), ...): reference stages folding onto one
        layer are applied one after the other."""
        folded: dict[int, list[float]] = {}
        for layer, ratio in zip(self.llm_layers, self.llm_ratios):
            folded.setdefault(scaled_layer(layer, model.decoder_layers), []).append(ratio)
        return tuple((layer, tuple(r)) for layer, r in sorted(folded.items()))

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        return tuple(len(s.kept) for s in self.select(context).stages)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        layout, n = context.layout, context.n_visual
        scores = self.importance(context)
        anyres = len(layout.groups) > 1 and any(g.is_base_view for g in layout.groups)
        recycling = anyres or self.recycling == "always"
        newlines = len(layout.separators) if anyres and self.newlines == "count" else 0
        length = n + newlines  # the code's image_token_length: newline entries score 1 and are never dropped
        keep = context.n_keep if self.vit_r is None else length - round(length * (1 - self.vit_r)) - newlines
        m = self.vit_m
        if self.m_grid == "scaled":
            m *= (layout.groups[0].rows if layout.groups else REFERENCE_GRID) / REFERENCE_GRID
        n_merged = int(length / (m * m)) if recycling else 0
        low = lowest(scores, min(max(n - keep, 0) + n_merged, n), np.arange(n))
        representatives, merges = recycle(layout, scores, low, m) if recycling else (np.zeros(0, np.int64), [])
        alive = np.union1d(np.setdiff1d(np.arange(n), low), representatives)
        stages = [Stage(PRE_LLM, tuple(int(i) for i in alive), tuple(scores), tuple(merges),
                        self.entry_position(context))]
        for layer, ratios in self.llm_schedule(model):
            for ratio in ratios:
                drop = min(round((len(alive) + newlines) * (1 - ratio)), len(alive))
                alive = np.setdiff1d(alive, lowest(scores, drop, alive))
            stages.append(Stage(layer, tuple(int(i) for i in alive), tuple(scores), position="original"))
        return self.plan(context, stages)
