"""FasterVLM, VTC-CLS and HiRED: hand-worked kept sets, the shipped model, and [CLS]-free towers."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, folded, run_checked, tiny_input
from workbench.layout import TokenGroup, VisualLayout, grid_boxes, grid_cells
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SelectionContext, SignalNeed
from workbench.pruning.methods.cls_attention import HiRED, VtcCls, FasterVLM, tower_layer, weighted_split
from workbench.pruning.run import run_method

SHALLOW = ModelFacts("llava", decoder_layers=3, vision_layers=3, has_cls_token=True, projector_feed_layer=3)


def cls(layer: int) -> SignalNeed:
    return SignalNeed("attention", "tower", layer, "cls")


# --- layers ----------------------------------------------------------------------------------------

def test_reference_layers_are_placed_on_the_tower():
    assert tower_layer(22, LLAVA_FACTS) == 22 and tower_layer(16, LLAVA_FACTS) == 16
    assert tower_layer(22, SHALLOW) == 2 and tower_layer(16, SHALLOW) == 2 and tower_layer(0, SHALLOW) == 0
    assert tower_layer(8, SHALLOW) == 1
    assert FasterVLM().needs(LLAVA_FACTS) == (cls(22),)
    assert VtcCls().needs(LLAVA_FACTS) == tuple(cls(k) for k in range(16, 23))
    assert VtcCls().needs(SHALLOW) == (cls(2),)
    assert HiRED().needs(LLAVA_FACTS) == (cls(0), cls(22))


# --- FasterVLM -------------------------------------------------------------------------------------

def test_fastervlm_keeps_top_cls_attention_at_the_feed_layer_not_the_last():
    layout = grid_layout((4, 4))
    at_22 = np.full(16, 0.01)
    at_22[[3, 6, 9, 12]] = [0.2, 0.3, 0.25, 0.15]
    at_23 = np.full(16, 0.01)
    at_23[[0, 1, 2, 15]] = 0.5  # the last layer: a wrong reading would keep these
    context = handmade_context(layout, 4, {cls(22): [at_22], cls(23): [at_23]})
    plan = FasterVLM().select(context)
    assert plan.final_kept == (3, 6, 9, 12)
    assert plan.method == "fastervlm" and plan.stages[0].where == "pre_llm"
    assert plan.stages[0].scores[6] == pytest.approx(0.3)


def test_fastervlm_shares_the_budget_by_group_size():
    layout = grid_layout((2, 2), (4, 4))  # tokens 0-3, then 4-19: shares 1 and 4 of 5
    scores = np.arange(20, dtype=float)[::-1]  # token 0 highest
    plan = FasterVLM().select(handmade_context(layout, 5, {cls(22): [scores]}))
    assert plan.final_kept == (0, 4, 5, 6, 7)


# --- VTC-CLS -------------------------------------------------------------------------------------

def test_vtc_cls_sums_the_layers_from_start_to_the_feed_layer():
    layout = grid_layout((2, 2))
    entries = {cls(22): [[0.4, 0.2, 0.2, 0.2]]}
    entries.update({cls(k): [[0.1, 0.3, 0.3 - 0.01, 0.3 - 0.02]] for k in range(16, 22)})
    # sum: token 0 = 0.4 + 6 * 0.1 = 1.0, token 1 = 0.2 + 6 * 0.3 = 2.0 (highest), token 2 = 1.94
    assert VtcCls().select(handmade_context(layout, 1, entries)).final_kept == (1,)
    assert VtcCls().select(handmade_context(layout, 2, entries)).final_kept == (1, 2)
    # the feed layer alone (FasterVLM, or VTC-CLS starting at 22) keeps token 0
    assert VtcCls(start_layer=22).select(handmade_context(layout, 1, entries)).final_kept == (0,)
    assert FasterVLM().select(handmade_context(layout, 1, entries)).final_kept == (0,)


# --- HiRED ---------------------------------------------------------------------------------------

def hires_layout() -> VisualLayout:
    """A 2x2 base view of a 40x40 image, then two 2x2 tiles: left half (tokens 4-7), right half (8-11)."""
    boxes = np.concatenate([grid_boxes(2, 2, 0, 0, 40, 40), grid_boxes(2, 2, 0, 0, 20, 40),
                            grid_boxes(2, 2, 20, 0, 40, 40)])
    return VisualLayout(positions=np.arange(2, 14), group=np.repeat([0, 1, 2], 4),
                        cell=np.concatenate([grid_cells(2, 2)] * 3), boxes=boxes,
                        groups=(TokenGroup("image 0 / base", 0, 2, 2), TokenGroup("image 0 / tile 0", 0, 2, 2),
                                TokenGroup("image 0 / tile 1", 0, 2, 2)),
                        image_sizes=((40, 40),), sequence_length=20)


def test_hired_splits_the_budget_by_early_attention_on_the_base_view():
    layout = hires_layout()
    deep = [0.1, 0.4, 0.3, 0.2, 0.1, 0.2, 0.3, 0.4, 0.9, 0.8, 0.7, 0.6]
    # early top-2 of the base (0.5 at token 0, 0.3 at token 2) both lie on the left tile:
    # base gets floor(6 * 0.5) = 3 (deep top: 1, 2, 3), left tile the other 3 (5, 6, 7), right none,
    # although the right tile's deep attention is the highest.
    early = [0.5, 0.1, 0.3, 0.1] + [0.9] * 8
    context = handmade_context(layout, 6, {cls(0): [early], cls(22): [deep]})
    assert HiRED().select(context).final_kept == (1, 2, 3, 5, 6, 7)
    # early top-2 = tokens 0 (left) and 1 (right): 1.5 / 1.5, the tie goes to the earlier tile
    early = [0.5, 0.4, 0.1, 0.1] + [0.0] * 8
    context = handmade_context(layout, 6, {cls(0): [early], cls(22): [deep]})
    assert HiRED().select(context).final_kept == (1, 2, 3, 6, 7, 8)
    # alpha = 1: the base takes all it holds (4); no early top tokens are left to weigh the tiles,
    # so the other 2 are shared equally
    assert HiRED(alpha=1.0).select(context).final_kept == (0, 1, 2, 3, 7, 8)


def test_hired_on_one_group_is_one_top_k_by_the_deep_layer():
    layout = grid_layout((4, 4))
    deep = np.linspace(0.0, 1.0, 16)
    early = deep[::-1]
    plan = HiRED().select(handmade_context(layout, 3, {cls(0): [early], cls(22): [deep]}))
    assert plan.final_kept == (13, 14, 15)


def test_weighted_split_is_exact_and_capped():
    assert weighted_split(3, [2, 0], [4, 4]) == [3, 0]
    assert weighted_split(3, [1, 1], [4, 4]) == [2, 1]
    assert weighted_split(6, [5, 1], [4, 4]) == [4, 2]
    assert weighted_split(2, [0, 0], [4, 4]) == [1, 1]


def test_invalid_hyper_parameters():
    with pytest.raises(ValueError, match="start_layer must be"):
        VtcCls(start_layer=23)
    with pytest.raises(ValueError, match="alpha must be"):
        HiRED(alpha=1.5)
    with pytest.raises(ValueError, match="count must be one of"):
        HiRED(count="round")
    with pytest.raises(ValueError, match="reference_layer must be"):
        FasterVLM(reference_layer=-1)


# --- applicability and the models ----------------------------------------------------------------

@pytest.mark.parametrize("method", [FasterVLM(), VtcCls(), HiRED()])
def test_no_cls_tower_is_not_applicable(method):
    assert "no [CLS]" in method.applicability(NO_CLS_FACTS)
    assert method.needs(NO_CLS_FACTS) == ()
    with pytest.raises(MethodNotApplicable, match=f"{method.name} does not apply to qwen2_vl: .*no \\[CLS\\]"):
        method.check_applies(NO_CLS_FACTS)
    context = SelectionContext(grid_layout((2, 2)), 1, None, NO_CLS_FACTS)
    with pytest.raises(MethodNotApplicable):
        method.select(context)


def test_tiny_qwen2_vl_refuses_fastervlm():
    adapter, prepared = tiny_input("qwen2_vl")
    with pytest.raises(MethodNotApplicable, match="fastervlm does not apply"):
        run_method(adapter, prepared, FasterVLM(), 0.5)


def test_hired_runs_on_tiny_llava():
    adapter, prepared = tiny_input("llava")
    execution, _ = run_checked(adapter, prepared, HiRED(), 0.5, max_new_tokens=2)
    assert len(execution.plan.final_kept) == (prepared.layout.n_tokens + 1) // 2


# The defaults' top-k per crop are checked against the codes in parity/test_{fastervlm,vtc_cls,hired}_anyres.py
@pytest.mark.parametrize("method", [FasterVLM(crops="budget"), VtcCls(crops="budget"), HiRED(crops="budget")])
def test_tiny_llava_next_reads_every_crop_through_the_tower_map(method):
    # LLaVA-NeXT's tower records per crop (base + 4 tiles here): the scores are the map's fold of all of them.
    adapter, prepared = tiny_input("llava_next")
    layout, facts = prepared.layout, ModelFacts.of(adapter)
    assert len(layout.tower_owner) == 5
    execution, context = run_checked(adapter, prepared, method, 0.5, max_new_tokens=2)
    recording = context.recording
    assert len(execution.plan.final_kept) == context.n_keep
    layers = (tower_layer(method.deep_layer, facts),) if isinstance(method, HiRED) else method.cls_layers(facts)
    expected = np.sum([folded(recording, layout, "attention", layer, "cls") for layer in layers], axis=0)
    np.testing.assert_allclose(execution.plan.stages[0].scores, expected)
    tiles = layout.group == 1
    assert np.isfinite(expected).all() and tiles.sum() == 48
    # the kept tiles tokens are the top ones of their group by the folded scores
    kept = np.array(execution.plan.final_kept)
    kept_tiles = kept[tiles[kept]]
    assert expected[kept_tiles].min() >= np.sort(expected[tiles])[::-1][len(kept_tiles) - 1]

    # Qwen2-VL's tower has no [CLS]: still not applicable (the map does not change that).
    adapter, prepared = tiny_input("qwen2_vl")
    with pytest.raises(MethodNotApplicable, match=f"{method.name} does not apply"):
        run_method(adapter, prepared, method, 0.5)


@pytest.mark.parametrize("method, kept", [(FasterVLM(), 32), (VtcCls(), 32), (HiRED(), 31),
                                           (HiRED(count="budget"), 32)])
def test_runs_on_the_shipped_model(method, kept):
    execution, _ = check_on_shipped(method)  # 0.22 of 144 = 31.68: HiRED's code floors it
    assert [len(st.kept) for st in execution.plan.stages] == [kept]
