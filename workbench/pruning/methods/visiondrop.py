"""VisionDrop (Xu et al. 2025): visual-only importance, dominant tokens kept, the rest merged, in stages.

At each stage the ``dominant`` most important visual tokens are kept; of the others a uniformly
spaced ``contextual`` subset are kept as merge targets and every remaining token is folded into
its most similar target (cosine of the head-mean keys): ``target + mean(assigned sources)``.
Stage 0 acts inside the vision tower on the features that feed the projector (``"tower:<layer>"``,
``workbench/pruning/tower_stages.py``; ``progression="simulated"``: on the projected embeddings
before the LLM), the later ones inside the LLM, where the importance is the visual->visual attention
of that layer averaged over the visual query rows, recomputed on the live, already pruned sequence.
As in the code, each stage leaves its contextual tokens behind its dominant ones (``order="code"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed
from workbench.pruning.plan import PRE_LLM, Append, KeepPlan, Merge, Stage, tower_layer, tower_where
from workbench.pruning.ranking import cosine_matrix, head_mean, top_k
from workbench.pruning.registry import register_method
from workbench.pruning.tower_output import cls_before, moved_after_dominant, tower_output_stages
from workbench.pruning.tower_stages import PROGRESSIONS, in_tower_reason
from workbench.tower_map import tower_features, tower_scores, tower_to_layout, tower_views

TOWER_SCORES = ("cls", "visual")
# "code": after each stage the contextual tokens sit after the dominant ones, as the code concatenates
# them; "layout": every kept token stays in its place (layout order).
ORDERS = ("code", "layout")
# What fills the dominant slot the code gives the [CLS] in the tower stage: "reference", the [CLS] itself,
# passed to the LLM as its first visual token (the code); "empty", nothing (one patch fewer, no [CLS]);
# "patch", one more patch.
CLS_SLOTS = ("reference", "empty", "patch")


def contextual_merges(candidates: np.ndarray, metric: np.ndarray, contextual: int
                      ) -> tuple[list[int], list[Merge]]:
    """The reference's contextual step on the non-dominant ``candidates`` (original indices in
    sequence order, ``metric`` their rows): targets every ``max(1, n // contextual)``-th candidate
    from the first (at most ``contextual``), each other candidate assigned to its most similar
    target (first on ties), a target becoming ``target + mean(its sources)``."""
    n = len(candidates)
    if contextual == 0 or n == 0:
        return [], []
    step = max(1, n // contextual)
    targets = np.arange(0, n, step)[:contextual]
    others = np.setdiff1d(np.arange(n), targets)
    merges = []
    if len(others):
        assign = np.argmax(cosine_matrix(metric[others], metric[targets]), axis=1)
        for j, t in enumerate(targets):
            sources = candidates[others[assign == j]]
            if len(sources):
                merges.append(Merge(int(candidates[t]), tuple(int(s) for s in sources),
                                    (1.0,) + (1.0 / len(sources),) * len(sources)))
    return [int(candidates[t]) for t in targets], merges


def dominant_and_contextual(ids: np.ndarray, importance: np.ndarray, metric: np.ndarray,
                            dominant: int, contextual: int) -> tuple[tuple[int, ...], list[Merge], list[int]]:
    """One VisionDrop stage on the live tokens ``ids`` (sequence order): (kept, merges, targets in
    sequence order)."""
    chosen = top_k(importance, dominant)
    rest = np.setdiff1d(np.arange(len(ids)), chosen)  # sequence order kept
    targets, merges = contextual_merges(ids[rest], metric[rest], contextual)
    return tuple(sorted([int(i) for i in ids[chosen]] + targets)), merges, targets


@register_method("visiondrop")
@dataclass(frozen=True)
class VisionDrop(PreLLMMethod):
    """VisionDrop: training-free progressive reduction scored by visual-only attention.

    Reference: "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment" (Xu et
    al., arXiv 2506.22283, AAAI 2026), code github.com/Ruixxxx/VisionDrop: the tower stage is
    ``llava/visionzip/clip_encoder.py`` + ``utils.py`` (set up by ``llava/visionzip/main.py``), the
    LLM stages ``LlamaModel.visiondrop_rank_drop`` in ``llava/model/modeling_llama_visiondrop.py``,
    defaults from ``scripts/v1_5/visiondrop_eval/*.sh`` (all the same): dominant 42, contextual 6,
    LLM layers [8, 16, 24] with [dominant, contextual] = [30,5], [22,4], [16,3] ("an average
    retention of 32 tokens", README).

    What the code does, and we follow:
    * tower stage (before the projector, on the features of layer -2): importance = the [CLS]
      attention row of that layer (head sum; VisionZip's rule, ``tower_score="cls"``); dominant =
      top-k, the [CLS] filling one of the ``dominant`` slots (``main.py``: ``dominant_num =
      dominant - 1`` patches) and passed on to the LLM as the first token of the tower's output
      [CLS, dominant patches, contextual tokens] (``cls_slot="reference"``: the plan's reserved
      token ``cls_token(N)``, brought in by the ``pre_llm`` stage before the first patch; the LLM
      stages then rank, keep, drop or merge it like any visual token, as the code's do;
      ``cls_slot="empty"``: the slot stays empty, no [CLS]; ``"patch"``: ``dominant`` patches);
      metric = that layer's keys; contextual merging as in ``contextual_merges``, on the tower's features
      (``progression="tower"``: a ``"tower:<feed layer>"`` stage whose merges act on the hidden
      states that feed the projector). Nothing is pruned in the tower before that layer, so the
      selection read from the unpruned recording is the code's;
    * LLM stage "after layer k-1" = before layer k, with layer k's own q/k (input norm + RoPE) on
      the pruned sequence: importance = causal visual->visual attention, head mean, mean over the
      visual query rows; metric = layer k's keys averaged over KV heads; the sequence is then
      renumbered contiguously (``position="reindex"``).
    * merge: ``target + sum(sources) / count`` (target weight 1, not an average).
    * order (``order="code"``): the code concatenates each stage's output as [dominant tokens in
      sequence order, contextual tokens in target order] (clip_encoder.py, the tower's output;
      modeling_llama_visiondrop.py lines 1458-1462, each LLM stage), so the next stage's causal mask,
      RoPE positions and spaced targets follow that order. The plan moves the contextual tokens
      behind the dominant ones (``Append`` after the last visual token): in the LLM stages
      directly, after the tower stage by a ``pre_llm`` stage that keeps the tower's tokens and only
      moves its targets. ``order="layout"`` keeps every token in its place (the old behaviour:
      Jaccard 0.65-0.76 against the code's LLM stages on the shipped model).

    Schedule from the budget: the reference settings scaled by ``n_keep / reference_budget`` (32),
    rounded (at least one token for a positive budget), each stage capped by the previous one; the
    LLM layers placed with ``scaled_layer`` (stages folding onto one layer keep the later counts).
    ``kept_counts`` returns it (the [CLS] counted where it is passed: 48 tokens enter the LLM at the
    reference budget, the code's ``sum(image_token_ratio_list[0])``); the final stage keeps about
    19/32 of the budget because the reference's budget is an average.

    Deviations: ``progression="simulated"`` applies the tower stage as a ``pre_llm`` stage, so its
    merges act on projected embeddings, not tower features (the projector is not linear). On a
    multi-view tower (simulated progression only) the [CLS] passed is the base view's. The paper motivates a
    visual-only score everywhere; for towers without [CLS] ``tower_score="visual"`` uses the
    tower's visual->visual attention (mean over query rows) at the feed layer (our fallback, not in
    the code). M-RoPE models (Qwen2-VL) keep their original positions at every stage (``entry_position``). Towers whose patches do not
    map one to one onto the LLM's visual tokens (tiles of LLaVA-NeXT/OneVision, Qwen2-VL's merged
    patches, Idefics3's pixel shuffle) are read per tower view and folded onto the layout's tokens
    by its tower map (importance and keys: the mean over the patches each token owns) -- our
    extension, the reference covers LLaVA-1.5 only.
    """

    scored_by: ClassVar[str] = "visual_attention"

    reference: ClassVar[str] = (
        "Rethinking Visual Token Reduction in LVLMs under Cross-modal Misalignment (VisionDrop, "
        "arXiv 2506.22283); github.com/Ruixxxx/VisionDrop llava/visionzip/clip_encoder.py (tower stage: "
        "[CLS] attention of layer -2, VisionZip-style) + llava/model/modeling_llama_visiondrop.py "
        "visiondrop_rank_drop (LLM: visual->visual attention averaged over visual rows, key-cosine "
        "contextual merge target+mean(sources), reindexed positions). Code followed: the tower stage runs inside "
        "the tower (tower:<feed layer>, merges on tower features, [CLS] fills one dominant slot and is passed to the "
        "LLM as its first visual token; cls_slot=empty/patch: not passed); each stage's contextual tokens move "
        "behind its dominant ones, "
        "as the code concatenates them (order=layout: every token stays in place). progression=simulated: the tower "
        "stage as pre_llm (merges on projected embeddings)."
    )

    dominant: int = 42
    contextual: int = 6
    llm_layers: tuple[int, ...] = (8, 16, 24)
    llm_tokens: tuple[tuple[int, int], ...] = ((30, 5), (22, 4), (16, 3))
    reference_budget: int = 32
    tower_score: str = "cls"
    progression: str = "tower"  # "tower": stage 0 inside the tower (the code); "simulated": as pre_llm
    cls_slot: str = "reference"  # the [CLS] fills one of stage 0's dominant slots (the code's dominant - 1)
    order: str = "code"  # "code": contextual tokens move behind the dominant ones; "layout": all stay in place

    def __post_init__(self):
        super().__post_init__()
        def count(value, name):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"visiondrop: {name} must be a non-negative int, got {value!r}")
        count(self.dominant, "dominant")
        count(self.contextual, "contextual")
        object.__setattr__(self, "llm_layers", tuple(self.llm_layers))
        object.__setattr__(self, "llm_tokens", tuple(tuple(p) for p in self.llm_tokens))
        for layer in self.llm_layers:
            count(layer, "llm_layers entries")
        if list(self.llm_layers) != sorted(set(self.llm_layers)):
            raise ValueError(f"visiondrop: llm_layers must be strictly increasing, got {self.llm_layers}")
        check_reference_layers("visiondrop", "llm_layers", self.llm_layers)
        if len(self.llm_tokens) != len(self.llm_layers) or any(len(p) != 2 for p in self.llm_tokens):
            raise ValueError("visiondrop: llm_tokens needs one (dominant, contextual) pair per llm layer, "
                             f"got {self.llm_tokens} for layers {self.llm_layers}")
        for d, c in self.llm_tokens:
            count(d, "llm_tokens dominant")
            count(c, "llm_tokens contextual")
        if self.dominant + self.contextual == 0:
            raise ValueError("visiondrop: dominant + contextual must be positive")
        if isinstance(self.reference_budget, bool) or not isinstance(self.reference_budget, (int, np.integer)) \
                or self.reference_budget <= 0:
            raise ValueError(f"visiondrop: reference_budget must be a positive int, got {self.reference_budget!r}")
        if self.tower_score not in TOWER_SCORES:
            raise ValueError(f"visiondrop: tower_score must be one of {TOWER_SCORES}, got {self.tower_score!r}")
        if self.progression not in PROGRESSIONS:
            raise ValueError(f"visiondrop: progression must be one of {PROGRESSIONS}, got {self.progression!r}")
        if self.cls_slot not in CLS_SLOTS:
            raise ValueError(f"visiondrop: cls_slot must be one of {CLS_SLOTS}, got {self.cls_slot!r}")
        if self.order not in ORDERS:
            raise ValueError(f"visiondrop: order must be one of {ORDERS}, got {self.order!r}")

    # --- model and schedule ----------------------------------------------------------------------
    def applicability(self, model: ModelFacts) -> str | None:
        if self.tower_score == "cls" and not model.has_cls_token:
            return ("its tower stage ranks by [CLS] attention and this vision tower has no [CLS]; "
                    "use tower_score='visual' (visual->visual attention)")
        if self.llm_layers and model.decoder_layers < 2:
            return "its in-LLM stages need a decoder of at least 2 layers"
        if self.progression == "tower":
            reason = in_tower_reason(model)
            if reason is not None:
                return (f"its first stage runs inside the vision tower and {reason}; progression=simulated "
                        "applies it to the projected embeddings instead")
        return None

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        layer = model.projector_feed_tower_layer
        return (SignalNeed("attention", "tower", layer, self.tower_score),
                SignalNeed("visual_keys", "tower", layer))

    def schedule(self, context: SelectionContext) -> list[tuple[object, int, int]]:
        """[(where, dominant patches, contextual)]: the tower (or pre_llm) stage, then one per (folded) LLM layer."""
        model = context.require_model()
        factor = context.n_keep / self.reference_budget
        raw = [(PRE_LLM, self.dominant, self.contextual)]
        folded: dict[int, tuple[int, int]] = {}
        for layer, (d, c) in zip(self.llm_layers, self.llm_tokens):
            folded[scaled_layer(layer, model.decoder_layers)] = (d, c)  # a later stage overrides
        raw += [(where, d, c) for where, (d, c) in sorted(folded.items())]
        if self.progression == "tower":
            raw[0] = (tower_where(model.projector_feed_tower_layer),) + raw[0][1:]
        stages, alive, passed = [], context.n_visual, self.passes_cls(context)
        for i, (where, d, c) in enumerate(raw):
            d, c = int(round(d * factor)), int(round(c * factor))
            if i == 0 and self.cls_slot != "patch" and model.has_cls_token and d > 0:
                d -= 1  # main.py: ``dominant_num = dominant - 1``, the [CLS] takes one dominant slot
            if d + c == 0 and context.n_keep > 0:
                d = 1  # a positive budget never rounds a stage down to nothing
            d = min(d, alive)
            c = min(c, alive - d)
            stages.append((where, d, c))
            alive = d + c + (1 if i == 0 and passed else 0)  # the [CLS] is one of the LLM's visual tokens
        return stages

    def passes_cls(self, context: SelectionContext) -> bool:
        """Whether the plan passes the tower's [CLS] to the LLM (it fills a slot of the first stage)."""
        model = context.require_model()
        return (self.cls_slot == "reference" and model.has_cls_token
                and int(round(self.dominant * context.n_keep / self.reference_budget)) > 0)

    def entry_stage(self, context: SelectionContext, first: tuple[object, int, int]) -> bool:
        """Whether a ``pre_llm`` stage follows the tower stage ``first``: to move its contextual tokens
        behind the dominant ones, or to bring the [CLS] in."""
        return tower_layer(first[0]) is not None and (self.reorders_tower_output(first) or self.passes_cls(context))

    def reorders_tower_output(self, first: tuple[object, int, int]) -> bool:
        """Whether a ``pre_llm`` stage follows the tower stage ``first`` to move its contextual tokens."""
        where, _, contextual = first
        return self.order == "code" and tower_layer(where) is not None and contextual > 0

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        """The visual tokens alive after each stage, the [CLS] included once it is passed."""
        schedule = self.schedule(context)
        counts = [d + c for _, d, c in schedule]
        cls = 1 if self.passes_cls(context) else 0
        if self.entry_stage(context, schedule[0]):
            counts.insert(1, counts[0] + cls)
        else:
            counts[0] += cls
        return tuple(counts)

    def stage(self, where, kept, scores, merges: list[Merge], targets: list[int], position: str,
              cls: tuple[Append, ...] = ()) -> Stage:
        """A stage whose contextual tokens are merged in place (``order="layout"``, and in the tower,
        where tokens cannot move) or moved behind the dominant ones, merged on the way (``"code"``);
        ``cls``: the [CLS] brought in before the LLM."""
        kept = tuple(kept) + tuple(a.token for a in cls)
        if self.order == "code" and tower_layer(where) is None:
            return Stage(where, kept, scores, (), position, cls + moved_after_dominant(targets, merges))
        return Stage(where, kept, scores, tuple(merges), position, cls)

    # --- selection -------------------------------------------------------------------------------
    def tower_importance(self, context: SelectionContext, layer: int) -> np.ndarray:
        """[N] tower-stage importance of the visual tokens, read per tower view and folded onto the
        layout by its tower map (mean over the patches each token owns; the identity on LLaVA-1.5):
        the [CLS] row (``"cls"``), or each view's visual->visual attention averaged over its query
        rows (``"visual"``)."""
        rec, layout = context.recording, context.layout
        if self.tower_score == "cls":
            return tower_scores(rec, layout, "attention", layer, "cls")
        views = tower_views(rec, layout, "attention", layer, "visual")
        importance = tower_to_layout(layout, [v.mean(0) for v in views])
        if np.isnan(importance).any():
            raise ValueError(f"visiondrop: {int(np.isnan(importance).sum())} visual tokens own no tower patch "
                             "in the layout's tower map")
        return importance

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        layer = model.projector_feed_tower_layer
        importance = self.tower_importance(context, layer)
        metric = head_mean(tower_features(context.recording, context.layout, "visual_keys", layer), model.vision_heads)
        first = self.schedule(context)[0]
        ids = np.arange(context.n_visual)
        kept, merges, targets = dominant_and_contextual(ids, importance, metric, *first[1:])
        position = self.entry_position(context)
        # the tower's output order: [CLS, dominant..., contextual...] (clip_encoder.py lines 55-88)
        cls = cls_before(context.n_visual, kept) if self.passes_cls(context) else ()
        if tower_layer(first[0]) is None:
            return self.plan(context, [self.stage(first[0], kept, tuple(importance), merges, targets, position, cls)])
        moved = targets if self.reorders_tower_output(first) else ()
        return self.plan(context, tower_output_stages(first[0], kept, tuple(importance), merges, position, cls, moved))

    def layer_callback(self, context: SelectionContext):
        stages = {where: (d, c) for where, d, c in self.schedule(context)[1:]}
        if not stages:
            return None
        n_visual, position = context.n_visual, self.entry_position(context)

        def callback(layer, state):
            if layer not in stages:
                return None
            d, c = stages[layer]
            rows = state.visual_rows
            probs = state.attention(rows)  # [H, M, S]
            importance = probs.mean(0)[:, rows.to(probs.device)].mean(0).double().cpu().numpy()
            keys = state.keys().float().mean(0)[rows.to(probs.device)].double().cpu().numpy()
            ids = np.asarray(state.visual_indices, dtype=np.int64)
            kept, merges, targets = dominant_and_contextual(ids, importance, keys, d, c)
            scores = np.full(n_visual, np.nan)
            patches = ids < n_visual  # the [CLS] has no slot among the layout's scores
            scores[ids[patches]] = importance[patches]
            return self.stage(layer, kept, tuple(scores), merges, targets, position)

        return callback
