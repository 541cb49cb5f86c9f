"""[CLS]-attention pruning before the LLM: FasterVLM, VTC-CLS and HiRED.

All three rank the patch tokens by the attention the vision tower's [CLS] token pays them (head
mean of the recorded "cls" row) and keep the top of each token group before the projector's output
reaches the LLM (one ``pre_llm`` stage). They differ in which tower layers they read and in how the
budget is shared among the groups (tiles) of a multi-view layout:

- FasterVLM: one layer (the one feeding the projector); every view keeps its own top-T, as its code
  (``crops="budget"``: every group keeps its share by size).
- VTC-CLS: the [CLS] rows of a range of layers, summed; its code is single-image, and on multi-view
  layouts every view keeps its own top-T as FasterVLM's (an extension; ``crops="budget"``: by size).
- HiRED: the base (full-image) view gets ``alpha`` of the selected patches, the crops share the rest
  in proportion to how many of the base view's early-layer top-[CLS] patches fall in each crop's chunk
  of the base's patch list, as its code; top-k per view by the deep layer (``crops="budget"``: group
  shares by the paper's spatial mapping).

On a single-group layout every one of them is one top-k over the tokens.

Tower layers: the references fix them for LLaVA-1.5's 24-layer CLIP ViT-L/14-336 tower, which feeds
the projector from layer 22 (``attentions[-2]``). A reference layer l is placed on a tower of depth
V at ``round(l * V / 24)``, clamped to ``0..projector_feed_tower_layer``; the reference's feed layer
(22) maps onto this model's feed layer exactly (see ``tower_layer``).

The helpers here (``tower_layer``, ``cls_need``, ``group_shares``, ``top_k_per_group``) are shared
with ``visionzip.py`` and ``hiprune.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np

from workbench.layout import VisualLayout
from workbench.pruning.budget import split_budget
from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed
from workbench.pruning.padded_grid import padded_grid_for, transposed_sequence
from workbench.pruning.plan import PRE_LLM, SEPARATOR_POLICIES, KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method
from workbench.tower_map import owners, tower_scores, tower_views

REFERENCE_TOWER_DEPTH = 24  # CLIP ViT-L/14-336 in LLaVA-1.5 / LLaVA-NeXT
REFERENCE_FEED_LAYER = 22  # its projector reads hidden_states[-2] = the output of layer 22 (0-based)

NO_CLS_REASON = ("its vision tower has no [CLS] token, and the reference authors give no fallback "
                 "for [CLS]-free towers")


# --- shared helpers --------------------------------------------------------------------------------

def tower_layer(reference_layer: int, model: ModelFacts, reference_depth: int = REFERENCE_TOWER_DEPTH,
                reference_feed: int | None = REFERENCE_FEED_LAYER) -> int:
    """A 0-based tower layer of the reference tower placed on ``model``'s tower: the reference's
    projector-feed layer is this model's feed layer; any other layer keeps its relative depth,
    ``round(l * V / reference_depth)``, clamped to ``0..feed``."""
    feed = model.projector_feed_tower_layer
    if reference_feed is not None and reference_layer == reference_feed:
        return feed
    if model.vision_layers == reference_depth:
        return min(max(int(reference_layer), 0), feed)
    return min(max(int(round(reference_layer * model.vision_layers / reference_depth)), 0), feed)


def cls_need(layer: int) -> SignalNeed:
    return SignalNeed("attention", "tower", int(layer), "cls")


def row_scores(context: SelectionContext, need: SignalNeed) -> np.ndarray:
    """The [N] head-mean attention of one recorded tower query row kind on the visual tokens.

    The tower records [1, patches] per tower view (crop, tile, frame) in its own patch order; the
    layout's tower map (``VisualLayout.tower_owner``, see ``workbench.tower_map``) folds every view
    onto the layout's tokens, a token's score being the MEAN over the patches it owns (one patch per
    token on LLaVA-1.5-style models, where this is the recorded row itself; 4 on Qwen2-VL and
    Idefics3; pooled OneVision tokens own the patches nearest them). Patches that feed no token
    (unpadded away) are dropped. A layout without a map is read as the identity when the tower has
    one view of N patches, and refused otherwise."""
    return tower_scores(context.recording, context.layout, need.signal, need.layer, need.rows, reduce="mean")


def weighted_split(total: int, weights, caps) -> list[int]:
    """Share ``total`` among groups in proportion to ``weights`` (largest remainder, ties to the
    earlier group), never more than ``caps``; what a capped group cannot take goes to the others in
    proportion to their weights (equal weights when all remaining weights are zero)."""
    weights = np.asarray(weights, dtype=np.float64)
    caps = np.asarray(caps, dtype=np.int64)
    if total > caps.sum():
        raise ValueError(f"cannot keep {total} tokens out of {caps.sum()}")
    shares = np.zeros(len(caps), dtype=np.int64)
    remaining = total
    while remaining > 0:
        open_ = shares < caps
        w = np.where(open_, weights, 0.0)
        if w.sum() <= 0:
            w = open_.astype(np.float64)
        exact = remaining * w / w.sum()
        add = np.minimum(np.floor(exact).astype(np.int64), caps - shares)
        left = remaining - add.sum()
        order = sorted(np.flatnonzero(open_), key=lambda g: (-(exact[g] - np.floor(exact[g])), g))
        for g in order:
            if left == 0:
                break
            if shares[g] + add[g] < caps[g]:
                add[g] += 1
                left -= 1
        shares += add
        remaining = total - shares.sum()
    return [int(s) for s in shares]


def group_members(layout: VisualLayout) -> list[np.ndarray]:
    return [np.flatnonzero(layout.group == g) for g in range(len(layout.groups))]


def top_k_per_group(layout: VisualLayout, scores: np.ndarray, shares) -> tuple[int, ...]:
    """The ``shares[g]`` highest-scoring tokens of each group g (ranking.top_k within the group)."""
    kept = [top_k(scores, int(k), among=members) for members, k in zip(group_members(layout), shares)]
    return tuple(sorted(int(i) for part in kept for i in part))


def size_shares(layout: VisualLayout, n_keep: int) -> list[int]:
    return split_budget(n_keep, [g.rows * g.cols for g in layout.groups])


# crops: how the views (base image, crops) of a multi-view layout share the budget. "reference": as the
# codes that crop (FasterVLM's llava_arch.py): every view keeps its own top-T patches, the same T for
# each, before unpadding drops the crop patches outside the image; "budget": each token group keeps
# its share of n_keep by size (one top-k per group, exactly n_keep).
CROP_RULES = ("reference", "budget")


def per_view_count(layout: VisualLayout, n_keep: int, patches: int) -> int:
    """The code's per-crop ``visual_token_num`` T for a view of ``patches`` patches: the budget's
    ratio of it, rounded (its README: 576 x (1 - 0.9) = 58 for a 90 % reduction)."""
    return int(round(patches * n_keep / layout.n_tokens))


def view_cls_rows(context: SelectionContext, layers) -> list[np.ndarray]:
    """Per tower view (in the tower's order), its [P_v] recorded [CLS] row (head mean) summed over ``layers``."""
    per_layer = [tower_views(context.recording, context.layout, "attention", int(layer), "cls") for layer in layers]
    return [np.sum([views[v].reshape(-1) for views in per_layer], axis=0) for v in range(len(per_layer[0]))]


def keep_view_patches(layout: VisualLayout, rows, counts) -> tuple[int, ...]:
    """The top ``counts[v]`` patches of every view v by its own ``rows[v]`` (ties: the lower index),
    each mapped to the layout token that owns it by the layout's tower map; a patch that feeds no
    token (unpadded away) is lost with its slot."""
    kept = set()
    for row, owner, count in zip(rows, owners(layout, [len(r) for r in rows]), counts):
        for patch in top_k(row, min(int(count), len(row))):
            if owner[patch] >= 0:
                kept.add(int(owner[patch]))
    return tuple(sorted(kept))


def per_view_top_k(context: SelectionContext, layers) -> tuple[int, ...]:
    """The codes' multi-crop rule on the recorded [CLS] rows (summed over ``layers``): the top
    ``per_view_count`` patches of every view by its own row (``keep_view_patches``)."""
    rows = view_cls_rows(context, layers)
    return keep_view_patches(context.layout, rows,
                             [per_view_count(context.layout, context.n_keep, len(r)) for r in rows])


def check_crop_rule(method: str, value) -> None:
    if value not in CROP_RULES:
        raise ValueError(f"{method}: crops must be one of {CROP_RULES}, got {value!r}")


def check_tower_layer(method: str, value) -> None:
    """Refuse a tower layer that is not a 0-based layer of the 24-layer reference tower."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < REFERENCE_TOWER_DEPTH:
        raise ValueError(f"{method}: reference_layer must be an int in 0..{REFERENCE_TOWER_DEPTH - 1} "
                         f"(0-based, 24-layer reference tower), got {value!r}")


class ClsAttentionMethod(PreLLMMethod):
    """Base of the methods that read the tower's [CLS] row, before the LLM: not applicable without a [CLS]."""

    scored_by: ClassVar[str] = "visual_attention"

    def applicability(self, model: ModelFacts) -> str | None:
        return None if model.has_cls_token else NO_CLS_REASON

    def cls_layers(self, model: ModelFacts) -> tuple[int, ...]:
        raise NotImplementedError

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        if self.applicability(model) is not None:
            return ()  # select() raises MethodNotApplicable; a sweep's shared recording needs nothing
        return tuple(cls_need(layer) for layer in self.cls_layers(model))

    def summed_cls(self, context: SelectionContext, layers) -> np.ndarray:
        return np.sum([row_scores(context, cls_need(layer)) for layer in layers], axis=0)

    def top_k_plan(self, context: SelectionContext, scores: np.ndarray, shares) -> KeepPlan:
        kept = top_k_per_group(context.layout, scores, shares)
        return self.plan(context, [Stage(PRE_LLM, kept, tuple(scores), position=self.entry_position(context))])


class ClsAndFeaturesMethod(ClsAttentionMethod):
    """Base of the methods that read the [CLS] row and the tokens' features at one tower layer
    (``reference_layer`` of the 24-layer reference tower, placed by relative depth)."""

    reference_layer: int

    def layer(self, model: ModelFacts) -> int:
        return tower_layer(self.reference_layer, model)

    def cls_layers(self, model: ModelFacts) -> tuple[int, ...]:
        return (self.layer(model),)

    def _feature_need(self, model: ModelFacts) -> SignalNeed:
        return SignalNeed("visual_states_out", "tower", self.layer(model))

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        if self.applicability(model) is not None:
            return ()
        return (cls_need(self.layer(model)), self._feature_need(model))


class PerViewClsTopK(ClsAttentionMethod):
    """Base of the methods that keep the patches of highest [CLS] attention summed over
    ``cls_layers``: on a multi-view layout under ``crops="reference"`` the code's top-T of every view
    before unpadding (``per_view_top_k``; ``kept_counts`` says how many survive), else one top-k per
    token group by size shares of exactly n_keep."""

    crops: str

    def per_view(self, layout: VisualLayout) -> bool:
        return self.crops == "reference" and len(layout.tower_owner) > 1

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        if self.per_view(context.layout):
            return (len(self.select(context).final_kept),)
        return (context.n_keep,)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        scores = self.summed_cls(context, self.cls_layers(model))
        if self.per_view(context.layout):
            kept = per_view_top_k(context, self.cls_layers(model))
            return self.plan(context, [Stage(PRE_LLM, kept, tuple(scores), position=self.entry_position(context))])
        return self.top_k_plan(context, scores, size_shares(context.layout, context.n_keep))


# --- FasterVLM -------------------------------------------------------------------------------------

@register_method("fastervlm")
@dataclass(frozen=True)
class FasterVLM(PerViewClsTopK):
    """FasterVLM: keep the patch tokens with the highest [CLS] attention (head mean) at the tower layer
    that feeds the projector (``attentions[-2]`` = layer 22 of LLaVA's 24-layer CLIP tower; here
    ``projector_feed_tower_layer``), before the LLM. On a multi-view (AnyRes) layout the code runs its
    top-k on every view, the base image and each crop, with the same count T (``encode_images`` on
    the concatenated views, llava_arch.py lines 141-157), and only then unpads the stitched crops and
    appends the row-end newlines (lines 182-220): crop patches chosen in the padding are lost, so the
    code keeps fewer than T per view there. ``crops="reference"`` (the default) does the same with T
    the budget's ratio of a view's patches (``per_view_count``; ``kept_counts`` says how many
    survive); ``crops="budget"`` is the old rule: each token group keeps its share of exactly n_keep
    by size, one top-k per group. A single-view layout is one top-k of n_keep either way.
    ``reference_layer``: the 0-based layer of the 24-layer reference tower (22 = the feed layer)."""

    reference: ClassVar[str] = (
        "Zhang et al., '[CLS] Attention is All You Need for Training-Free Visual Token Pruning: Make VLM "
        "Inference Faster', arXiv:2412.01818v1. Code: github.com/Theia-4869/FasterVLM, "
        "llava/model/multimodal_encoder/clip_encoder.py (feature_select: attentions[select_layer=-2][:, :, 0, 1:]) "
        "and llava/model/llava_arch.py (encode_images: mean over heads, topk of visual_token_num per crop). "
        "Paper and code agree. Followed: head-mean [CLS] row at the projector-feed tower layer; on multi-view "
        "layouts the top-T of every view before unpadding, T the budget's ratio of a view (crops=budget: per-group "
        "shares of exactly the budget).")

    reference_layer: int = REFERENCE_FEED_LAYER
    crops: str = "reference"

    def __post_init__(self):
        super().__post_init__()
        check_tower_layer("fastervlm", self.reference_layer)
        check_crop_rule("fastervlm", self.crops)

    def cls_layers(self, model: ModelFacts) -> tuple[int, ...]:
        return (tower_layer(self.reference_layer, model),)


# --- VTC-CLS ---------------------------------------------------------------------------------------

@register_method("vtc_cls")
@dataclass(frozen=True)
class VtcCls(PerViewClsTopK):
    """VTC-CLS: the [CLS] attention (head mean) SUMMED over the tower layers ``start_layer`` up to the
    projector-feed layer (the reference sums ``attentions[start_layer:-1]``: layers 16..22 of the
    24-layer CLIP tower with its default ``--layer 16``), then top-k before the LLM. The reference then
    re-sorts the kept tokens into their original (spatial) order; our plans always keep tokens in
    original order, so that is implied. ``start_layer`` is 0-based on the 24-layer reference tower and
    placed on this tower by relative depth (``tower_layer``); the range ends at this model's feed layer.

    Multi-view (AnyRes) layouts are an extension beyond the released code, which handles one 576-patch
    image only: its ``cls_token_only`` averages ``attentions[l].squeeze(0)`` over dim 0, the views
    rather than the heads once several views are batched (clip_encoder.py lines 322-325), its
    ``encode_images`` takes ``topk(dim=0)`` against a hard-coded ``arange(0, 576)`` (llava_arch.py
    lines 169-172), and the AnyRes merge then fails its ``height * width == base`` check (line 213).
    ``crops="reference"`` (the default) applies the code's rule to every view, as the LLaVA code path
    would if it called the same function on each view's features: each view (the base image and each
    crop) keeps its own top-T by its own summed [CLS] rows, T the budget's ratio of a view
    (``per_view_count``, as FasterVLM's per-crop count), before the crops are stitched and unpadded; a
    crop patch chosen in the padding is lost, so ``kept_counts`` reports the survivors. The row-end
    newlines stay, as in the LLaVA merge (llava_arch.py lines 222-225). ``crops="budget"`` is the
    earlier rule: each token group keeps its share of exactly n_keep by size. A single-view layout is
    one top-k of n_keep either way (the released code)."""

    reference: ClassVar[str] = (
        "Wang et al., '[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs', "
        "arXiv:2412.05819. Code: github.com/THU-MIG/VTC-CLS, llava/model/multimodal_encoder/clip_encoder.py "
        "(cls_token_only: sum over attentions[start_layer:-1] of the head-mean [CLS] row) and "
        "llava/model/llava_arch.py (topk, then argsort back to spatial order); default start layer 16 from "
        "llava/eval/model_vqa_loader.py (--layer). The paper describes 'ensembling' layers; the code sums "
        "them (followed here). The code handles one 576-patch image only; on multi-view (AnyRes) layouts we "
        "extend it by applying its rule to every view (top-T per view before unpadding, crops=reference); "
        "crops=budget: per-group shares of exactly the budget.")

    start_layer: int = 16
    crops: str = "reference"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.start_layer, bool) or not isinstance(self.start_layer, (int, np.integer)) \
                or not 0 <= self.start_layer <= REFERENCE_FEED_LAYER:
            raise ValueError(f"vtc_cls: start_layer must be an int in 0..{REFERENCE_FEED_LAYER} (0-based, "
                             f"24-layer reference tower), got {self.start_layer!r}")
        check_crop_rule("vtc_cls", self.crops)

    def cls_layers(self, model: ModelFacts) -> tuple[int, ...]:
        start = tower_layer(self.start_layer, model)
        return tuple(range(start, model.projector_feed_tower_layer + 1))


# --- HiRED -----------------------------------------------------------------------------------------

@register_method("hired")
@dataclass(frozen=True)
class HiRED(ClsAttentionMethod):
    """HiRED: share the budget across the views of a high-resolution (AnyRes) image, then keep the
    top-k of each view by deep-layer [CLS] attention.

    The code's rule (LLaVA-NeXT, ``crops="reference"``, the default; transformers/src/transformers/models/
    llava_next/modeling_llava_next.py): [CLS] rows of tower layers 0 (early) and 22 (deep, the feed
    layer), heads summed (lines 534-535, 966-967; the sum ranks as our head mean does). With V views of P
    patches (the base image first, then the crops) it selects ``total = int(V * P * rate)`` patches
    (line 538); the base view gets ``min(int(total * alpha), P)`` of them by the deep row (lines 539,
    547), the crops ``min(total - base, (V - 1) * P)`` (line 540), split by the base view's top
    ``int(P * (1 - alpha))`` patches by the early row (line 551): the base's flattened patch list is cut
    into V - 1 equal contiguous chunks, chunk i standing for crop i (``reshape`` then ``sum``, lines
    508-511), and crop i gets ``int(share_i * crop_budget)`` in float32 (``.int()`` of the ratio times
    the budget, line 514), at most P (line 516); each crop keeps that many by its own deep row (line
    556). The crops' masks are then stitched and unpadded with their features (lines 816-828): a crop
    patch chosen in the padding is lost with its slot, so the code keeps fewer than ``total``;
    ``kept_counts`` reports the survivors. At a rate of 1 it drops nothing (line 989). Where the code
    cannot run, we extend it: when V - 1 does not
    divide P (its ``reshape`` fails) patch j is in chunk ``j * (V - 1) // P``; when no early patch is
    chosen (alpha = 1, where it divides by zero) the crops keep nothing. ``rate`` is a fractional
    budget as given (``count="floor"``, the code's ``int``), else the budget's ratio of the layout's
    tokens (``n_keep / N``; ``count="budget"`` rounds ``V * P * rate`` half up instead of flooring).

    Image newlines (``separators``): the code puts no image-newline token into the LLM input, for
    every image and at every rate, pruning on or off: its forward's only image path packs the features
    with ``image_newline=None`` (line 1011), and both branches of ``pack_HiRED_image_features`` add a
    newline only when one is given (lines 830, 854). ``separators="dropped"`` (default) does the same:
    on the layouts it runs on (``anyres``: LLaVA-NeXT's base view plus crops; under either ``crops``
    rule) the pre-LLM stage leaves
    the layout's separators, the model's newlines, out of the LLM input, at a budget of 1 too, and the
    LLM numbers the shorter sequence as ``position`` says; ``"kept"`` keeps them where the model puts
    them. Other layouts keep their separators either way (the code never saw them).

    Crop stitching (``stitching``): the code's packing reads the crop grid's shape as (width, height)
    (line 816) where its ``get_anyres_image_grid_shape`` returns (rows, cols) (line 127), an accident
    that matters on a non-square crop grid only: the crops, row-major, fill a cols x rows grid of tiles
    (``view`` then ``permute``, lines 821-826), which ``unpad_image`` (lines 167-206) cuts for the
    image's size as if it were the image's padded grid (lines 827-828), and the LLM gets the chosen
    crop patches inside that cut in its raster order: patches the model's stitching unpads away can
    enter (its padding), chosen patches outside the cut are lost, and the order is not the model's.
    ``stitching="code"`` (default) reproduces that sequence exactly (deterministic: no set order is
    involved): it is ``padded_grid.transposed_sequence``, each crop patch at most once, the kept ones
    moved and the padding ones brought in (``padded_patch``) right before the tile block; it needs
    LLaVA-NeXT's stitched crop grid (one clear line otherwise). ``"model"`` places the chosen patches
    by the model's own stitching and unpadding instead. Square crop grids are the same either way.

    ``crops="budget"`` (the earlier rule, and the rule on layouts whose tower map does not start with a
    base view, or has none): the layout's token groups share the budget; a group named ".../base" or
    ".../global" gets ``floor(n * alpha)``, the other groups share the rest in proportion to how many
    of the base group's top ``floor(N_base * (1 - alpha))`` tokens by the early layer have their
    pixel-box centre inside each group's bounding box (the paper's spatial mapping), by largest
    remainders, exactly the kept count; without a base group the groups share in proportion to their
    summed early-layer [CLS] attention. On a single group (LLaVA-1.5, HiRED's models/llava/
    modeling_llava.py) it is one top-k by the deep layer either way.

    Kept count on a single group or under ``crops="budget"`` (``count``): "floor" (default, the code:
    ``int(N * token_budget_rate)``, models/llava/modeling_llava.py line 352) on a fractional budget, a
    count kept as given; "budget" keeps the workbench's half-up ``n_keep`` (they differ where
    ``budget * N`` is not whole: 0.22 of 144 is 31 in the code, 32 here)."""

    reference: ClassVar[str] = (
        "Arif et al., 'HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution "
        "Vision-Language Models in Resource-Constrained Environments', arXiv:2408.10945. Code: "
        "github.com/hasanar1f/HiRED, transformers/src/transformers/models/llava_next/modeling_llava_next.py "
        "(HiRED_token_selection, HiRED_sub_img_budgets; vit_top_layer=0, vit_bottom_layer=22, heads summed) "
        "and models/llava/modeling_llava.py (single image: top-k by layer 22); alpha=0.5 from "
        "accuracy_benchmarks/*.sh. Followed (crops=reference): int(V*P*rate) patches over the padded views, "
        "the base view's alpha share by layer 22, the crops' shares from the base view's layer-0 top patches "
        "cut into contiguous chunks (floored), top-k per view, padded picks lost, no image-newline tokens in "
        "the LLM input (separators=dropped; separators=kept keeps the model's), the crops stitched as its "
        "packing reads the grid shape, transposed on a non-square grid (stitching=code; stitching=model "
        "stitches as the model does). crops=budget: group shares of exactly the "
        "budget with the paper's spatial mapping.")

    stitchings: ClassVar[tuple[str, ...]] = ("code", "model")

    alpha: float = 0.5
    early_layer: int = 0
    deep_layer: int = REFERENCE_FEED_LAYER
    count: str = "floor"
    crops: str = "reference"
    separators: str = "dropped"
    stitching: str = "code"

    def __post_init__(self):
        super().__post_init__()
        if self.stitching not in self.stitchings:
            raise ValueError(f"hired: stitching must be one of {self.stitchings}, got {self.stitching!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"hired: alpha must be a number in [0, 1], got {self.alpha!r}")
        for name in ("early_layer", "deep_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or not 0 <= value < REFERENCE_TOWER_DEPTH:
                raise ValueError(f"hired: {name} must be an int in 0..{REFERENCE_TOWER_DEPTH - 1} "
                                 f"(0-based, 24-layer reference tower), got {value!r}")
        if self.count not in ("floor", "budget"):
            raise ValueError(f"hired: count must be one of ('floor', 'budget'), got {self.count!r}")
        check_crop_rule("hired", self.crops)
        if self.separators not in SEPARATOR_POLICIES:
            raise ValueError(f"hired: separators must be one of {SEPARATOR_POLICIES}, got {self.separators!r}")

    @staticmethod
    def anyres(layout: VisualLayout) -> bool:
        """The layout is one the code's LLaVA-NeXT path runs on: several tower views, view 0 (the base
        image) feeding the base group; its separators are the model's image newlines."""
        if len(layout.tower_owner) < 2:
            return False
        fed = layout.tower_owner[0][layout.tower_owner[0] >= 0]
        return len(fed) > 0 and all(layout.groups[g].is_base_view for g in np.unique(layout.group[fed]))

    def per_view(self, layout: VisualLayout) -> bool:
        """The code's per-view rule applies (``crops="reference"`` on an ``anyres`` layout)."""
        return self.crops == "reference" and self.anyres(layout)

    def separator_policy(self, layout: VisualLayout) -> str:
        """What the pre-LLM stage does with the layout's separators: ``separators`` on the layouts the
        code runs on (it packs no newline, line 1011), "kept" on any other (whose separators, tile
        markers or a passed [CLS], the code never saw)."""
        return self.separators if self.anyres(layout) else "kept"

    def kept_count(self, context: SelectionContext) -> int:
        """Tokens kept on one group or under ``crops="budget"``: the code's ``int(N * rate)`` for a
        fractional budget under ``count="floor"``."""
        budget = context.budget
        if self.count == "floor" and isinstance(budget, float):
            return min(int(context.n_visual * budget), context.n_visual)
        return context.n_keep

    def selected_total(self, context: SelectionContext, slots: int) -> int:
        """Patches the per-view rule selects over ``slots`` = V * P padded view patches."""
        budget = context.budget
        if self.count == "floor" and isinstance(budget, float):
            return min(int(slots * budget), slots)  # the code's int(num_patch * num_vision_tokens * rate)
        exact = Fraction(slots * context.n_keep, context.n_visual)
        return min(math.floor(exact if self.count == "floor" else exact + Fraction(1, 2)), slots)

    def view_counts(self, context: SelectionContext, early_rows) -> list[int]:
        """Patches each view selects (view 0 the base), by the code's split (see the class docstring)."""
        views, patches = len(early_rows), len(early_rows[0])
        budget = context.budget
        if (budget >= 1.0 if isinstance(budget, float) else context.n_keep >= context.n_visual):
            return [patches] * views  # the code drops tokens only when token_budget_rate < 1.0
        total = self.selected_total(context, views * patches)
        base = min(int(total * self.alpha), patches)
        crop_budget = min(total - base, (views - 1) * patches)
        counts = [base] + [0] * (views - 1)
        if crop_budget > 0:
            chosen = top_k(early_rows[0], int(patches * (1 - self.alpha)))
            hits = np.bincount(chosen * (views - 1) // patches, minlength=views - 1)
            if hits.sum() > 0:
                # float32 as the code's torch division of the two integer tensors; .int() truncates
                ratio = hits.astype(np.float32) / np.float32(hits.sum())
                counts[1:] = np.minimum((ratio * np.float32(crop_budget)).astype(np.int64), patches).tolist()
        return [int(c) for c in counts]

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        if self.per_view(context.layout):
            return (len(self.select(context).final_kept),)
        return (self.kept_count(context),)

    def cls_layers(self, model: ModelFacts) -> tuple[int, ...]:
        return tuple(sorted({tower_layer(self.early_layer, model), tower_layer(self.deep_layer, model)}))

    def shares(self, context: SelectionContext, early: np.ndarray) -> list[int]:
        """Tokens each group keeps (see the class docstring)."""
        layout, n_keep = context.layout, self.kept_count(context)
        members = group_members(layout)
        sizes = [len(m) for m in members]
        if len(members) == 1:
            return [n_keep]
        bases = [g for g, grp in enumerate(layout.groups) if grp.is_base_view]
        if not bases:
            weights = [early[m].sum() for m in members]
            return weighted_split(n_keep, weights, sizes)
        base = bases[0]
        others = [g for g in range(len(members)) if g != base]
        base_share = min(int(np.floor(n_keep * self.alpha)), sizes[base])
        rest = n_keep - base_share
        if rest > sum(sizes[g] for g in others):  # the others cannot hold the rest: the base takes it
            base_share = n_keep - sum(sizes[g] for g in others)
            rest = n_keep - base_share
        n_top = int(np.floor(sizes[base] * (1.0 - self.alpha)))
        chosen = top_k(early, n_top, among=members[base])
        boxes = layout.boxes[chosen]
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
        weights = []
        for g in others:
            b = layout.boxes[members[g]]
            x0, y0, x1, y1 = b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()
            inside = (centres[:, 0] >= x0) & (centres[:, 0] < x1) & (centres[:, 1] >= y0) & (centres[:, 1] < y1)
            weights.append(float(inside.sum()))
        shares = [0] * len(members)
        shares[base] = base_share
        for g, k in zip(others, weighted_split(rest, weights, [sizes[g] for g in others])):
            shares[g] = k
        return shares

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        early_layer, deep_layer = tower_layer(self.early_layer, model), tower_layer(self.deep_layer, model)
        deep = row_scores(context, cls_need(deep_layer))
        appends = ()
        if self.per_view(context.layout):
            counts = self.view_counts(context, view_cls_rows(context, [early_layer]))
            rows = view_cls_rows(context, [deep_layer])
            grid = padded_grid_for(context.layout, "hired", "hired:stitching=model") \
                if self.stitching == "code" else None
            if grid is not None and grid.tiles[0] != grid.tiles[1]:  # the code's transposed stitching
                chosen = {v: top_k(row, min(int(c), len(row))) for v, (row, c) in enumerate(zip(rows, counts))}
                kept, appends = transposed_sequence(context.layout, grid, chosen)
            else:
                kept = keep_view_patches(context.layout, rows, counts)
        else:
            early = row_scores(context, cls_need(early_layer))
            kept = top_k_per_group(context.layout, deep, self.shares(context, early))
        return self.plan(context, [Stage(PRE_LLM, kept, tuple(deep), position=self.entry_position(context),
                                         appends=appends, separators=self.separator_policy(context.layout))])
