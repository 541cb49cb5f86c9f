"""DART: pivots by key L1 norm, keep the tokens least similar to each pivot, at layer K=2 (scaled)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import MethodNotApplicable, ModelFacts, SignalNeed
from workbench.pruning.methods.dart import DART


def unit(degrees):
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


# LLAVA_FACTS has 32 decoder layers: K = 2, keys and pivot inputs at layer 1, states at layer 2.
ENTRIES = {
    # key L1 norms 1, 1, 2, 5, 1, 2 -> image pivot 3
    SignalNeed("visual_keys", "llm", 1): [[1, 0], [0, 1], [1, 1], [3, -2], [0.5, 0.5], [2, 0]],
    # text key L1 norms at layer 1: 2, 3 -> text pivot 1
    SignalNeed("text_keys", "llm", 1): [[1, 1], [0, -3]],
    # decoy: the text hidden states entering layer 1 rank the other way (L1 6, 1 -> text 0); a
    # method ranking text pivots by states instead of keys would pick text 0 (45 degrees)
    SignalNeed("text_states", "llm", 1): [[3, 3], [0, -1]],
    # visual states entering layer 2 at 0, 30, 60, 90, 180, 270 degrees
    SignalNeed("visual_states", "llm", 2): [unit(a) for a in (0, 30, 60, 90, 180, 270)],
    # text states entering layer 2: text 1 (the pivot) at 0 degrees
    SignalNeed("text_states", "llm", 2): [unit(45), unit(0)],
}


def context(budget, model=LLAVA_FACTS):
    return handmade_context(grid_layout((2, 3)), budget, ENTRIES, model)


# The code's rule with the handmade entries above: the raw states stand for the normed ones.
def variant(**params):
    return DART(**({"image_pivots": 1, "text_pivots": 1, "norm": "off"} | params))


def test_keeps_the_tokens_least_similar_to_the_pivots():
    method = variant(count="budget", pivot_order="index")
    plan = method.select(context(3))
    # image pivot 3 (90 deg) is kept; quota (3 - 1) / 2 pivots = 1 each.
    # pivot 3: cosines 0:0, 1:.5, 2:.87, 4:0, 5:-1 -> least similar 5.
    # text pivot (0 deg) among {0, 1, 2, 4}: cosines 1, .87, .5, -1 -> 4.
    # (keeping the MOST similar would give {0, 2, 3}.)
    assert plan.final_kept == (3, 4, 5)
    stage = plan.stages[0]
    assert stage.where == 2 and stage.position == "original"
    assert stage.score_array[5] == pytest.approx(1.0) and stage.score_array[4] == pytest.approx(1.0)
    assert np.isnan(stage.score_array[[0, 1, 2, 3]]).all()
    assert method.kept_counts(context(3)) == (3,)


def test_budget_and_reference_counts():
    # budget 4: quotas (4 - 1) over 2 pivots -> 2, 1. pivot 3 takes 5 (-1) then 0 and 4 tie at 0
    # -> lower index 0; the text pivot then takes 4 from {1, 2, 4}.
    assert variant(count="budget", pivot_order="index").select(context(4)).final_kept == (0, 3, 4, 5)
    # the code's count: 4 // 2 = 2 per pivot + the image pivot = 5; text pivot takes 4 then 2 (cos .5).
    # (the decoy text pivot 0 at 45 degrees would take 4, then 1 and 2 tie at cos 15 -> 1: {0, 1, 3, 4, 5}.)
    method = variant(count="reference", pivot_order="index")
    assert method.select(context(4)).final_kept == (0, 2, 3, 4, 5)
    assert method.kept_counts(context(4)) == (5,)


def test_pivots_are_visited_in_the_official_set_order():
    # The code loops over a Python set of the pivots' absolute positions: image pivot 3 sits at
    # position 6 (3 tokens before the image), text pivot 1 at 9 + 1 = 10. In a set of two ints
    # CPython's table has 8 slots, 10 lands in slot 2 and 6 in slot 6: the text pivot goes first.
    assert list({6, 10}) == [10, 6]
    # Text pivot (0 deg) first takes 4 (cos -1) and 5 (cos 0); the image pivot (90 deg) then takes
    # 0 (cos 0) and 1 (cos .5) from {0, 1, 2} -- where index order gives (0, 2, 3, 4, 5).
    assert variant().select(context(4)).final_kept == (0, 1, 3, 4, 5)


def test_defaults_layers_and_validation():
    method = DART()
    assert (method.layer, method.image_pivots, method.text_pivots, method.count, method.norm,
            method.pivot_order) == (2, 4, 4, "reference", "final", "set")
    assert method.prune_layer(LLAVA_FACTS) == 2
    shallow = ModelFacts("llava", 3, 3, True, 3)
    assert method.prune_layer(shallow) == 1
    assert SignalNeed("visual_keys", "llm", 0) in method.needs(shallow)
    assert set(method.needs(LLAVA_FACTS)) == {
        SignalNeed("visual_keys", "llm", 1), SignalNeed("visual_states_normed", "llm", 2),
        SignalNeed("text_keys", "llm", 1), SignalNeed("text_states_normed", "llm", 2)}
    assert set(DART(text_pivots=0, norm="off").needs(LLAVA_FACTS)) == {SignalNeed("visual_keys", "llm", 1),
                                                                       SignalNeed("visual_states", "llm", 2)}
    with pytest.raises(MethodNotApplicable, match="at least 2 decoder layers"):
        method.check_applies(ModelFacts("llava", 1, 3, True, 3))
    for bad, message in [(dict(layer=0), "layer"), (dict(image_pivots=-1), "image_pivots"),
                         (dict(image_pivots=0, text_pivots=0), "at least one pivot"), (dict(count="x"), "count"), (dict(norm="rms"), "norm"),
                         (dict(pivot_order="sorted"), "pivot_order")]:
        with pytest.raises(ValueError, match=message):
            DART(**bad)


def test_runs_on_the_shipped_model():
    execution, _ = check_on_shipped(DART())
    assert execution.plan.stages[0].where == 1  # K=2 of 32 on a 4-layer decoder


def test_runs_on_a_tiny_qwen2_vl():
    execution, context = run_checked(*tiny_input("qwen2_vl"), DART(), 0.5)
    assert [len(st.kept) for st in execution.plan.stages] == [context.n_keep]
