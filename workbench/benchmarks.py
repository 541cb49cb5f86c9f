"""The standard VLM evaluation sets, read in the stored forms users have, each with the prompt and
the metric of its reference evaluation.

A ``Benchmark`` names the columns of its stored form (as the hub datasets lmms-eval reads spell
them), turns one stored row into samples whose question is the reference prompt (the model
adapter then wraps it in its family's chat template, as for every sample), names the scorer of
``workbench.scoring`` that reads an answer, and aggregates scored rows into its official metrics.
Boxes become evidence boxes, which the failure diagnosis and the evidence recall read.

Sources (read for the facts; the code is the workbench's own): lmms-eval's task folders
``lmms_eval/tasks/<name>/`` (prompts, process_results, aggregation). The prompts are lmms-eval's
"default" ones, which are LLaVA-1.5's: "Answer the question using a single word or phrase." for
short answers, "Answer with the option's letter from the given choices directly." after options
laid out one per line as "A. text".

``--benchmark NAME`` picks one; without it the benchmark is inferred from the stored columns,
and a table that fits several (or none) is one line naming them. Where two benchmarks read the
same stored form (RefCOCO: captioning, lmms-eval's main task, and grounding), inference picks the
one marked ``inferred`` and the other is asked for by name.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import polars as pl

from workbench.dataset_formats import ImageRef, StoredForm, iter_rows, open_table, read_coco
from workbench.errors import UserError
from workbench.samples import Box, DatasetError, Sample
from workbench.cider import cider_d
from workbench.scoring import (LETTERS, box_text, circular_accuracy, pair_score, pope_metrics, vqa_normalize)

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
MMBENCH_OPTIONS_HEADER = "There are several options:"
REC_PROMPT = ("Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
              "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
              "bounding box coordinate of the region this sentence describes: ")
CAPTION_PROMPT = "Provide a short description for this region."  # lmms-eval's refcoco_bbox_* tasks
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MMBENCH_CIRCULAR = 1_000_000  # MMBench stores rotation k of question i as index i + k * 1e6


class UnknownBenchmark(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Row:
    """One stored row as a benchmark sees it: its values (the columns the benchmark reads; the
    reader adds "_image", the undecoded image where a benchmark needs its size, and
    "_scene_graphs" where GQA's are given), its index and where its image is."""

    values: dict
    index: int
    image: ImageRef | None  # a table's image (None for a COCO-style form)
    image_path: Path  # the image file (COCO) or the table


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    signatures: tuple[frozenset[str], ...]  # column sets that identify its stored form (any one)
    columns: tuple[str, ...]  # the columns it reads (besides the image)
    prompt: str  # the reference prompt, in words (``workbench benchmarks`` shows it)
    scorer: str  # ``workbench.scoring`` name
    metric: str  # the official metric, in words
    reference: str  # where the prompt and the metric come from
    samples: Callable[[Row], Iterable[Sample]]  # one stored row -> its samples
    aggregate: Callable[[pl.DataFrame], dict[str, float]] | None = None  # scored rows -> official metrics
    image_column: str = "image"
    inferred: bool = True  # False: another benchmark reads the same stored form and inference picks it

    def fits(self, columns: set[str]) -> int:
        """The size of the largest signature the columns hold (0: none)."""
        return max((len(s) for s in self.signatures if s <= columns), default=0)


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def check_benchmark_name(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise UnknownBenchmark(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def _sample(row: Row, benchmark: str, scorer: str, **fields) -> Sample:
    return Sample(image_path=row.image_path, image_ref=row.image, scorer=scorer, benchmark=benchmark, **fields)


def _text(value) -> str:
    return "" if value is None else str(value)


def _missing(value) -> bool:
    """An empty cell as the stored forms write it (None, NaN, or the text "nan" of MMBench's TSVs)."""
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() in ("", "nan")


def _options_block(options: Sequence[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))


# --- POPE ---------------------------------------------------------------------------------------------

def _pope(row: Row) -> Iterable[Sample]:
    v = row.values
    yield _sample(row, "pope", "pope_lmms_eval", id=_text(v["question_id"]),
                  question=v["question"].strip() + SHORT_ANSWER, answer=_text(v["answer"]).lower().strip(),
                  question_type=_text(v.get("category")) or None)


def _pope_aggregate(rows: pl.DataFrame) -> dict[str, float]:
    out = {}
    for category in ["all", *sorted(set(rows["question_type"].drop_nulls().to_list()))]:
        part = rows if category == "all" else rows.filter(pl.col("question_type") == category)
        metrics = pope_metrics(part["extracted_answer"].to_list(), part["gold_answer"].to_list())
        out |= {f"{category}/{name}": value for name, value in metrics.items()}
    return out


register(Benchmark(
    "pope", "POPE (object hallucination, yes/no)",
    (frozenset({"question_id", "question", "answer", "image_source", "category"}),),
    ("question_id", "question", "answer", "category"),
    "question + \"\\nAnswer the question using a single word or phrase.\"", "pope_lmms_eval",
    "accuracy, precision, recall, F1 (\"yes\" positive) and yes-ratio, per category (random / popular / "
    "adversarial) and over all", "lmms-eval tasks/pope", _pope, _pope_aggregate))


# --- GQA ----------------------------------------------------------------------------------------------

def _scene_graphs(form: StoredForm) -> dict:
    """GQA's scene graphs, when a ``*sceneGraphs*.json`` lies beside the data (imageId -> graph)."""
    folder = form.path if form.path.is_dir() else form.path.parent
    found = sorted(folder.glob("*sceneGraphs*.json")) or sorted(folder.parent.glob("*sceneGraphs*.json"))
    if not found:
        return {}
    try:
        return json.loads(found[0].read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{found[0]}: not a readable GQA scene-graph JSON ({e})") from None


def _strings_in(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings_in(item)


def gqa_evidence(annotations, graph: dict | None) -> tuple[Box, ...]:
    """The boxes of the scene-graph objects a GQA question's annotations point at (the objects its
    question, answer and full answer mention), in pixels, x1/y1 exclusive."""
    objects = (graph or {}).get("objects", {})
    ids = sorted({s for s in _strings_in(annotations) if s in objects})
    return tuple((float(o["x"]), float(o["y"]), float(o["x"] + o["w"]), float(o["y"] + o["h"]))
                 for o in (objects[i] for i in ids) if o.get("w", 0) > 0 and o.get("h", 0) > 0)


def _gqa(row: Row) -> Iterable[Sample]:
    v = row.values
    types = v.get("types") if isinstance(v.get("types"), dict) else {}
    graphs = v.get("_scene_graphs") or {}
    yield _sample(row, "gqa", "exact", id=_text(v["id"]), question=v["question"] + SHORT_ANSWER,
                  answer=_text(v["answer"]), question_type=types.get("structural") or None,
                  evidence_boxes=gqa_evidence(v.get("annotations"), graphs.get(_text(v.get("imageId")))))


register(Benchmark(
    "gqa", "GQA (compositional questions; evidence from scene graphs when given)",
    (frozenset({"id", "imageId", "question", "answer", "fullAnswer"}),),
    ("id", "imageId", "question", "answer", "types", "annotations"),
    "question + \"\\nAnswer the question using a single word or phrase.\"", "exact",
    "exact match, case and punctuation ignored", "lmms-eval tasks/gqa; scene graphs: GQA's *sceneGraphs.json",
    _gqa))


# --- TextVQA and VQAv2 --------------------------------------------------------------------------------

def _majority(answers: Sequence[str]) -> str | None:
    """The most frequent normalised reference (ties: the first given), the answer a table shows."""
    if not answers:
        return None
    counts = Counter(vqa_normalize(a) for a in answers)
    return max(counts, key=lambda a: (counts[a], -[vqa_normalize(x) for x in answers].index(a)))


def _mean_score(rows: pl.DataFrame) -> dict[str, float]:
    return {"vqa_accuracy": float(rows["score"].mean())} if rows.height else {}


def _textvqa(row: Row) -> Iterable[Sample]:
    v = row.values
    answers = tuple(_text(a) for a in (v.get("answers") or ()))
    yield _sample(row, "textvqa", "vqa_soft", id=_text(v["question_id"]),
                  question=_text(v["question"]).capitalize() + SHORT_ANSWER, answer=_majority(answers),
                  references=answers)


register(Benchmark(
    "textvqa", "TextVQA (reading text in images)",
    (frozenset({"question_id", "question", "answers", "ocr_tokens"}),),
    ("question_id", "question", "answers"),
    "question (capitalised) + \"\\nAnswer the question using a single word or phrase.\"", "vqa_soft",
    "VQA accuracy: min(#annotators / 3, 1) over leave-one-out subsets, EvalAI normalisation",
    "lmms-eval tasks/textvqa", _textvqa, _mean_score))


def _vqav2(row: Row) -> Iterable[Sample]:
    v = row.values
    answers = tuple(_text(a["answer"] if isinstance(a, dict) else a) for a in (v.get("answers") or ()))
    yield _sample(row, "vqav2", "vqa_soft", id=_text(v["question_id"]), question=_text(v["question"]) + SHORT_ANSWER,
                  answer=_text(v.get("multiple_choice_answer")) or _majority(answers), references=answers,
                  question_type=_text(v.get("answer_type")) or None)


register(Benchmark(
    "vqav2", "VQAv2 (open-ended visual questions)",
    (frozenset({"question_id", "question", "answers", "multiple_choice_answer"}),),
    ("question_id", "question", "answers", "multiple_choice_answer", "answer_type"),
    "question + \"\\nAnswer the question using a single word or phrase.\"", "vqa_soft",
    "VQA accuracy: min(#annotators / 3, 1) over leave-one-out subsets, EvalAI normalisation",
    "lmms-eval tasks/vqav2", _vqav2, _mean_score))


# --- ScienceQA-IMG ------------------------------------------------------------------------------------

def _scienceqa(row: Row) -> Iterable[Sample]:
    v = row.values
    choices = tuple(_text(c) for c in v["choices"])
    context = f"Context: {v['hint']}\n" if v.get("hint") else ""
    yield _sample(row, "scienceqa_img", "multiple_choice", id=_text(v.get("id", row.index)),
                  question=f"{context}{v['question']}\n{_options_block(choices)}{OPTION_LETTER}",
                  answer=LETTERS[int(v["answer"])], options=choices, question_type=_text(v.get("subject")) or None)


register(Benchmark(
    "scienceqa_img", "ScienceQA-IMG (science multiple choice with an image)",
    (frozenset({"question", "choices", "answer", "hint"}),),
    ("question", "choices", "answer", "hint", "subject"),
    "\"Context: hint\\n\" (when there is one) + question + options one per line as \"A. text\" + "
    "\"\\nAnswer with the option's letter from the given choices directly.\"", "multiple_choice",
    "accuracy of the option letter", "lmms-eval tasks/scienceqa (scienceqa_img: the config whose rows all have an image)",
    _scienceqa))


# --- MME ----------------------------------------------------------------------------------------------

def _mme(row: Row) -> Iterable[Sample]:
    v = row.values
    question = _text(v["question"]).strip().replace(" Please answer yes or no.", "")
    yield _sample(row, "mme", "mme_lmms_eval", id=f"{v['question_id']}#{row.index}", question=question + SHORT_ANSWER,
                  answer=_text(v["answer"]).strip(), question_type=_text(v["category"]), group=_text(v["question_id"]))


def _mme_aggregate(rows: pl.DataFrame) -> dict[str, float]:
    out = {}
    for category in sorted(set(rows["question_type"].drop_nulls().to_list())):
        part = rows.filter(pl.col("question_type") == category)
        out[f"{category}/score"] = pair_score(part["group"].to_list(), part["correct"].to_list())
    out["all/perception"] = sum(out.get(f"{c}/score", 0.0) for c in MME_PERCEPTION)
    out["all/cognition"] = sum(out.get(f"{c}/score", 0.0) for c in MME_COGNITION)
    return out


register(Benchmark(
    "mme", "MME (yes/no, two questions per image)",
    (frozenset({"question_id", "question", "answer", "category"}),),
    ("question_id", "question", "answer", "category"),
    "question without \" Please answer yes or no.\" + \"\\nAnswer the question using a single word or phrase.\"",
    "mme_lmms_eval", "per subtask accuracy + accuracy+ (both questions of an image right), in percent, summed "
    "into perception (10 subtasks, max 2000) and cognition (4, max 800)", "lmms-eval tasks/mme", _mme,
    _mme_aggregate))


# --- MMBench ------------------------------------------------------------------------------------------

def _mmbench(row: Row) -> Iterable[Sample]:
    v = row.values
    options = tuple(_text(v[c]) for c in "ABCDE" if c in v and not _missing(v[c]))
    block = MMBENCH_OPTIONS_HEADER + "\n" + _options_block(options)
    head = f"{v['hint']} {v['question']}" if not _missing(v.get("hint")) else _text(v["question"])
    index = int(v["index"])
    yield _sample(row, "mmbench", "multiple_choice", id=str(index), question=f"{head} {block}{OPTION_LETTER}",
                  answer=_text(v.get("answer")).strip() or None, options=options,
                  question_type=_text(v.get("category")) or None, group=str(index % MMBENCH_CIRCULAR))


def _mmbench_aggregate(rows: pl.DataFrame) -> dict[str, float]:
    first = rows.filter(pl.col("sample_id").cast(pl.Int64) < MMBENCH_CIRCULAR)
    out = {"circular_accuracy": circular_accuracy(rows["group"].to_list(), rows["correct"].to_list())}
    if first.height:
        out["single_pass_accuracy"] = float(first["correct"].mean())
    return out


register(Benchmark(
    "mmbench", "MMBench (multiple choice, circular evaluation)",
    (frozenset({"index", "question", "hint", "A", "B", "answer", "category"}),),
    ("index", "question", "hint", "A", "B", "C", "D", "E", "answer", "category"),
    "hint + \" \" + question + \" There are several options:\" + options one per line as \"A. text\" + "
    "\"\\nAnswer with the option's letter from the given choices directly.\"", "multiple_choice",
    "circular accuracy: a question counts only if every rotation of its options (index mod 1e6) is right; "
    "the option letter is read by lmms-eval's rule-based matching (can_infer: a lone letter, a punctuated letter "
    "such as \"B.\" or \"(B)\", else the one option whose text the answer contains); where those rules find no "
    "letter lmms-eval asks GPT, here that answer counts as none (wrong)",
    "lmms-eval tasks/mmbench (en_utils, mmbench_evals)",
    _mmbench, _mmbench_aggregate))


# --- SEED-Bench-IMG -----------------------------------------------------------------------------------

def _seed(row: Row) -> Iterable[Sample]:
    v = row.values
    if _text(v.get("data_type")) not in ("", "image"):
        return  # SEED-Bench-IMG: the image part of SEED-Bench
    options = tuple(_text(v[f"choice_{c}"]) for c in "abcd")
    first = Row(v, row.index, replace(row.image, item=0) if row.image is not None else None, row.image_path)
    yield _sample(first, "seedbench_img", "multiple_choice", id=_text(v["question_id"]),
                  question=f"{v['question']}\n{_options_block(options)}{OPTION_LETTER}",
                  answer=_text(v["answer"]).strip(), options=options,
                  question_type=_text(v.get("question_type_id")) or None)


register(Benchmark(
    "seedbench_img", "SEED-Bench-IMG (multiple choice; the image rows of SEED-Bench)",
    (frozenset({"question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer"}),),
    ("question_id", "question", "choice_a", "choice_b", "choice_c", "choice_d", "answer", "data_type",
     "question_type_id"),
    "question + options one per line as \"A. text\" + \"\\nAnswer with the option's letter from the given "
    "choices directly.\"", "multiple_choice", "accuracy of the option letter over the image rows",
    "lmms-eval tasks/seedbench", _seed))


# --- RefCOCO ------------------------------------------------------------------------------------------

def _image_size(row: Row, values: dict) -> tuple[int, int]:
    if values.get("width") and values.get("height"):
        return int(values["width"]), int(values["height"])
    from PIL import Image

    from workbench.dataset_formats import image_bytes

    if row.image is None:
        with Image.open(row.image_path) as image:
            return image.size
    data = image_bytes(values["_image"], row.image)
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return image.size  # read from the header; nothing decoded


def _expressions(v: dict) -> list[str]:
    if isinstance(v.get("answer"), (list, tuple)):
        return [_text(a) for a in v["answer"]]
    if isinstance(v.get("sentences"), list):  # the refer toolkit's refs: [{"sent": ...}]
        return [_text(s["sent"] if isinstance(s, dict) else s) for s in v["sentences"]]
    return [_text(v.get("answer") or v.get("caption"))]


def _region(v: dict) -> tuple[float, float, float, float]:
    """The region of a RefCOCO row: COCO's [x, y, width, height] in pixels -> (x0, y0, x1, y1)."""
    x, y, w, h = (float(c) for c in v["bbox"])
    return x, y, x + w, y + h


def _region_id(row: Row) -> str:
    v = row.values
    return _text(v.get("question_id", v.get("id", row.index)))


def _refcoco_rec(row: Row) -> Iterable[Sample]:
    v = row.values
    x0, y0, x1, y1 = _region(v)
    width, height = _image_size(row, v)
    gold = box_text((x0 / width, y0 / height, x1 / width, y1 / height))
    for k, expression in enumerate(_expressions(v)):
        yield _sample(row, "refcoco_rec", "box_iou", id=f"{_region_id(row)}-{k}", question=REC_PROMPT + expression,
                      answer=gold, evidence_boxes=((x0, y0, x1, y1),) if x1 > x0 and y1 > y0 else (),
                      question_type=_text(v.get("category_id")) or None)


def _refcoco_caption(row: Row) -> Iterable[Sample]:
    v = row.values
    box = _region(v)
    expressions = tuple(e for e in _expressions(v) if e.strip())
    if not expressions:
        raise ValueError("no referring expression to score a caption against")
    region = (box,) if box[2] > box[0] and box[3] > box[1] else ()
    yield _sample(row, "refcoco_caption", "rouge_l", id=_region_id(row), question=CAPTION_PROMPT,
                  answer=expressions[0], references=expressions, evidence_boxes=region, marks=region,
                  question_type=_text(v.get("category_id")) or None)


def _caption_aggregate(rows: pl.DataFrame) -> dict[str, float]:
    """CIDEr over the evaluated regions (document frequencies from their references), as lmms-eval's
    refcoco_CIDEr; ROUGE-L, the mean of the rows' scores, as its refcoco_ROUGE_L."""
    if not rows.height:
        return {}
    captions = [c or "" for c in rows["extracted_answer"].to_list()]
    corpus, _ = cider_d(captions, [list(r) for r in rows["references"].to_list()])
    return {"CIDEr": corpus, "ROUGE_L": float(rows["score"].mean())}


_REFCOCO_SIGNATURES = (frozenset({"question_id", "answer", "bbox"}), frozenset({"bbox", "image_id", "sentences"}),
                       frozenset({"bbox", "image_id", "answer"}))
_REFCOCO_COLUMNS = ("question_id", "id", "answer", "sentences", "caption", "bbox", "category_id", "width", "height")

register(Benchmark(
    "refcoco_caption", "RefCOCO (region captioning: the region's box drawn on the image)", _REFCOCO_SIGNATURES,
    _REFCOCO_COLUMNS, f"the image with the region's box drawn on it (1-pixel red outline) + \"{CAPTION_PROMPT}\"; "
    "one sample per region, every referring expression of the region a reference", "rouge_l",
    "CIDEr (CIDEr-D as the COCO caption evaluation computes it: n-grams 1-4, tf-idf with document frequencies from "
    "the evaluated regions' references, clipping, Gaussian length penalty sigma 6, x10) and ROUGE-L (each row's "
    "score); BLEU and METEOR, which lmms-eval also prints, are not computed; the box is the evidence region",
    "lmms-eval tasks/refcoco (refcoco_bbox_*, the default RefCOCO tasks)", _refcoco_caption, _caption_aggregate))

register(Benchmark(
    "refcoco_rec", "RefCOCO (referring expressions, grounding)", _REFCOCO_SIGNATURES, _REFCOCO_COLUMNS,
    "lmms-eval's grounding prompt (\"Bounding box coordinates are specified in the format ... Please provide the "
    "bounding box coordinate of the region this sentence describes: \") + the expression; one sample per "
    "expression", "box_iou", "ACC@0.5: the first [x0, y0, x1, y1] answered (image fractions) has IoU >= 0.5 with "
    "the box; the box is the evidence region; read only with --benchmark refcoco_rec (its stored form is "
    "refcoco_caption's)", "lmms-eval tasks/refcoco (refcoco_bbox_rec)", _refcoco_rec, inferred=False))


# --- reading ------------------------------------------------------------------------------------------

def infer(columns: set[str], where: str) -> Benchmark:
    """The benchmark whose stored form the columns are: the one with the most specific matching
    signature; one line naming the candidates when that is not unique."""
    fits = {name: b.fits(columns) for name, b in BENCHMARKS.items() if b.inferred and b.fits(columns)}
    if not fits:
        raise UnknownBenchmark(f"{where}: its columns ({', '.join(sorted(columns))}) are no known benchmark's; "
                               f"pass --benchmark (one of: {', '.join(BENCHMARKS)}) or convert it to the "
                               "workbench's JSONL format")
    best = max(fits.values())
    top = [name for name, size in fits.items() if size == best]
    if len(top) > 1:
        raise UnknownBenchmark(f"{where}: its columns fit several benchmarks ({', '.join(top)}); pass --benchmark")
    return BENCHMARKS[top[0]]


def _check_columns(benchmark: Benchmark, columns: set[str], where: str) -> None:
    if not benchmark.fits(columns):
        wanted = " or ".join("{" + ", ".join(sorted(s)) + "}" for s in benchmark.signatures)
        raise DatasetError(f"{where}: not in {benchmark.name}'s stored form: expected the columns {wanted}, "
                           f"found {', '.join(sorted(columns))}")


def _rows(form: StoredForm, benchmark: Benchmark | None) -> tuple[Benchmark, Iterable[Row]]:
    where = str(form.path)
    if form.format == "coco":
        records, folder = read_coco(form.path)
        columns = set().union(*(r.keys() for r in records)) if records else set()
        chosen = benchmark or infer(columns, where)
        _check_columns(chosen, columns, where)
        return chosen, (Row(r, i, None, folder / r["file_name"]) for i, r in enumerate(records))
    table = open_table(form.format, str(form.path))
    columns = set(table.column_names)
    chosen = benchmark or infer(columns, where)
    _check_columns(chosen, columns, where)
    image_of = None  # GQA stores its images apart: a row's image is found by imageId
    if chosen.image_column not in columns:
        image_of = _gqa_image_table(form) if chosen.name == "gqa" else None
        if image_of is None:
            raise DatasetError(f"{where}: no {chosen.image_column!r} column: {chosen.name} needs its images stored "
                               "in the table (as lmms-eval's copies store them)"
                               + ("; or GQA's images table (columns id, image) in a folder named *images* beside "
                                  "it" if chosen.name == "gqa" else ""))
    wanted = [c for c in chosen.columns if c in columns]
    if chosen.name == "refcoco_rec" and not {"width", "height"} <= columns:
        wanted.append(chosen.image_column)  # the image size, read from the header, turns the box into fractions
    graphs = _scene_graphs(form) if chosen.name == "gqa" else {}

    def rows() -> Iterable[Row]:
        for index, values in iter_rows(table, wanted):
            if chosen.image_column in values:
                values["_image"] = values.pop(chosen.image_column)
            if graphs:
                values["_scene_graphs"] = graphs
            if image_of is None:
                ref = ImageRef(form.format, str(form.path), index, chosen.image_column)
            else:
                ref = image_of(_text(values.get("imageId")), f"{where} row {index}")
            yield Row(values, index, ref, Path(ref.source))
    return chosen, rows()


def _gqa_image_table(form: StoredForm):
    """For GQA's question table stored without images (lmms-eval's ``testdev_balanced_instructions``):
    the images table beside it (``testdev_balanced_images``: columns id, image), as a function
    from an imageId to its ``ImageRef``; None when there is none."""
    from workbench.dataset_formats import DatasetFormatError, detect

    here = form.path if form.path.is_dir() else form.path.parent
    for folder in sorted(p for p in here.parent.iterdir() if p.is_dir() and "images" in p.name and p != here):
        try:
            images = detect(folder)
        except DatasetFormatError:
            continue
        if images.format not in ("parquet", "arrow"):
            continue
        table = open_table(images.format, str(images.path))
        if not {"id", "image"} <= set(table.column_names):
            continue
        index = {str(values["id"]): i for i, values in iter_rows(table, ["id"])}

        def image_of(image_id: str, where: str, images=images, index=index) -> ImageRef:
            if image_id not in index:
                raise DatasetError(f"{where}: imageId {image_id!r} is not in the images table {images.path}")
            return ImageRef(images.format, str(images.path), index[image_id], "image")
        return image_of
    return None


def read_benchmark(form: StoredForm, name: str | None = None, limit: int | None = None) -> list[Sample]:
    """The samples of a stored benchmark file (parquet, arrow or COCO-style), images left in place."""
    benchmark = check_benchmark_name(name) if name is not None else None
    chosen, rows = _rows(form, benchmark)
    samples, seen = [], set()
    for row in rows:
        try:
            made = list(chosen.samples(row))
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            raise DatasetError(f"{form.path} row {row.index}: cannot read it as {chosen.name} "
                               f"({type(e).__name__}: {e})") from None
        for sample in made:
            if sample.id in seen:
                raise DatasetError(f"{form.path} row {row.index}: duplicate id {sample.id!r}")
            if not sample.question.strip():
                raise DatasetError(f"{form.path} row {row.index}: empty question")
            seen.add(sample.id)
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                return samples
    if not samples:
        raise DatasetError(f"{form.path}: no samples")
    return samples


# --- aggregates ---------------------------------------------------------------------------------------

def benchmark_summary(table: pl.DataFrame, samples: Sequence[Sample]) -> pl.DataFrame:
    """The official metrics of each benchmark among ``samples``, per method and budget of a sweep
    table (its "ok" rows): columns method, budget, benchmark, metric, value."""
    meta = pl.DataFrame([{"sample_id": s.id, "group": s.group, "benchmark": s.benchmark,
                          "references": list(s.golds)} for s in samples
                         if s.benchmark in BENCHMARKS and BENCHMARKS[s.benchmark].aggregate],
                        schema={"sample_id": pl.String, "group": pl.String, "benchmark": pl.String,
                                "references": pl.List(pl.String)})
    schema = {"method": pl.String, "budget": pl.String, "benchmark": pl.String, "metric": pl.String,
              "value": pl.Float64}
    if meta.is_empty() or table.is_empty():
        return pl.DataFrame(schema=schema)
    ok = table.filter(pl.col("status") == "ok").join(meta, on="sample_id", how="inner")
    out = []
    for (method, budget, name), part in ok.group_by("method", "budget", "benchmark", maintain_order=True):
        for metric, value in BENCHMARKS[name].aggregate(part).items():
            out.append({"method": method, "budget": budget, "benchmark": name, "metric": metric, "value": value})
    return pl.DataFrame(out, schema=schema).sort("benchmark", "method", "budget", "metric")


def summary_wide(summary: pl.DataFrame) -> pl.DataFrame:
    """One row per benchmark, method, budget and part (a metric "adversarial/f1" is part
    "adversarial"; a metric without a part is part "all"), one column per metric (as printed)."""
    if summary.is_empty():
        return summary
    split = summary.with_columns(
        part=pl.when(pl.col("metric").str.contains("/")).then(pl.col("metric").str.split("/").list.first())
        .otherwise(pl.lit("all")),
        metric=pl.col("metric").str.split("/").list.last())
    return split.pivot(on="metric", index=["benchmark", "method", "budget", "part"], values="value",
                       maintain_order=True)


def print_benchmark_summary(table: pl.DataFrame, samples: Sequence[Sample]) -> None:
    """The official metrics beside the sweep's accuracy table, naming each benchmark's protocol."""
    summary = benchmark_summary(table, samples)
    for name in summary["benchmark"].unique(maintain_order=True).to_list():
        b = BENCHMARKS[name]
        print(f"{b.title}: {b.metric} (scorer {b.scorer}; {b.reference})")
        with pl.Config(tbl_cols=-1, tbl_rows=100, float_precision=3, tbl_hide_dataframe_shape=True,
                       tbl_width_chars=200):
            print(summary_wide(summary.filter(pl.col("benchmark") == name)).drop("benchmark"))


# The metric a one-line summary quotes for each benchmark (``benchmark_summary`` names).
HEADLINE = {"pope": "all/f1", "textvqa": "vqa_accuracy", "vqav2": "vqa_accuracy", "mme": "all/perception",
            "mmbench": "circular_accuracy", "refcoco_caption": "CIDEr"}
