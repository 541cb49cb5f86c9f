"""Every scorer against hand-computed values (the protocols are in workbench/scoring.py)."""

import pytest

from workbench.scoring import UnknownScorer, option_letter, score, vqa_accuracy, vqa_normalize


def test_exact_and_first_phrase_read_different_parts_of_a_run_on_answer():
    assert score("exact", "The Red.", ["red"]).value == 1.0
    run_on = score("exact", "red circle red", ["red"])
    assert (run_on.extracted, run_on.value) == ("red circle red", 0.0)
    assert score("first_phrase", "red, then a circle", ["red"]).value == 1.0
    assert score("first_phrase", "top-left\nbottom", ["top-left"]).value == 1.0
    assert score("exact", "anything", []).value is None  # no reference: unknown, not wrong


def test_pope_protocols_disagree_where_the_harnesses_do():
    # lmms-eval: the whole generation; LLaVA's eval_pope.py: "no" when the first sentence has no/not.
    assert score("pope_lmms_eval", " Yes ", ["yes"]).value == 1.0
    assert score("pope_lmms_eval", "Yes, there is.", ["yes"]).value == 0.0
    assert score("pope_llava", "Yes, there is.", ["yes"]).value == 1.0
    assert score("pope_llava", "There is not a dog.", ["no"]).extracted == "no"
    assert score("pope_llava", "I see a dog. No cat though", ["yes"]).extracted == "yes"  # second sentence unread


def test_multiple_choice_reads_the_leading_letter_or_the_one_named_option():
    options = ["a dog", "a cat", "a bird"]
    assert option_letter("B", options) == "B"
    assert option_letter("(C) a bird", options) == "C"
    assert option_letter("A. a dog", options) == "A"
    assert option_letter("I think it is a cat", options) == "B"
    assert option_letter("a cat or a dog", options) is None  # two options named
    assert option_letter("D", options) is None  # no such option
    assert score("multiple_choice", "b", ["B"], options).value == 0.0  # a lower-case word is not a letter
    assert score("multiple_choice", "B", ["B"], options).value == 1.0


def test_vqa_normalization_follows_the_official_rules():
    assert vqa_normalize("Two dogs.") == "2 dogs"
    assert vqa_normalize("I dont know") == "i don't know"
    assert vqa_normalize("3.5") == "3.5"  # a period between digits stays
    assert vqa_normalize("10,000") == "10000"  # digit-group commas go, and with them the other marks
    assert vqa_normalize("black/white") == "black white"
    assert vqa_normalize("the yellow - dog") == "yellow dog"


def test_vqa_soft_accuracy_by_hand():
    # 3 x "2 dogs", 7 x "two": leaving out a "2 dogs" leaves 2 matches (2/3), leaving out a "two"
    # leaves 3 (1): (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert score("vqa_soft", "Two dogs.", ["2 dogs"] * 3 + ["two"] * 7).value == pytest.approx(0.9)
    # 2 x "2", 8 x "3": (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_unknown_scorer_lists_the_known_ones():
    with pytest.raises(UnknownScorer, match="available: exact, first_phrase, multiple_choice"):
        score("bleu", "x", ["y"])
