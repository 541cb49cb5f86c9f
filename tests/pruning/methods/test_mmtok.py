"""MMTok: greedy maximum coverage of the text tokens and of the visual tokens (Ironieser/MMTok)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.pruning.handmade import LLAVA_FACTS, NO_CLS_FACTS, grid_layout, handmade_context
from tests.pruning.shipped import check_on_shipped, run_checked, tiny_input
from workbench.pruning.method import SelectionContext, SignalNeed
from workbench.pruning.methods.mmtok import MMTok, greedy_max_coverage

PROJECTED = SignalNeed("visual_states", "llm", 0)
TEXT = SignalNeed("question_keywords", "llm", 0)  # the default text side: the question's keywords
PROMPT = SignalNeed("text_states", "llm", 0)  # text="prompt": every text token after the image
TOWER = SignalNeed("visual_states_out", "tower", LLAVA_FACTS.projector_feed_tower_layer)  # layer 22


def unit(degrees):
    return [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))]


def context(budget, projected, text, tower):
    layout = grid_layout((1, len(projected)))
    return handmade_context(layout, budget, {PROJECTED: projected, TEXT: text, TOWER: tower})


def test_covers_every_text_token_not_just_the_most_similar():
    # text A at 0 deg, B at 90 deg; visual tokens at 0, 3, 60, 180 deg; alpha 0: text side only.
    # P/0.02 softmax per text row, / 2: A -> about .259 on token 0, .241 on token 1; B -> about .5
    # on token 2 (cos .87, the others <= .05).  Step 1: gains .259, .241, .5 -> token 2.
    # Step 2: B is covered, A not -> token 0.  (Top-2 by similarity to the text: {0, 1}.)
    visual = [unit(a) for a in (0, 3, 60, 180)]
    plan = MMTok(alpha=0.0).select(context(2, visual, [unit(0), unit(90)], visual))
    assert plan.final_kept == (0, 2)
    gains = plan.stages[0].score_array
    assert gains[2] == pytest.approx(0.5, abs=1e-3) and gains[0] == pytest.approx(0.259, abs=2e-3)
    assert np.isnan(gains[[1, 3]]).all()


def test_covers_the_visual_tokens_in_the_tower_space():
    # no text; tower features: a cluster at -1, 0, 1 deg and a lone token at 90 deg (the projected
    # features are all alike, so only the tower space separates them). Softmax rows /0.2: each
    # cluster row spreads ~1/3 over the cluster, the lone row puts ~1 on itself.  Whichever comes
    # first, the pair is the cluster's middle token (most similar to the other two) and the lone one:
    # a second cluster token would add almost nothing.
    tower = [unit(a) for a in (-1, 0, 1, 90)]
    same = [unit(0)] * 4
    plan = MMTok().select(context(2, same, np.zeros((0, 2)), tower))
    assert plan.final_kept == (1, 3)
    # in the projected space (all equal) the tie goes to the lowest indices
    assert MMTok(vision_space="llm").select(context(2, same, np.zeros((0, 2)), tower)).final_kept == (0, 1)


def test_greedy_max_coverage_by_hand():
    coverage = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 2.5], [0.0, 2.0, 0.0]])
    # gains 3, 5, 2.5 -> 1; covered (1, 2, 2): gains 2, 0, 0.5 -> 0; then 2 (gain 0.5)
    picks, gains = greedy_max_coverage(coverage, 3)
    assert picks.tolist() == [1, 0, 2]
    assert gains.tolist() == [2.0, 5.0, 0.5]


QUESTION = SignalNeed("question_text", "llm", 0)  # the Qwen path's text: "Question: " and the question


def test_defaults_needs_and_validation():
    method = MMTok()
    assert (method.alpha, method.tv_temperature, method.vv_temperature, method.vision_space) == (0.5, None, 0.2, "tower")
    assert (method.text, method.count) == ("code", "code")
    assert set(method.needs(LLAVA_FACTS)) == {PROJECTED, TEXT, TOWER}
    assert set(MMTok(vision_space="llm").needs(NO_CLS_FACTS)) == {PROJECTED, QUESTION}  # Qwen2-VL: the Qwen path
    assert set(MMTok(text="prompt").needs(LLAVA_FACTS)) == {PROMPT, PROJECTED, TOWER}
    for bad, message in [(dict(alpha=-1), "alpha"), (dict(tv_temperature=0), "temperatures"),
                         (dict(vision_space="clip"), "vision_space"), (dict(alpha=float("nan")), "alpha"),
                         (dict(text="keyword"), "text"), (dict(count="round"), "count"),
                         (dict(tv_temperature="0.01"), "tv_temperature")]:
        with pytest.raises(ValueError, match=message):
            MMTok(**bad)


QWEN_FACTS = dataclasses.replace(NO_CLS_FACTS, family="qwen2_vl")


@pytest.mark.parametrize("family", ["", "llava", "llava_next", "llava_onevision", "idefics3"])
def test_the_llava_path_is_taken_by_every_family_but_qwen(family):
    facts = dataclasses.replace(LLAVA_FACTS, family=family)
    assert TEXT in MMTok().needs(facts) and QUESTION not in MMTok().needs(facts)
    assert MMTok().text_temperature(facts) == 0.02
    assert MMTok().kept_count(SelectionContext(grid_layout((1, 28)), 0.125, None, facts)) == 4  # half up


def test_the_qwen_path_follows_its_code_and_each_part_can_be_overridden():
    assert set(MMTok(vision_space="llm").needs(QWEN_FACTS)) == {PROJECTED, QUESTION}
    assert MMTok().text_temperature(QWEN_FACTS) == 0.01
    assert MMTok(tv_temperature=0.05).text_temperature(QWEN_FACTS) == 0.05
    assert set(MMTok(text="keywords", vision_space="llm").needs(QWEN_FACTS)) == {PROJECTED, TEXT}
    assert set(MMTok(text="question", vision_space="llm").needs(LLAVA_FACTS)) == {PROJECTED, QUESTION}
    layout = grid_layout((1, 28))
    # int(0.125 * 28) = 3 (the code floors); the workbench's half-up n_keep is 4; a count is kept as given
    assert MMTok().kept_count(SelectionContext(layout, 0.125, None, QWEN_FACTS)) == 3
    assert MMTok(count="budget").kept_count(SelectionContext(layout, 0.125, None, QWEN_FACTS)) == 4
    assert MMTok().kept_count(SelectionContext(layout, 5, None, QWEN_FACTS)) == 5
    # Python's float product, as the code computes it: 0.29 * 100 is 28.999999999999996
    assert MMTok().kept_counts(SelectionContext(grid_layout((10, 10)), 0.29, None, QWEN_FACTS)) == (28,)


def test_tower_rows_must_match_the_visual_tokens():
    visual = [unit(a) for a in (0, 30, 60, 90)]
    with pytest.raises(ValueError, match="vision_space='llm'"):
        MMTok().select(context(2, visual, [unit(0)], visual[:2]))


def test_runs_on_the_shipped_model():
    check_on_shipped(MMTok())


def test_runs_on_a_tiny_qwen2_vl_in_the_llm_space():
    adapter, prepared = tiny_input("qwen2_vl")
    execution, _ = run_checked(adapter, prepared, MMTok(vision_space="llm"), 0.15)
    assert len(execution.final_kept) == 3  # the Qwen path floors 0.15 * 24 = 3.6 (the budget's count is 4)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_runs_in_the_tower_space_through_the_tower_map(family):
    # Tiles (LLaVA-NeXT) and 2x2 merged patches (Qwen2-VL): tower features folded onto the tokens.
    adapter, prepared = tiny_input(family)
    execution, _ = run_checked(adapter, prepared, MMTok(), 0.5)
    assert len(execution.final_kept) == SelectionContext(prepared.layout, 0.5).n_keep
