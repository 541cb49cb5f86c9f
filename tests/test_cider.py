"""CIDEr-D and the caption tokenisation (workbench/cider.py) against values computed by hand."""

import math

import pytest

from workbench.cider import cider_d, tokenize


def test_cider_d_of_a_three_caption_corpus_by_hand():
    # Items (candidate | references):  1: "a dog" | "a dog runs", "dog"   2: "a cat" | "a cat"
    # 3: "a bird" | "the bird".  N = 3 items; document frequency = #items whose references hold the n-gram:
    # "a" 2 (items 1, 2), every other reference n-gram 1; an n-gram in no reference counts as df 1.
    # idf = ln N - ln df: A = ln 3 - ln 2 = ln 1.5 for "a", B = ln 3 for everything else.
    A, B = math.log(1.5), math.log(3)
    penalty = math.exp(-1 / 72)  # one word longer or shorter: exp(-1^2 / (2 * 6^2))
    # Item 1 vs "a dog runs": unigrams (a: A, dog: B) . (a: A, dog: B, runs: B) = A^2 + B^2 over norms
    # sqrt(A^2 + B^2) sqrt(A^2 + 2B^2); bigrams ("a dog") . ("a dog", "dog runs") = B^2 / (B * B sqrt 2);
    # no trigram in the candidate: 0; length 2 vs 3.  vs "dog": unigrams B^2 / (sqrt(A^2 + B^2) B), the
    # reference has no bigram: 0; length 2 vs 1.  Mean over n = 1..4, over 2 references, times 10.
    vs_runs = (math.sqrt(A * A + B * B) / math.sqrt(A * A + 2 * B * B) + 1 / math.sqrt(2)) * penalty
    vs_dog = B / math.sqrt(A * A + B * B) * penalty
    item1 = 10 * (vs_runs + vs_dog) / 4 / 2
    # Item 2 equals its reference: cosine 1 for unigrams and bigrams, nothing longer -> 10 * 2 / 4
    item2 = 5.0
    # Item 3 "a bird" vs "the bird": unigrams share "bird": B^2 / (sqrt(A^2 + B^2) * B sqrt 2); bigrams none
    item3 = 10 * B / (math.sqrt(2) * math.sqrt(A * A + B * B)) / 4
    corpus, per_item = cider_d(["a dog", "a cat", "a bird"], [["a dog runs", "dog"], ["a cat"], ["the bird"]])
    assert per_item == pytest.approx([item1, item2, item3])
    assert per_item == pytest.approx([2.92725, 5.0, 1.65842], abs=1e-5)  # the same, as decimals
    assert corpus == pytest.approx((item1 + item2 + item3) / 3) and corpus == pytest.approx(3.19523, abs=1e-5)


def test_cider_is_corpus_level_and_clips_repeated_words():
    # the same caption alone: every idf is ln 1 = 0, so it scores 0; in the corpus above it scores 5
    assert cider_d(["a cat"], [["a cat"]]) == (0.0, [0.0])
    # "dog dog" gains nothing over "dog" from the repeated word (CIDEr-D's clipping): with two items, "dog"
    # has idf ln 2; unigram cosine of (2 ln2) vs (ln2) clipped: min(2 ln2, ln2) ln2 / (2 ln2 * ln2) = 1/2
    # where "dog" alone has cosine 1 (both one word long: no bigram, no penalty)
    _, once = cider_d(["dog", "x"], [["dog"], ["cat"]])
    _, twice = cider_d(["dog dog", "x"], [["dog"], ["cat"]])
    assert once[0] == pytest.approx(10 * 1 / 4) and twice[0] == pytest.approx(10 * 0.5 * math.exp(-1 / 72) / 4)
    assert cider_d([], []) == (0.0, [])
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d(["a"], [[]])


def test_tokenize_follows_the_ptb_rules_the_coco_evaluation_uses():
    assert tokenize("The man's hat isn't black-and-white, 3.5 m. (left)") == \
        ["the", "man", "'s", "hat", "is", "n't", "black-and-white", "3.5", "m", "left"]
    assert tokenize("  ") == [] and tokenize(None) == []
    assert tokenize(" ".join(tokenize("The man's hat isn't."))) == tokenize("The man's hat isn't.")  # stable
