"""Caption metrics as the COCO caption evaluation computes them, in pure Python: its tokenisation,
CIDEr (in its CIDEr-D form, the one the evaluation's ``Cider`` scorer reports) and ROUGE-L.

CIDEr (Vedantam, Zitnick and Parikh, "CIDEr: Consensus-based Image Description Evaluation", CVPR
2015) is a corpus-level metric: every n-gram (n = 1..4) of a sentence is weighted by tf-idf, where
the document frequency of an n-gram is the number of evaluated items whose references hold it
and the idf is log(#items / max(1, df)). For each n the candidate's vector is compared with each
reference's by cosine similarity; CIDEr-D, the variant the COCO evaluation code ships as ``Cider``,
clips the candidate's weights at the reference's (repeating a word gains nothing), multiplies
each similarity by a Gaussian length penalty exp(-(len(candidate) - len(reference))^2 / (2 *
6^2)), and scales by 10. An item's score is 10 * mean over n of (sum over references of the
similarity) / #references; the corpus score is the mean over items. An n-gram vector with no
entries (a one-word sentence has no bigrams) has similarity 0.

The same candidate therefore scores differently in different corpora (its n-grams' idf depends
on the other items' references): a per-item value is only meaningful inside its corpus, and a
corpus of one item scores 0 (every idf is log 1).

ROUGE-L (Lin 2004) as the COCO evaluation computes it is a per-item score: the longest common
subsequence of candidate and reference, its best precision and best recall over the references,
combined as an F-measure with beta = 1.2; the corpus score is the mean over items.

The COCO evaluation tokenises with Stanford's PTB tokenizer (lower-cased) and drops punctuation
tokens; ``tokenize`` follows those rules without Java: lower-case, split "n't" and "'s"-like
clitics off their word, keep hyphenated words and decimal numbers whole, drop punctuation.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

MAX_N = 4  # n-grams 1..4
SIGMA = 6.0  # the length penalty's standard deviation, in words
SCALE = 10.0  # CIDEr-D's factor, so that scores are on the scale the papers print
BETA = 1.2  # ROUGE-L's recall weight in the COCO evaluation

_CLITIC = re.compile(r"(\w)(n't)\b")
_TOKEN = re.compile(r"n't|'[a-z]+|\w+(?:[-.]\w+)*|[^\w\s]+")


def tokenize(text: str | None) -> list[str]:
    """Lower-cased PTB-style tokens without punctuation: "The man's hat." -> the, man, 's, hat."""
    text = _CLITIC.sub(r"\1 \2", (text or "").lower())
    return [t for t in _TOKEN.findall(text) if re.search(r"\w", t)]


def _ngrams(tokens: Sequence[str]) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, MAX_N + 1) for i in range(len(tokens) - n + 1))


def _weights(counts: Counter, idf) -> list[dict[tuple[str, ...], float]]:
    """The tf-idf vector of a sentence, one dict per n-gram order."""
    out: list[dict[tuple[str, ...], float]] = [{} for _ in range(MAX_N)]
    for gram, tf in counts.items():
        out[len(gram) - 1][gram] = tf * idf(gram)
    return out


def _norm(vector: dict) -> float:
    return math.sqrt(sum(v * v for v in vector.values()))


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """CIDEr-D of each candidate against its references, with the document frequencies of this
    corpus (the references of all items); returns (corpus score, per-item scores). Sentences are
    tokenised by ``tokenize``; an item without references is an error of the caller."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if any(not refs for refs in references):
        raise ValueError("every item needs at least one reference")
    if not candidates:
        return 0.0, []
    ref_counts = [[_ngrams(tokenize(r)) for r in refs] for refs in references]
    df: Counter = Counter()
    for counts in ref_counts:
        df.update(set().union(*(c.keys() for c in counts)))
    log_items = math.log(len(candidates))

    def idf(gram) -> float:
        return log_items - math.log(max(1.0, df[gram]))

    scores = []
    for candidate, counts in zip(candidates, ref_counts):
        tokens = tokenize(candidate)
        cand = _weights(_ngrams(tokens), idf)
        cand_norms = [_norm(v) for v in cand]
        total = 0.0
        for ref_grams in counts:
            ref = _weights(ref_grams, idf)
            length_ref = sum(c for g, c in ref_grams.items() if len(g) == 1)
            penalty = math.exp(-((len(tokens) - length_ref) ** 2) / (2 * SIGMA ** 2))
            for n in range(MAX_N):
                denominator = cand_norms[n] * _norm(ref[n])
                if denominator == 0:
                    continue
                clipped = sum(min(w, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, w in cand[n].items())
                total += clipped / denominator * penalty
        scores.append(SCALE * total / MAX_N / len(counts))
    return sum(scores) / len(scores), scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        previous_diagonal = 0
        for j, y in enumerate(b, start=1):
            previous_diagonal, row[j] = row[j], previous_diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, references: Sequence[str]) -> float:
    """ROUGE-L of one candidate: LCS-based best precision and best recall over the references,
    combined with beta = 1.2 (0 when either is 0)."""
    tokens = tokenize(candidate)
    if not tokens or not references:
        return 0.0
    precision = recall = 0.0
    for reference in references:
        ref = tokenize(reference)
        if not ref:
            continue
        common = _lcs(ref, tokens)
        precision, recall = max(precision, common / len(tokens)), max(recall, common / len(ref))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + BETA ** 2) * precision * recall / (recall + BETA ** 2 * precision)
