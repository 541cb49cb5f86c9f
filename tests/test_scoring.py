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


def test_multiple_choice_reads_the_option_by_lmms_eval_mmbench_rules():
    # lmms-eval's MMBench can_infer: a letter A-E alone as a word (not "A" in a sentence of more than
    # three words), else a letter in one punctuated form, else the one option whose text is named
    options = ["a dog", "a cat", "a bird"]
    assert option_letter("A", options) == "A"
    assert option_letter("The answer is B", options) == "B"  # a lone letter anywhere
    assert option_letter("The answer is B.", options) == "B"  # "B." is the form ("", ".")
    assert option_letter("(C) a bird", options) == "C"
    assert option_letter("A. a dog", options) == "A"
    assert option_letter("Answer:C", options) is None  # "Answer:C" is one word, not the form ":C"
    assert option_letter("Answer :C", options) == "C"
    assert option_letter("B) the cat", options) == "B"
    assert option_letter("B), the cat", options) is None  # "B)," is none of the forms, "the cat" no option
    assert option_letter("A or B", options) is None  # two lone letters, no form, no option named
    assert option_letter("A. or B.", options) is None  # two letters in the same form
    assert option_letter("(A) or B.", options) == "B"  # one letter per form: "B." is tried before "(A)"
    assert option_letter("A cat sits there", options) == "B"  # "A" in a long sentence is the article: text
    assert option_letter("A cat", options) == "A"  # ... but not in a short one
    assert option_letter("I think it is a cat", options) == "B"  # the option's text, case ignored
    assert option_letter("It Is A Bird", options) == "C"
    assert option_letter("a cat or a dog", options) is None  # two options named
    assert option_letter("D", options) == "D"  # lmms-eval reads A-E whatever the options: a wrong answer
    assert option_letter("F", options) is None
    assert score("multiple_choice", "b", ["B"], options).value == 0.0  # a lower-case letter is no letter
    assert score("multiple_choice", "B", ["B"], options).value == 1.0
    assert score("multiple_choice", "no idea", ["B"], options).value == 0.0  # where lmms-eval asks GPT: none


def test_rouge_l_scores_a_caption_against_its_references():
    # candidate "a red cup" vs "red cup" and "the cup": LCS 2 and 1 -> best precision 2/3, best recall
    # max(2/2, 1/2) = 1 -> (1 + 1.2^2) * 2/3 * 1 / (1 + 1.2^2 * 2/3)
    got = score("rouge_l", "A red cup.", ["red cup", "the cup"])
    assert got.extracted == "a red cup" and got.value == pytest.approx(2.44 * (2 / 3) / (1 + 1.44 * 2 / 3))
    assert score("rouge_l", "The red cup", ["the red cup", "a cup"]).value == 1.0
    assert score("rouge_l", "", ["a cup"]).value == 0.0 and score("rouge_l", "dog", ["a cup"]).value == 0.0


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
    with pytest.raises(UnknownScorer, match="available: box_iou, exact, first_phrase, mme_lmms_eval, multiple_choice, "
                       "pope_llava, pope_lmms_eval, rouge_l, vqa_soft"):
        score("bleu", "x", ["y"])


def test_vqa_soft_with_a_single_reference_is_an_exact_match_after_normalisation():
    # no annotator subset to leave out: the old leave-one-out gave 0 whatever was answered
    assert score("vqa_soft", "Two.", ["2"]).value == 1.0
    assert score("vqa_soft", "three", ["2"]).value == 0.0


def test_mme_reads_yes_no_as_lmms_eval_does():
    from workbench.scoring import mme_yes_no

    assert [mme_yes_no(t) for t in ("Yes.", "n", "x", "No, it is not", "Maybe yes", "")] == \
        ["yes", "no", "other", "no", "other", "other"]
    assert score("mme_lmms_eval", "Yes, there is a dog.", ["Yes"]).value == 1.0
    assert score("mme_lmms_eval", "There is no dog", ["No"]).value == 0.0  # "no" is not in its first 4 letters


def test_box_iou_reads_the_first_box_and_hits_at_half_overlap():
    from workbench.scoring import box_iou, parse_box

    assert parse_box("it is [0.1, 0.2,0.5, 0.6] or [0, 0, 1, 1]") == (0.1, 0.2, 0.5, 0.6)
    assert parse_box("left side") is None
    assert box_iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)
    # IoU of [0.1,0.1,0.5,0.5] and [0.1,0.1,0.5,0.6]: 0.16 / 0.20 = 0.8 -> a hit; a box below half misses
    hit = score("box_iou", "[0.1, 0.1, 0.5, 0.5]", ["[0.100, 0.100, 0.500, 0.600]"])
    assert hit.value == 1.0 and hit.extracted == "[0.100, 0.100, 0.500, 0.500]"
    assert score("box_iou", "[0.3, 0.1, 0.5, 0.6]", ["[0.0, 0.1, 0.5, 0.6]"]).value == 0.0  # IoU 0.4
    assert score("box_iou", "no box", ["[0.0, 0.1, 0.5, 0.6]"]).value == 0.0


def test_pope_metrics_by_hand():
    from workbench.scoring import pope_metrics

    # tp 1 (row 0), fp 1 (row 4), fn 1 (row 2), tn 1 (row 1); row 3's "maybe" is wrong and no positive
    metrics = pope_metrics(["yes", "no", "no", "maybe", "yes"], ["yes", "no", "yes", "no", "no"])
    assert metrics == pytest.approx({"accuracy": 2 / 5, "precision": 0.5, "recall": 0.5, "f1": 0.5,
                                     "yes_ratio": 2 / 5})


def test_mme_pair_score_and_mmbench_circular_accuracy_by_hand():
    from workbench.scoring import circular_accuracy, pair_score

    # image a: both right -> 100 + 100; image b: one of two -> 50 + 0; mean 125
    assert pair_score(["a", "a", "b", "b"], [True, True, True, False]) == 125.0
    # question 5 fails one rotation, question 6 passes its only one
    assert circular_accuracy(["5", "5", "6"], [True, False, True]) == 0.5
