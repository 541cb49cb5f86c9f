"""VScan (Zhang et al. 2025): global and local scans in the tower with merging, then text-guided
pruning at a middle LLM layer.

Tower side: half of the tower budget is chosen locally -- the top tokens of every non-overlapping
window by a SHALLOW layer's [CLS] attention -- and the rest globally, the top tokens by a DEEP
layer's [CLS] attention among the others; every token not chosen is averaged into its most similar
chosen token (cosine of the projected features). LLM side: before a middle layer, that layer's
attention from the last instruction token ranks the live visual tokens and the top ones survive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from workbench.layout import VisualLayout
from workbench.pruning.budget import split_budget
from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed
from workbench.pruning.methods.pyramiddrop import LastTokenRanking
from workbench.pruning.plan import PRE_LLM, KeepPlan, Merge, Stage
from workbench.pruning.ranking import cosine_matrix, top_k
from workbench.pruning.registry import register_method
from workbench.tower_map import tower_scores

REFERENCE_TOWER_LAYERS = 24  # CLIP ViT-L/14-336 of LLaVA-1.5
REFERENCE_GRID = 24  # its 24 x 24 patch grid, for which the window size is written


def window_size_on(rows: int, cols: int, window_size: int) -> int:
    """The reference window (6 of a 24-wide grid) at the same relative size on a rows x cols grid."""
    return max(1, int(round(window_size * min(rows, cols) / REFERENCE_GRID)))


def local_scan(layout: VisualLayout, scores: np.ndarray, n_local: int, window_size: int) -> np.ndarray:
    """The code's ``window_cls_selection``: per layout grid, non-overlapping ws x ws windows
    (``rows // ws`` by ``cols // ws``, leftover rows/cols uncovered), the top ``k = share // windows``
    tokens of each window by ``scores`` (ties: the lower index). ``n_local`` is shared among the grids
    in proportion to their tokens (one grid on LLaVA-1.5: all of it)."""
    shares = split_budget(n_local, [g.rows * g.cols for g in layout.groups])
    chosen = []
    for g, (group, share) in enumerate(zip(layout.groups, shares)):
        ws = window_size_on(group.rows, group.cols, window_size)
        nh, nw = group.rows // ws, group.cols // ws
        if nh * nw == 0:
            continue
        k = share // (nh * nw)
        members = np.flatnonzero(layout.group == g)
        cells = layout.cell[members]
        for i in range(nh):
            for j in range(nw):
                inside = members[(cells[:, 0] // ws == i) & (cells[:, 1] // ws == j)]
                chosen.extend(int(t) for t in top_k(scores, min(k, len(inside)), among=inside))
    return np.asarray(sorted(chosen), dtype=np.int64)


def nearest_merges(kept: np.ndarray, features: np.ndarray) -> list[Merge]:
    """The code's ``token_merging`` (scaling 1): every token not kept goes to its most similar kept
    token (cosine; the first on ties) and each kept token becomes the plain mean of itself and them."""
    n = len(features)
    others = np.setdiff1d(np.arange(n), kept)
    if len(others) == 0 or len(kept) == 0:
        return []
    nearest = kept[np.argmax(cosine_matrix(features[others], features[kept]), axis=1)]
    return [Merge.mean(int(t), [int(s) for s in others[nearest == t]]) for t in kept if (nearest == t).any()]


@register_method("vscan")
@dataclass(frozen=True)
class VScan(PreLLMMethod):
    """VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models (Zhang et
    al., arXiv 2505.22654, TMLR 2026); code github.com/Tencent/SelfEvolvingAgent, folder ``VScan``:
    tower side ``llava/model/llava_arch.py`` (``encode_images``, ``window_cls_selection``,
    ``token_merging``) on the [CLS] attention rows returned by
    ``llava/model/multimodal_encoder/clip_encoder.py``; LLM side ``llava/model/modeling_llama_x.py``
    (``forward_x``: pruning when ``layer_idx + 1`` is in ``layer_list``; ``layer_prune``). Defaults
    from the README / ``scripts/llava1_5/*.sh``: ``visual_token_num=96``, ``layer_list=[16]``,
    ``image_token_list=[32]`` -- 96 tokens out of the tower, 32 from layer 16 on, "an average of 64
    tokens throughout the 32 layers".

    What the code does, and we follow:
    * scores: the [CLS] row of the tower's attention, head mean; local scan on layer 5's (shallow,
      of 24), global scan on layer -2's (deep; the projector's feed layer here);
    * local: ``int(T * 0.5)`` tokens (``global_ratio = 0.5``), ``k = int(T * 0.5) // windows`` per
      6 x 6 window of the 24 x 24 grid (16 windows), top-k per window;
    * global: the top ``T - int(T * 0.5)`` by the deep scores among the tokens not chosen locally
      (the code zeroes the local tokens' scores before its top-k);
    * merging: after the projector, every unchosen token is averaged into its most similar chosen
      token (cosine of the projected features: recorded ``visual_states`` of decoder layer 0),
      ``(chosen + sum(merged)) / (1 + count)``; the chosen tokens stay in layout order and the
      LLM sees a contiguous sequence (``position="reindex"``);
    * before layer 16 (``rank_layer = layer_idx + 1``): layer 16's own q/k (input norm, RoPE) on
      the live sequence, the attention row of the last instruction token (the last prompt token at
      inference), head mean, top ``image_token_list`` visual tokens kept, positions renumbered
      (``position_ids = arange``): PyramidDrop's rank-and-drop, here a layer callback.

    Budget: ``n_keep`` scales the reference's (96, 32) for its 64-token average:
    ``round(96 * n_keep / 64)`` out of the tower (at most N) and ``round(32 * n_keep / 64)`` from the
    middle layer (at least 1 each, never more than the stage before). ``kept_counts`` gives the
    counts actually kept (the local windows floor their share, as the code does).

    Tower side, exact: the code runs the tower in full (``output_attentions=True``, every layer's
    [CLS] row returned by ``clip_encoder.py`` ``feature_select``) and selects after it
    (``encode_images``), so both scans read the UNPRUNED forward's recorded [CLS] attention and the
    merge acts on the recorded projected embeddings, applied as a ``pre_llm`` stage; nothing is cut
    inside the tower, so no tower-side stage (``workbench.pruning.tower_stages``) is involved.

    Deviations: the shallow layer is placed by relative depth on other towers (5 of 24; layer 1 of
    the shipped 3-layer tower) and the window keeps its relative size (6 of 24 -> 3 on a 12 x 12
    grid, at least 1); the code asserts a 24 x 24 grid. On multi-grid
    layouts (LLaVA-NeXT tiles) the [CLS] rows of every tower view are folded onto the layout's
    tokens by its tower map and one selection runs over all tokens with the local share split
    among the grids in proportion to their size (the code runs the scans per tile, T per tile).
    Towers without [CLS] (SigLIP, Qwen2-VL) are not covered. The authors' Qwen2.5-VL variant
    (``qwen/model/qwen2_5_vl_custom.py``) is a different design, not implemented: it also selects
    after the full tower, but scores each merged token by the attention its patches receive (head
    sum, mean over query rows, mean over the 2x2 patches) at the first full-attention block (local
    scan, 4 x 4 windows) and the last block (global scan), keeps ``int(ratio * N)`` split half and
    half, and merges the rest into the merger's outputs. Top-k ties: the lower index.
    """

    scored_by: ClassVar[str] = "visual_attention"

    reference: ClassVar[str] = (
        "VScan: Rethinking Visual Token Reduction for Efficient Large Vision-Language Models (arXiv 2505.22654); "
        "github.com/Tencent/SelfEvolvingAgent VScan/llava/model/llava_arch.py (encode_images: local scan = top-k per "
        "6x6 window of layer-5 [CLS] attention, global scan = top-k of layer -2 [CLS] attention, 50/50; token_merging "
        "of the rest into the nearest kept token) + llava/model/modeling_llama_x.py (layer_prune: last instruction "
        "token's attention at layer 16, keep 32). Defaults 96 tokens out of the tower, 32 from layer 16, scaled by "
        "n_keep/64. Tower side read from the unpruned recording (the code also selects after the full tower) and "
        "applied as pre_llm; shallow layer and window scaled to the tower/grid; [CLS] towers only.")

    tower_tokens: int = 96  # visual_token_num
    llm_layers: tuple[int, ...] = (16,)  # layer_list
    llm_tokens: tuple[int, ...] = (32,)  # image_token_list
    reference_budget: int = 64
    global_ratio: float = 0.5
    shallow_layer: int = 5  # of the 24-layer reference tower
    window_size: int = 6  # on the 24 x 24 reference grid

    def __post_init__(self):
        super().__post_init__()
        def positive(value, name):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"vscan: {name} must be an int >= 1, got {value!r}")
        positive(self.tower_tokens, "tower_tokens")
        positive(self.reference_budget, "reference_budget")
        positive(self.window_size, "window_size")
        object.__setattr__(self, "llm_layers", tuple(self.llm_layers))
        object.__setattr__(self, "llm_tokens", tuple(self.llm_tokens))
        for layer in self.llm_layers:
            positive(layer, "llm_layers entries")
        if list(self.llm_layers) != sorted(set(self.llm_layers)):
            raise ValueError(f"vscan: llm_layers must be strictly increasing, got {self.llm_layers}")
        check_reference_layers("vscan", "llm_layers", self.llm_layers)
        if len(self.llm_tokens) != len(self.llm_layers):
            raise ValueError(f"vscan: llm_tokens needs one count per llm layer, got {self.llm_tokens} for "
                             f"layers {self.llm_layers}")
        for count in self.llm_tokens:
            positive(count, "llm_tokens entries")
        if isinstance(self.global_ratio, bool) or not isinstance(self.global_ratio, (int, float)) \
                or not 0.0 <= self.global_ratio <= 1.0:
            raise ValueError(f"vscan: global_ratio must be a number in [0, 1] (reference 0.5), "
                             f"got {self.global_ratio!r}")
        if isinstance(self.shallow_layer, bool) or not isinstance(self.shallow_layer, (int, np.integer)) \
                or not 0 <= self.shallow_layer < REFERENCE_TOWER_LAYERS:
            raise ValueError(f"vscan: shallow_layer must be an int in 0..{REFERENCE_TOWER_LAYERS - 1} (a layer of the "
                             f"24-layer reference tower), got {self.shallow_layer!r}")

    # --- model and schedule ------------------------------------------------------------------------
    def applicability(self, model: ModelFacts) -> str | None:
        if not model.has_cls_token:
            return ("its global and local scans rank by the tower's [CLS] attention and this vision tower has no "
                    "[CLS] (the authors' Qwen2.5-VL variant is a different design, not implemented)")
        if self.llm_layers and model.decoder_layers < 2:
            return "its in-LLM stage needs a decoder of at least 2 layers"
        return None

    def tower_layers(self, model: ModelFacts) -> tuple[int, int]:
        """(shallow, deep) tower layers: the reference's 5 of 24 by relative depth (at most the deep
        one), and the projector's feed layer (the code's -2)."""
        deep = model.projector_feed_tower_layer
        shallow = int(round(self.shallow_layer * model.vision_layers / REFERENCE_TOWER_LAYERS))
        return min(shallow, deep), deep

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        shallow, deep = self.tower_layers(model)
        return tuple(sorted({SignalNeed("attention", "tower", shallow, "cls"),
                             SignalNeed("attention", "tower", deep, "cls"),
                             SignalNeed("visual_states", "llm", 0)}))

    def counts(self, context: SelectionContext) -> tuple[int, tuple[tuple[int, int], ...]]:
        """(tokens out of the tower T, ((decoder layer, tokens kept), ...)) for this budget."""
        model = context.require_model()
        factor = context.n_keep / self.reference_budget
        tower = min(context.n_visual, max(1, int(round(self.tower_tokens * factor))))
        folded: dict[int, int] = {}
        for layer, count in zip(self.llm_layers, self.llm_tokens):
            folded[scaled_layer(layer, model.decoder_layers)] = max(1, int(round(count * factor)))
        return tower, tuple((layer, count) for layer, count in sorted(folded.items()))

    def scan(self, context: SelectionContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(local tokens, global tokens, deep scores) of the tower side."""
        model = context.require_model()
        shallow, deep = self.tower_layers(model)
        rec, layout = context.recording, context.layout
        shallow_scores = tower_scores(rec, layout, "attention", shallow, "cls")
        deep_scores = tower_scores(rec, layout, "attention", deep, "cls")
        if np.isnan(shallow_scores).any() or np.isnan(deep_scores).any():
            raise ValueError("vscan: some visual tokens own no tower patch in the layout's tower map")
        tower, _ = self.counts(context)
        n_local = int(tower * (1 - self.global_ratio))
        local = local_scan(layout, shallow_scores, n_local, self.window_size)
        rest = np.setdiff1d(np.arange(context.n_visual), local)
        chosen = top_k(deep_scores, min(tower - n_local, len(rest)), among=rest)
        return local, chosen, deep_scores

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        local, chosen, _ = self.scan(context)
        alive = len(local) + len(chosen)
        counts = [alive]
        for _, count in self.counts(context)[1]:
            alive = min(alive, count)
            counts.append(alive)
        return tuple(counts)

    # --- selection -------------------------------------------------------------------------------
    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        local, chosen, deep_scores = self.scan(context)
        kept = np.union1d(local, chosen)
        features = context.signal(SignalNeed("visual_states", "llm", 0))
        merges = nearest_merges(kept, features)
        return self.plan(context, [Stage(PRE_LLM, tuple(int(i) for i in kept), tuple(deep_scores), tuple(merges),
                                         self.entry_position(context))])

    def layer_callback(self, context: SelectionContext):
        stages = dict(self.counts(context)[1])
        return LastTokenRanking("vscan", stages, context.n_visual, self.position) if stages else None
