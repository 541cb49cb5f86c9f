"""FEATHER: RoPE-free last-token attention plus a uniform grid, then a second, deeper cut."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from workbench.layout import VisualLayout
from workbench.pruning.layers import check_reference_layers, scaled_layer
from workbench.pruning.method import MethodNotApplicable, ModelFacts, PruningMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import KeepPlan, Stage
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method

BUDGET_MODES = ("final", "fixed")


def stride_grid(layout: VisualLayout, stride: int) -> np.ndarray:
    """Original indices of every group's tokens at (row, col) with row % stride == col % stride == 0
    (the reference's ``grid_indices[::s, ::s]`` on each grid)."""
    cells = np.asarray(layout.cell)
    return np.flatnonzero((cells[:, 0] % stride == 0) & (cells[:, 1] % stride == 0))


def norope_last_attention(state) -> np.ndarray:
    """The last token's attention on the live visual tokens without RoPE, softmax over the visual
    keys only, head mean: [M] in sequence order (the reference's ``calculate_attention_weight``;
    the recorded ``attention_norope_visual`` on the live state). Rotary embeddings are made the
    identity (cos=1, sin=0) so the captured q/k are pre-RoPE; a softmax over all keys renormalised
    per head over the visual keys equals the visual-only softmax."""
    cos, sin = state.position_embeddings
    plain = dataclasses.replace(state, position_embeddings=(torch.ones_like(cos), torch.zeros_like(sin)))
    probs = plain.attention(state.text_rows[-1:])[:, 0]  # [H, S]
    visual = probs[:, state.visual_rows.to(probs.device)].double()
    visual = visual / visual.sum(-1, keepdim=True).clamp_min(1e-300)
    return visual.mean(0).cpu().numpy()


@register_method("feather")
@dataclass(frozen=True)
class Feather(PruningMethod):
    """FEATHER (Endo et al., "Feather the Throttle: Revisiting Visual Token Pruning for
    Vision-Language Model Acceleration", arXiv 2412.13180; code markendo/FEATHER,
    ``prismatic-vlms/prismatic/models/backbones/llm/llama2_models.py`` (``FastVLlamaModel``),
    run by ``vlm-evaluation/scripts/eval_feather.sh``: ``fastv_k=[8, 16]``, ``fastv_ratio=0.7``,
    ``fastv_predefined_mask="no_rope_s=3"``).

    Before layer K1=8 (scaled): the top ``int(N * (1 - r))`` visual tokens by the LAST token's
    attention computed without RoPE in layer K1-1 (on that layer's input), united with a uniform
    stride-3 grid (``grid[::3, ::3]``, per group here); M tokens survive. Before layer K2=16
    (scaled): the top ``int(M * (1 - r)^2)`` of the M survivors (the code re-sets ``image_indices``
    to the survivors after the first cut, llama2_models.py line 201, and the second cut keeps
    ``int(len(image_indices) * fastV_ratio**2)``, line 162) by the same RoPE-free attention, now of
    layer K2-1 on the live pruned sequence (a layer callback; the identity rotary makes LayerState's q/k pre-RoPE).
    Position ids are kept (the reference slices ``position_ids[:, keep_indexs]``).

    Both cuts rank as the reference does: each head's softmax over the image keys only, then the
    head mean. The first cut reads it from the unpruned recording (``attention_norope_visual``),
    the second computes it on the live pruned state.

    Budget: ``budget_mode="fixed"`` (default, the reference code with eval_feather.sh's r=0.7) uses
    ``ratio`` and ignores n_keep: ``int(N * (1 - r))`` then ``int(M * (1 - r)**2)``, as above.
    ``"final"`` (ours) matches the final count to the budget with keep-fraction f = sqrt(n_keep/N):
    the first cut's top ``int(N*f)`` plus the grid, the second exactly n_keep. ``kept_counts``: the
    first stage's size (attention top-k united with the grid, read from the recording) and the final count.
    """

    scored_by: ClassVar[str] = "text_attention"

    reference: ClassVar[str] = (
        "FEATHER, 'Feather the Throttle' (arXiv 2412.13180); code markendo/FEATHER, prismatic-vlms/prismatic/"
        "models/backbones/llm/llama2_models.py + vlm-evaluation/scripts/eval_feather.sh (k=[8,16], r=0.7, "
        "no_rope_s=3). Cut 1 before layer 8: top int(N*0.3) by last-token RoPE-free attention of layer 7 "
        "united with a stride-3 grid; cut 2 before layer 16: top int(N*0.09) by layer 15's, original "
        "positions; both rank by each head's softmax over the image keys, then the head mean. Default "
        "budget_mode='fixed' is the code's count (cut 2 keeps int(M*0.09) of the M survivors; the budget is "
        "ignored); variant budget_mode='final' matches the final count to the budget (f = sqrt(n_keep/N)).")

    layers: tuple[int, ...] = (8, 16)
    ratio: float = 0.7  # reduction ratio r per cut, used by budget_mode="fixed"
    stride: int = 3
    budget_mode: str = "fixed"

    def __post_init__(self):
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if len(layers) != 2 or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                                   for k in layers) or layers[0] >= layers[1]:
            raise ValueError(f"feather: layers must be two increasing ints >= 1 (the reference's two cuts), "
                             f"got {self.layers!r}")
        check_reference_layers("feather", "layers", layers)
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"feather: ratio (reduction per cut) must be in [0, 1), got {self.ratio!r}")
        if isinstance(self.stride, bool) or not isinstance(self.stride, (int, np.integer)) or self.stride < 1:
            raise ValueError(f"feather: stride must be an int >= 1, got {self.stride!r}")
        check_choice("feather", "budget_mode", self.budget_mode, BUDGET_MODES)

    def cut_layers(self, model: ModelFacts) -> tuple[int, int]:
        return tuple(scaled_layer(k, model.decoder_layers) for k in self.layers)

    def applicability(self, model: ModelFacts) -> str | None:
        if model.decoder_layers < 3:
            return f"its two cuts need distinct layers >= 1, this decoder has {model.decoder_layers} layers"
        first, second = self.cut_layers(model)
        if first >= second:
            return f"its cuts at layers {self.layers} fold into one layer ({first}) on {model.decoder_layers} layers"
        return None

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        return (SignalNeed("attention_norope_visual", "llm", self.cut_layers(model)[0] - 1, "last"),)

    def counts(self, context: SelectionContext, survivors: int | None = None) -> tuple[int, int]:
        """(attention top-k of the first cut, tokens kept by the second cut); ``survivors``: the
        first cut's kept count M (read from the recording when not given)."""
        n = context.n_visual
        if self.budget_mode == "fixed":
            keep = 1.0 - self.ratio  # the code's fastV_ratio = 1 - fastv_ratio
            if survivors is None:
                survivors = len(self.first_stage(context).kept)
            return int(n * keep), int(survivors * (keep * keep))
        first = int(math.floor(math.sqrt(context.n_keep * n) + 1e-9))
        return max(first, context.n_keep), context.n_keep

    def first_count(self, context: SelectionContext) -> int:
        """The first cut's attention top-k (before the grid is added)."""
        n = context.n_visual
        if self.budget_mode == "fixed":
            return int(n * (1.0 - self.ratio))
        return max(int(math.floor(math.sqrt(context.n_keep * n) + 1e-9)), context.n_keep)

    def first_stage(self, context: SelectionContext) -> Stage:
        model = context.require_model()
        self.check_applies(model)
        (need,) = self.needs(model)
        scores = context.signal(need).mean(axis=0)
        kept = np.union1d(top_k(scores, self.first_count(context)), stride_grid(context.layout, self.stride))
        return Stage(self.cut_layers(model)[0], tuple(kept), tuple(scores), position="original")

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        first = len(self.first_stage(context).kept)
        return first, min(self.counts(context, first)[1], first)

    def select(self, context: SelectionContext) -> KeepPlan:
        return self.plan(context, [self.first_stage(context)])

    def layer_callback(self, context: SelectionContext):
        model = context.require_model()
        _, second = self.cut_layers(model)
        n_visual = context.n_visual
        pending = {}

        def callback(layer, state):
            if layer == second - 1:  # the reference scores with the layer before the cut, on its input
                if len(state.text_rows) == 0:
                    raise MethodNotApplicable("feather: no text token after the image to rank with")
                pending["scores"] = norope_last_attention(state)
                pending["alive"] = np.asarray(state.visual_indices)
                return None
            if layer != second:
                return None
            alive = np.asarray(state.visual_indices)
            if not np.array_equal(alive, pending.get("alive")):
                raise RuntimeError("feather: the visual tokens changed between scoring and the second cut")
            scores = np.full(n_visual, np.nan)
            scores[alive] = pending["scores"]
            count = self.counts(context, len(alive))[1]
            kept = top_k(scores, min(count, len(alive)), among=alive)
            return Stage(layer, tuple(kept), tuple(scores), position="original")

        return callback
