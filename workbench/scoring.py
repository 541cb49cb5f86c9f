"""One way of scoring an answer. A data set names its scorer; evaluate, sweep, diagnosis, report and
dashboard all call ``score`` with it.

A scorer turns the raw generation into the answer it reads (``extracted``) and a score against the
reference answers: 1.0 / 0.0, or a soft accuracy in [0, 1] (VQA). Each is named for the protocol it
follows, since harnesses differ (lmms-eval scores POPE on the whole generation, LLaVA's own
``eval_pope.py`` on its first sentence):

``exact``           the whole generation, lower-cased, punctuation and articles dropped, equals a reference
``first_phrase``    the same on the generation up to its first clause break (. , ; : ! ? or a new line)
``pope_lmms_eval``  POPE as lmms-eval scores it: the lower-cased, stripped generation equals "yes" / "no"
``pope_llava``      POPE as LLaVA's eval_pope.py reads it: the first sentence, commas dropped, is "no" if a
                    word is "no", "No" or "not", else "yes"
``multiple_choice`` the option letter as lmms-eval's MMBench evaluation infers it without GPT: the one
                    letter A-E standing alone as a word ("B", "The answer is B"; not "A" in a sentence of
                    more than three words, where it may be the article), else the one letter written as
                    "B." "B," "B:" "B)" "B)." "(B)" "(B)." ":B" ":B," ":B." ":B)" or ":B).", else the one
                    option whose text the generation contains (case ignored); else no answer, which is
                    wrong (lmms-eval asks GPT there); equals the reference letter
``vqa_soft``        VQA accuracy (VQAv2, TextVQA): the EvalAI answer normalisation (punctuation, number
                    words, articles, contractions), then min(#references equal to it / 3, 1) averaged
                    over the leave-one-out subsets of the references
``mme_lmms_eval``   MME as lmms-eval reads it: "yes" / "no" (or "y" / "n"), else the first four characters
                    holding "yes" or "no", else "other"; equals the reference
``box_iou``         RefCOCO grounding as lmms-eval scores it: the first "[x0, y0, x1, y1]" in the generation
                    (image fractions) has IoU >= 0.5 with the reference box
``rouge_l``         a caption (RefCOCO captioning) as the COCO caption evaluation reads it: its ROUGE-L
                    against the references (``workbench.cider``); 1.0 when it is one of them. The metric
                    such sets report, CIDEr, is corpus-level: their benchmark's aggregate computes it

The aggregates benchmarks report over many scored answers (POPE's precision, recall and F1, MME's
perception and cognition scores with accuracy+, MMBench's circular accuracy; CIDEr in
``workbench.cider``) are pure functions; ``workbench.benchmarks`` applies them to a sweep's rows.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

from workbench.cider import rouge_l, tokenize
from workbench.errors import UserError


class UnknownScorer(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Score:
    generation: str  # the raw generation, as decoded
    extracted: str | None  # the answer the scorer reads from it
    value: float | None  # None when there is no reference to score against


@dataclass(frozen=True)
class Scorer:
    name: str
    protocol: str  # one line: what is read and how it is compared
    extract: Callable[[str, Sequence[str]], str | None]  # (generation, options) -> extracted answer
    compare: Callable[[str | None, Sequence[str]], float]  # (extracted, references) -> score

    def __call__(self, generation: str, references: Sequence[str] = (), options: Sequence[str] = ()) -> Score:
        extracted = self.extract(generation, options)
        references = [r for r in references if r is not None]
        return Score(generation, extracted, self.compare(extracted, references) if references else None)


SCORERS: dict[str, Scorer] = {}


def register(scorer: Scorer) -> Scorer:
    SCORERS[scorer.name] = scorer
    return scorer


def scorer(name: str) -> Scorer:
    if name not in SCORERS:
        raise UnknownScorer(f"unknown scorer {name!r}; available: {', '.join(sorted(SCORERS))}")
    return SCORERS[name]


def score(name: str, generation: str, references: Sequence[str] = (), options: Sequence[str] = ()) -> Score:
    return scorer(name)(generation, references, options)


# --- the workbench's own normalisation --------------------------------------------------------------

def normalize_answer(text: str | None) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces: "The Red." == "red"."""
    text = re.sub(r"[^\w\s-]", " ", (text or "").lower())
    return " ".join(w for w in text.split() if w not in {"a", "an", "the"})


def _equal_normalized(extracted: str | None, references: Sequence[str]) -> float:
    return float(normalize_answer(extracted) in {normalize_answer(r) for r in references})


def first_phrase(text: str) -> str:
    """The generation up to its first clause break: "red, and a circle" -> "red"."""
    return re.split(r"[.,;:!?\n]", text.strip(), maxsplit=1)[0].strip()


register(Scorer("exact", "the whole generation, normalised, equals a reference",
                lambda g, o: g.strip(), _equal_normalized))
register(Scorer("first_phrase", "the generation up to its first clause break, normalised, equals a reference",
                lambda g, o: first_phrase(g), _equal_normalized))

# --- POPE -----------------------------------------------------------------------------------------------


def _pope_llava(text: str) -> str:
    sentence = text.split(".")[0] if "." in text else text
    words = sentence.replace(",", "").split(" ")
    return "no" if {"No", "not", "no"} & set(words) else "yes"


register(Scorer("pope_lmms_eval", "the lower-cased, stripped generation equals the yes/no reference",
                lambda g, o: g.lower().strip(), lambda e, refs: float(e == refs[0].lower().strip())))
register(Scorer("pope_llava", 'the first sentence is "no" if it has the word no/No/not, else "yes"',
                lambda g, o: _pope_llava(g), lambda e, refs: float(e == refs[0].lower().strip())))

# --- multiple choice ----------------------------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"


# Where lmms-eval's MMBench evaluation finds a letter written with punctuation: (prefix, suffix) of a word.
_LETTER_FORMS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                 (":", ","), (":", "."), (":", ")"), (":", ")."))
_MIN_LETTERS = 5  # lmms-eval reads the letters A-E whatever the number of options


def _one_letter(words: Sequence[str], letters: str, prefix: str = "", suffix: str = "") -> str | None:
    found = [c for c in letters if prefix + c + suffix in words]
    return found[0] if len(found) == 1 else None


def option_letter(text: str, options: Sequence[str] = ()) -> str | None:
    """The option the generation picks, by the rules of lmms-eval's MMBench ``can_infer``: a letter
    standing alone as a word, else a letter in one of the punctuated forms, else the one option
    whose text it contains; None where those rules find none or several (lmms-eval then asks
    GPT, which the workbench does not: no answer). Two deliberate differences: the text match
    looks at every option (lmms-eval's at A-D only, so an option E is never matched by text) and skips
    missing ones (lmms-eval would match the text "nan" of an empty cell)."""
    words = text.split()
    letters = LETTERS[:max(_MIN_LETTERS, len(options))]
    alone = _one_letter(words, letters)
    if alone is not None and not (alone == "A" and len(words) > 3):  # "A" in a sentence may be the article
        return alone
    for prefix, suffix in _LETTER_FORMS:
        found = _one_letter(words, letters, prefix, suffix)
        if found is not None:
            return found
    lowered = text.lower()
    named = [LETTERS[i] for i, option in enumerate(options) if option and option.lower() in lowered]
    return named[0] if len(named) == 1 else None


register(Scorer("multiple_choice", "the option letter lmms-eval's MMBench rules read (a lone letter, \"B.\", "
                "\"(B)\", ... or the one option named; no GPT fallback) equals the reference",
                option_letter, lambda e, refs: float(e is not None and e == refs[0].strip().upper())))

# --- VQA soft accuracy ----------------------------------------------------------------------------------

# The EvalAI / official VQA evaluation's answer normalisation tables.
_CONTRACTIONS = dict(pair.split(">") for pair in """
    'ow'sat>'ow's'at 'ows'at>'ow's'at I'dve>I'd've Id've>I'd've Im>I'm Ive>I've aint>ain't
    arent>aren't cant>can't couldn'tve>couldn't've couldnt>couldn't couldnt've>couldn't've
    couldve>could've didnt>didn't doesnt>doesn't dont>don't hadn'tve>hadn't've hadnt>hadn't
    hadnt've>hadn't've hasnt>hasn't havent>haven't he'dve>he'd've hed>he'd hed've>he'd've hes>he's
    howd>how'd howll>how'll hows>how's isnt>isn't it'dve>it'd've itd>it'd itd've>it'd've itll>it'll
    let's>let's maam>ma'am mightn'tve>mightn't've mightnt>mightn't mightnt've>mightn't've
    mightve>might've mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock
    oughtnt>oughtn't ow's'at>'ow's'at shant>shan't she'dve>she'd've she's>she's shed've>she'd've
    shouldn'tve>shouldn't've shouldnt>shouldn't shouldnt've>shouldn't've shouldve>should've
    somebody'd>somebodyd somebody'dve>somebody'd've somebodyd've>somebody'd've
    somebodyll>somebody'll somebodys>somebody's someone'dve>someone'd've someoned>someone'd
    someoned've>someone'd've someonell>someone'll someones>someone's something'dve>something'd've
    somethingd>something'd somethingd've>something'd've somethingll>something'll thats>that's
    there'dve>there'd've thered>there'd thered've>there'd've therere>there're theres>there's
    they'dve>they'd've theyd>they'd theyd've>they'd've theyll>they'll theyre>they're theyve>they've
    twas>'twas wasnt>wasn't we'dve>we'd've wed've>we'd've werent>weren't weve>we've whatll>what'll
    whatre>what're whats>what's whatve>what've whens>when's whered>where'd wheres>where's
    whereve>where've who'dve>who'd've whod>who'd whod've>who'd've wholl>who'll whos>who's
    whove>who've whyll>why'll whyre>why're whys>why's wont>won't wouldn'tve>wouldn't've
    wouldnt>wouldn't wouldnt've>wouldn't've wouldve>would've y'all'dve>y'all'd've
    y'alld've>y'all'd've y'allll>y'all'll yall>y'all yall'd've>y'all'd've yall'll>y'all'll
    you'dve>you'd've youd>you'd youd've>you'd've youll>you'll youre>you're youve>you've
""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # a period not between digits (the official pattern, quirk kept)
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_normalize(text: str) -> str:
    """The official VQA normalisation: punctuation (dropped next to a space or in a digit group,
    else a space), periods not between digits, then number words to digits, articles dropped and
    contractions given their apostrophes."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(answer: str, references: Sequence[str]) -> float:
    """min(#other references equal to the answer / 3, 1), averaged over leaving each reference out.
    A single reference (a gold answer without the annotators' list) has no subset to leave out:
    there it is an exact match after the normalisation."""
    refs = [vqa_normalize(r) for r in references]
    if len(refs) == 1:
        return float(refs[0] == answer)
    return statistics.mean(min(1.0, sum(r == answer for j, r in enumerate(refs) if j != i) / 3)
                           for i in range(len(refs)))


register(Scorer("vqa_soft", "VQA accuracy: min(#matching references / 3, 1) over leave-one-out subsets, after "
                "the official answer normalisation", lambda g, o: vqa_normalize(g), vqa_accuracy))


# --- MME ------------------------------------------------------------------------------------------------

def mme_yes_no(text: str) -> str:
    """lmms-eval's MME reading (from the Otter evaluation): "yes", "no" or "other"."""
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if len(answer) == 1:
        return {"y": "yes", "n": "no"}.get(answer, "other")
    head = answer[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


register(Scorer("mme_lmms_eval", 'yes / no (or y / n), else the first four characters holding "yes" or "no"; '
                "equals the reference", lambda g, o: mme_yes_no(g),
                lambda e, refs: float(e == refs[0].lower().strip().replace(".", ""))))

# --- grounding (RefCOCO) --------------------------------------------------------------------------------

_FLOAT = r"(-?\d+(?:\.\d+)?)"
_BOX = re.compile(r"\[\s*" + r",\s*".join([_FLOAT] * 4) + r"\s*\]")
IOU_HIT = 0.5  # lmms-eval's headline ACC@0.5


def box_text(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """The first "[x0, y0, x1, y1]" of four numbers in the text, or None."""
    match = _BOX.search(text or "")
    return tuple(float(match[i]) for i in range(1, 5)) if match else None  # type: ignore[return-value]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _box_hit(extracted: str | None, references: Sequence[str]) -> float:
    box, gold = parse_box(extracted), parse_box(references[0])
    return float(box is not None and gold is not None and box_iou(box, gold) >= IOU_HIT)


register(Scorer("box_iou", f"the first [x0, y0, x1, y1] in the generation has IoU >= {IOU_HIT} with the reference box",
                lambda g, o: None if parse_box(g) is None else box_text(parse_box(g)), _box_hit))

# --- captions (RefCOCO captioning) ----------------------------------------------------------------------

register(Scorer("rouge_l", "the caption's ROUGE-L against the references (COCO caption evaluation: LCS, best "
                "precision and recall, beta 1.2) after its tokenisation; CIDEr is the benchmark's aggregate",
                lambda g, o: " ".join(tokenize(g)), rouge_l))

# --- aggregates over many scored answers ----------------------------------------------------------------


def pope_metrics(predicted: Sequence[str | None], gold: Sequence[str]) -> dict[str, float]:
    """POPE's accuracy, precision, recall, F1 and yes-ratio with "yes" as the positive class, over
    the answers as the scorer read them (lmms-eval's aggregation: an answer that is neither yes nor
    no counts as wrong, and as a negative prediction)."""
    pairs = [((p or "").lower().strip(), g.lower().strip()) for p, g in zip(predicted, gold)]
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    n = len(pairs)
    return {"accuracy": sum(p == g for p, g in pairs) / n if n else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(p == "yes" for p, _ in pairs) / n if n else 0.0}


def pair_score(groups: Sequence[str], correct: Sequence[bool]) -> float:
    """MME's subtask score: accuracy + accuracy+ in percent, where accuracy+ counts the images whose
    questions (two each) are all answered right; averaged over images as the reference does."""
    by_image: dict[str, list[bool]] = {}
    for group, right in zip(groups, correct):
        by_image.setdefault(group, []).append(bool(right))
    return statistics.mean(100.0 * sum(v) / len(v) + 100.0 * all(v) for v in by_image.values())


def circular_accuracy(groups: Sequence[str], correct: Sequence[bool]) -> float:
    """MMBench's circular evaluation: a question counts as right only when every rotation of its
    options (the rows sharing its group) is answered right."""
    by_question: dict[str, bool] = {}
    for group, right in zip(groups, correct):
        by_question[group] = by_question.get(group, True) and bool(right)
    return sum(by_question.values()) / len(by_question) if by_question else 0.0
