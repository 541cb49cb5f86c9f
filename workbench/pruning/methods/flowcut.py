"""FlowCut (Tong et al. 2025): progressive [CLS]-relay pruning inside the vision tower.

By default the cuts run inside the tower (``progression="tower"``, ``workbench/pruning/tower_stages.py``):
each tower layer's scores are computed from its own attention on the tokens still alive, as in the
released code; ``progression="simulated"`` computes every layer's scores from the unpruned recording.

Per tower layer each patch gets the relay score ``(a/sum a + s/sum s) * ||v||_1`` (``a``: head-mean
[CLS] attention, ``s``: head-mean softmax of the [CLS] value against every value, ``v``: head-mean
value vector), recorded by the ``flowcut`` probe (probes/flow.py, checked against the released
code's ``compute_score``). The scores are averaged layer by layer (``0.5 old + 0.5 new``) and, at
every other layer, part of the patches is dropped: ``round((n - target) / sqrt(rpl) *
(1 - (H/H_max)^2))`` of them, with ``H`` the entropy of the [CLS] attention over the live patches
and ``rpl`` the layers left before the final cut, which keeps exactly the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from probes.flow import flowcut_score
from workbench.pruning.method import ModelFacts, PreLLMMethod, SelectionContext, SignalNeed, check_choice
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage, tower_where
from workbench.pruning.ranking import top_k
from workbench.pruning.registry import register_method
from workbench.pruning.tower_stages import PROGRESSIONS, TowerState, in_tower_reason
from workbench.tower_map import tower_scores, tower_to_layout, tower_views


def final_cut_layer(model: ModelFacts) -> int:
    """The tower layer after which the reference keeps exactly the budget.

    The released code counts ``rpl = select_layer - idx - 1`` down to 0, with ``select_layer`` the
    tower layer that feeds the projector (22 in LLaVA-1.5's 24-layer tower, ``len(layers) - 2``),
    so its last cut follows layer ``select_layer - 1``. The same count-down is applied to any
    tower: ``projector_feed_tower_layer - 1`` (at least 0)."""
    return max(model.projector_feed_tower_layer - 1, 0)


def remaining_layers(model: ModelFacts, layer: int) -> int:
    """The reference's ``rpl`` at tower layer ``layer``: cuts happen where it is even, the last at 0."""
    return final_cut_layer(model) - layer


def adaptive_prune_count(cls_attention, n_target: int, rpl: int) -> int:
    """Patches to drop at a cut ``rpl`` layers before the last (``utils_flowcut.adaptive_prune_ratio``):
    ``round((n - n_target) / sqrt(rpl) * (1 - (H / log n)^2))`` with ``H`` the entropy of the [CLS]
    attention renormalised over the ``n`` live patches (0 log 0 taken as 0), half to even."""
    a = np.asarray(cls_attention, dtype=np.float64)
    n = len(a)
    if n < 2:
        return 0
    p = a / a.sum()
    entropy = -float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)))
    ratio = entropy / math.log(n)
    return int(np.round((n - n_target) / math.sqrt(rpl) * (1 - ratio ** 2)))


@register_method("flowcut")
@dataclass(frozen=True)
class FlowCut(PreLLMMethod):
    """FlowCut: progressive pruning in the vision tower driven by the [CLS]-relay information flow.

    Reference: "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language
    Models" (Tong et al., arXiv 2505.19536); code github.com/TungChintao/FlowCut (also PyPI
    ``flowcut``), files ``flowcut/modeling_clip_flowcut.py`` (``CLIPEncoderLayer_forward``,
    ``CLIPEncoder_forward``) and ``flowcut/utils_flowcut.py`` (``compute_score``,
    ``adaptive_prune_ratio``). The paper gives no formula beyond the idea; everything follows the code:

    * score per layer: the ``flowcut`` probe (matches ``compute_score``, the ``/value.shape[-1]``
      being commented out there); running average ``0.5 * cumulative + 0.5 * score`` at every layer
      while more than the target remain;
    * a cut at every layer whose remaining count ``rpl = select_layer - idx - 1`` is even; for
      ``rpl > 0`` it drops ``adaptive_prune_count`` patches (never below the target), for
      ``rpl == 0`` it keeps exactly the target; the kept patches are the top cumulative scores;
    * ``select_layer`` = the projector's feed layer (LLaVA: 22 of 24), so the final cut follows
      layer 21. Layer rule here: the same count-down from ``projector_feed_tower_layer``, so on the
      shipped 3-layer tower (feeding from layer 2) scores of layers 0 and 1 are averaged and the
      single cut after layer 1 keeps the budget (no adaptive step fits in so shallow a tower). A
      tower fed from layer 0 (where the code's count-down never reaches 0) is cut after layer 0.

    Where the cuts run (``progression``):

    * ``"tower"`` (default, the code's behaviour): every cut is a ``"tower:<layer>"`` stage run
      inside the tower by ``tower_callback``: layers after a cut attend only to [CLS] and the kept
      patches, and each layer's scores (``flowcut_score``, the [CLS] entropy) are computed from that
      layer's own attention on the live tokens. The [CLS] is never dropped; the LLM receives the
      kept patches only, renumbered contiguously (``position="reindex"``) as the code's shorter
      tower output is. Cuts that drop nothing (entropy close to the maximum) are not recorded.
      Applies to one-view [CLS] towers whose patches are the LLM's tokens (LLaVA-1.5).
    * ``"simulated"`` (a deviation, kept for comparison and for tiled towers): the progression is
      simulated on the UNPRUNED forward's recorded scores and [CLS] attention, so later layers'
      scores are not recomputed on the shrunk sequence (and ``a``, ``s`` are normalised over all
      patches, not the live ones); the final set is one ``pre_llm`` stage on the projected embeddings.

    Multi-tile layouts (LLaVA-NeXT anyres; ``progression="simulated"`` only): the code keeps
    ``target/2`` per tile in the tower and prunes again in the LLM at layer 1 (last-instruction-token relation + semantic score); neither
    is implemented. Instead, on towers whose patches do not map one to one onto the LLM's visual
    tokens (LLaVA-NeXT/OneVision tiles, Idefics3's pixel shuffle) every tower view's relay scores
    are folded onto the layout's tokens by its tower map (mean over the patches a token owns; the
    [CLS] attention by the sum) and ONE progression runs over all the LLM's visual tokens -- an
    APPROXIMATION of the reference, which runs the progression per tile inside the tower (its own
    per-tile [CLS], entropies and budgets). Towers without [CLS] (Qwen2-VL):
    the authors' ``FlowCut_Qwen`` is a different design (global-query attention plus an in-LLM
    stage) and is not offered, so the method does not apply. Top-k ties: lower index (the code's
    ``torch.topk`` leaves them unspecified).
    """

    scored_by: ClassVar[str] = "visual_attention"

    reference: ClassVar[str] = (
        "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models "
        "(arXiv 2505.19536); github.com/TungChintao/FlowCut flowcut/modeling_clip_flowcut.py + "
        "flowcut/utils_flowcut.py. Paper has no formula: code followed (relay score, 0.5/0.5 running "
        "average, entropy-adaptive cuts at even remaining-layer counts, final cut after feed layer - 1). "
        "Default: the cuts run inside the vision tower (tower:<layer> stages, scores from each layer's live "
        "attention, [CLS] kept). progression=simulated: the progression computed from the unpruned recording and "
        "applied as one pre_llm stage (a deviation). Anyres (tiles + in-LLM stage) and Qwen variant not implemented; "
        "with progression=simulated on tiled models (LLaVA-NeXT/"
        "OneVision, Idefics3) the per-tile tower scores are folded onto the LLM's tokens by the layout's tower map "
        "(mean; [CLS] attention summed) and one progression runs over all tokens: an approximation, the reference "
        "runs the progression per tile inside the tower."
    )

    running_average: float = 0.5  # weight of the previous cumulative score (code: 0.5)
    progression: str = "tower"  # "tower": cuts inside the tower (the code); "simulated": from the recording

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.running_average, (int, float)) or isinstance(self.running_average, bool) \
                or not 0.0 <= self.running_average < 1.0:
            raise ValueError(f"flowcut: running_average must be a number in [0, 1), got {self.running_average!r}")
        check_choice("flowcut", "progression", self.progression, PROGRESSIONS)

    def applicability(self, model: ModelFacts) -> str | None:
        if not model.has_cls_token:
            return ("its relay score is the [CLS] token's attention and this vision tower has no [CLS] "
                    "(the authors' Qwen2-VL variant is a different design, not implemented)")
        if self.progression == "tower":
            reason = in_tower_reason(model)
            if reason is not None:
                return (f"its cuts run inside the vision tower and {reason}; progression=simulated runs the "
                        "recording-based approximation")
        return None

    def _cut_layers(self, model: ModelFacts) -> list[int]:
        final = final_cut_layer(model)
        return [layer for layer in range(final + 1) if remaining_layers(model, layer) % 2 == 0]

    def needs(self, model: ModelFacts) -> tuple[SignalNeed, ...]:
        if self.progression == "tower":
            return ()  # every score comes from the live tower
        final = final_cut_layer(model)
        needs = [SignalNeed("flowcut", "tower", layer) for layer in range(final + 1)]
        needs += [SignalNeed("attention", "tower", layer, "cls") for layer in self._cut_layers(model)
                  if remaining_layers(model, layer) > 0]
        return tuple(needs)

    def step(self, cumulative: np.ndarray | None, score: np.ndarray, cls_attention, n_target: int, rpl: int
             ) -> tuple[np.ndarray, np.ndarray]:
        """One tower layer of the code's progression on the live patches (``score`` and
        ``cls_attention`` over them, in order): (the live patches' positions it keeps, sorted; the
        updated cumulative score of every live patch). The running average, then at even ``rpl`` a cut."""
        cumulative = score.copy() if cumulative is None else \
            self.running_average * cumulative + (1 - self.running_average) * score
        if rpl % 2:
            return np.arange(len(score)), cumulative
        if rpl > 0:
            keep = max(len(score) - adaptive_prune_count(cls_attention, n_target, rpl), n_target)
        else:
            keep = n_target
        return top_k(cumulative, keep), cumulative

    def simulate(self, scores: list[np.ndarray], cls_attention: dict[int, np.ndarray], patches: np.ndarray,
                 n_target: int, model: ModelFacts) -> tuple[np.ndarray, np.ndarray]:
        """The tower's progression on one tile: (kept patch indices, their final cumulative scores)."""
        alive = np.asarray(patches, dtype=np.int64)
        cumulative = None
        for layer, score in enumerate(scores):
            if len(alive) <= n_target:
                break
            rpl = remaining_layers(model, layer)
            chosen, cumulative = self.step(cumulative, score[alive], None if rpl % 2 or rpl == 0 else
                                           cls_attention[layer][alive], n_target, rpl)
            alive, cumulative = alive[chosen], cumulative[chosen]
        if cumulative is None:
            cumulative = np.full(len(alive), np.nan)
        return alive, cumulative

    def tower_callback(self, context: SelectionContext):
        """The cuts inside the tower: at each layer up to the final cut, the layer's scores on the live
        patches from its own attention call; a ``"tower:<layer>"`` stage where a cut drops patches."""
        if self.progression != "tower":
            return None
        model = context.require_model()
        final, n_target, n_visual = final_cut_layer(model), context.n_keep, context.n_visual
        position = self.entry_position(context)
        carried: dict[str, np.ndarray] = {}  # the cumulative score of the live patches, in row order

        def callback(layer: int, state: TowerState):
            if layer == 0:
                carried.clear()  # a new tower pass
            alive = state.visual_indices
            if layer > final or len(alive) <= n_target:
                return None  # the code scores and cuts only while more than the target remain
            rows = state.visual_rows.to(state.call.query.device)
            score = flowcut_score(state.call, state.cls_row, rows).double().cpu().numpy()
            rpl = remaining_layers(model, layer)
            cls_attention = None
            if rpl > 0 and rpl % 2 == 0:  # the [CLS] row over all live keys, head mean, its patch columns
                cls_row = torch.tensor([state.cls_row], device=rows.device)
                cls_attention = state.call.probs(cls_row).mean(0)[0][rows].double().cpu().numpy()
            chosen, cumulative = self.step(carried.get("cumulative"), score, cls_attention, n_target, rpl)
            carried["cumulative"] = cumulative[chosen]
            if len(chosen) == len(alive):
                return None  # nothing dropped (odd rpl, or a flat [CLS] attention)
            scores = np.full(n_visual, np.nan)
            scores[alive] = cumulative
            return Stage(tower_where(layer), tuple(int(i) for i in alive[chosen]), tuple(scores),
                         position=position)

        return callback

    def kept_counts(self, context: SelectionContext) -> tuple[int, ...]:
        """The budget after the last cut; with ``progression="tower"`` on a tower deep enough for
        adaptive cuts (``final_cut_layer`` >= 2), each of them adds a stage whose count depends on the
        live [CLS] entropy."""
        return (context.n_keep,)

    def select(self, context: SelectionContext) -> KeepPlan:
        model = context.require_model()
        self.check_applies(model)
        if self.progression == "tower":
            return self.plan(context, [])  # every cut is chosen inside the tower by ``tower_callback``
        final = final_cut_layer(model)
        rec, layout = context.recording, context.layout
        # Per tower view, folded onto the layout's tokens by its tower map (the identity on LLaVA-1.5):
        # relay scores by the mean over each token's patches, [CLS] attention by the sum (a share of
        # the [CLS] row, as the entropy wants).
        scores = []
        for layer in range(final + 1):
            score = tower_to_layout(layout, [v[0] for v in tower_views(rec, layout, "flowcut", layer, "tokens")],
                                    "mean")
            if np.isnan(score).any():
                raise ValueError(f"flowcut: {int(np.isnan(score).sum())} visual tokens own no tower patch in the "
                                 "layout's tower map")
            scores.append(score)
        cls_attention = {layer: tower_scores(rec, layout, "attention", layer, "cls", reduce="sum")
                         for layer in self._cut_layers(model) if remaining_layers(model, layer) > 0}
        alive, cumulative = self.simulate(scores, cls_attention, np.arange(context.n_visual), context.n_keep, model)
        stage_scores = np.full(context.n_visual, np.nan)
        stage_scores[alive] = cumulative
        return self.plan(context, [Stage(PRE_LLM, tuple(sorted(int(i) for i in alive)), tuple(stage_scores),
                                                position=self.entry_position(context))])
