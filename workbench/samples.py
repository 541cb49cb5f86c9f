"""Samples and the plain data-set format every loader of the workbench reads.

A data set is a JSONL file, one sample per line; paths are relative to the file's folder:

    {"id": "eval-00000",                      # unique string
     "image": "images/scene-00000.png",       # any image PIL opens
     "question": "what colour is the circle ?",
     "answer": "red",                          # optional (needed for accuracy)
     "question_type": "attribute",             # optional (accuracy is broken down by it)
     "evidence_boxes": [[x0, y0, x1, y1]],     # optional: pixel boxes the answer depends on
     "mask": {"path": "masks/scene-00000.png", "values": [2]}}   # optional: evidence pixels are
                                               # those whose mask value is in "values"

Optional keys a benchmark's samples carry (``workbench.benchmarks`` builds them from the stored
forms of the standard sets; a JSONL row may give them too):

    "references": ["2", "two", ...],           # every reference answer (VQA's ten annotators)
    "options": ["cat", "dog"],                 # multiple-choice option texts, in letter order
    "group": "img-12.jpg",                     # rows scored together (MME's image pairs, MMBench's
                                               # circular rotations)
    "marks": [[x0, y0, x1, y1]],               # boxes drawn on the image the model sees (RefCOCO
                                               # captioning's region: a 1-pixel red outline)
    "benchmark": "pope"                        # the benchmark whose aggregates apply

Besides a JSONL file, ``read_dataset`` reads the other stored forms of ``workbench.dataset_formats``
(parquet shards, ``save_to_disk`` folders, COCO-style annotation JSON) through a benchmark of
``workbench.benchmarks``; their samples point at their image inside the table (``image_ref``),
decoded only when ``load_image`` is called.

Boxes are in pixels of the original image, x1/y1 exclusive. Extra keys are kept in ``extra``.
An id is a non-empty string or integer (where it names a folder, ``workbench.files.safe_name`` keeps
it inside the output folder); a question is never empty; an integer answer is read as its text.
Images are opened by ``workbench.images`` (EXIF orientation, 16-bit, palette, alpha on white).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from workbench.dataset_formats import ImageRef, detect, load_image as load_stored_image
from workbench.errors import UserError
from workbench.files import write_atomically, write_atomically_bytes  # noqa: F401  (re-exported)
from workbench.images import open_image, open_rgb
from workbench.scoring import SCORERS, Score, score

Box = tuple[float, float, float, float]


class DatasetError(UserError, ValueError):
    """A data-set file that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class Sample:
    id: str
    image_path: Path
    question: str
    answer: str | None = None
    question_type: str | None = None
    evidence_boxes: tuple[Box, ...] = ()
    mask_path: Path | None = None
    mask_values: tuple[int, ...] = ()
    scorer: str = "exact"  # how the data set scores an answer (``workbench.scoring``)
    references: tuple[str, ...] = ()  # every reference answer, where there are several (VQA)
    options: tuple[str, ...] = ()  # multiple-choice option texts, in letter order
    group: str | None = None  # rows scored together (MME image pairs, MMBench rotations)
    benchmark: str | None = None  # ``workbench.benchmarks`` name whose aggregates apply
    image_ref: ImageRef | None = None  # the image inside a stored table (then image_path is the table)
    marks: tuple[Box, ...] = ()  # boxes drawn on the image the model sees (RefCOCO captioning's region)
    extra: dict = field(default_factory=dict, compare=False)

    def load_image(self) -> Image.Image:
        image = open_rgb(self.image_path) if self.image_ref is None else load_stored_image(self.image_ref)
        return draw_marks(image, self.marks) if self.marks else image

    @property
    def golds(self) -> tuple[str, ...]:
        """The references an answer is scored against: all of them, or else the one answer."""
        return self.references or (() if self.answer is None else (self.answer,))

    def score(self, generation: str) -> Score:
        """The generation scored as this sample's data set says (the one way every command scores)."""
        return score(self.scorer, generation, self.golds, self.options)

    def evidence_mask(self) -> np.ndarray | None:
        """Boolean [H, W] mask of the evidence pixels, from the mask file or else the boxes."""
        if self.mask_path is not None:
            with open_image(self.mask_path) as mask:
                return np.isin(np.asarray(mask), self.mask_values)
        if not self.evidence_boxes:
            return None
        width, height = self.load_image().size  # after EXIF rotation, as the model sees it
        mask = np.zeros((height, width), dtype=bool)
        for x0, y0, x1, y1 in self.evidence_boxes:
            mask[int(y0): int(np.ceil(y1)), int(x0): int(np.ceil(x1))] = True
        return mask


MARK_COLOUR = (255, 0, 0)  # lmms-eval's RefCOCO captioning: PIL's rectangle, outline "red", width 1


def draw_marks(image: Image.Image, boxes) -> Image.Image:
    """The image with each box's outline drawn as lmms-eval draws a RefCOCO region: PIL's
    rectangle through (x0, y0) and (x1, y1), both corners painted, 1 pixel wide, in red."""
    from PIL import ImageDraw

    marked = image.convert("RGB")
    draw = ImageDraw.Draw(marked)
    for box in boxes:
        draw.rectangle(list(box), outline=MARK_COLOUR, width=1)
    return marked


def _field(row: dict, name: str, kind, where: str, required: bool = True):
    if name not in row or row[name] is None:
        if required:
            raise DatasetError(f"{where}: missing field {name!r}")
        return None
    if not isinstance(row[name], kind):
        raise DatasetError(f"{where}: field {name!r} must be {getattr(kind, '__name__', kind)}, got {row[name]!r}")
    return row[name]


def _boxes(value, where: str, name: str = "evidence_boxes") -> tuple[Box, ...]:
    if value is None:
        return ()
    try:
        if isinstance(value, (str, dict)) or any(isinstance(box, (str, dict)) for box in value):
            raise TypeError
        boxes = tuple(tuple(float(c) for c in box) for box in value)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{where}: {name!r} must be a list of [x0, y0, x1, y1]") from None
    for box in boxes:
        if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise DatasetError(f"{where}: bad {'evidence box' if name == 'evidence_boxes' else 'mark'} {list(box)} "
                               "(need x0 < x1 and y0 < y1)")
    return boxes  # type: ignore[return-value]


def _strings(row: dict, name: str, where: str) -> tuple[str, ...]:
    value = row.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise DatasetError(f"{where}: field {name!r} must be a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def _image_ref(value: dict, where: str) -> ImageRef:
    try:
        return ImageRef(str(value["format"]), str(value["source"]), int(value["row"]), str(value["column"]),
                        None if value.get("item") is None else int(value["item"]))
    except (KeyError, TypeError, ValueError):
        raise DatasetError(f"{where}: field 'image' must be a path or a stored-image reference "
                           "{format, source, row, column}") from None


def sample_from_row(row: dict, root: Path, where: str) -> Sample:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    image_ref = _image_ref(row["image"], where) if isinstance(row.get("image"), dict) else None
    image = Path(image_ref.source) if image_ref else root / _field(row, "image", str, where)
    if not image.exists() if image_ref else not image.is_file():
        raise DatasetError(f"{where}: image file not found: {image}")
    mask = _field(row, "mask", dict, where, required=False)
    if mask is not None and not isinstance(mask.get("path"), str):
        raise DatasetError(f"{where}: field 'mask' needs a 'path' string, got {mask!r}")
    known = {"id", "image", "question", "answer", "question_type", "evidence_boxes", "mask", "scorer",
             "references", "options", "group", "benchmark", "marks"}
    sample_id = _field(row, "id", (str, int), where)
    if isinstance(sample_id, bool) or not str(sample_id).strip():
        raise DatasetError(f"{where}: field 'id' must be a non-empty string or an integer, got {sample_id!r}")
    question = _field(row, "question", str, where)
    answer = _field(row, "answer", (str, int), where, required=False)
    if not question.strip():
        raise DatasetError(f"{where}: field 'question' is empty")
    scorer = _field(row, "scorer", str, where, required=False) or "exact"
    if scorer not in SCORERS:
        raise DatasetError(f"{where}: unknown scorer {scorer!r}; available: {', '.join(sorted(SCORERS))}")
    try:
        mask_values = tuple(int(v) for v in mask.get("values", ())) if mask else ()
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: mask 'values' must be a list of integers, got {mask.get('values')!r}") from None
    return Sample(
        id=str(sample_id),
        image_path=image,
        question=question,
        answer=None if answer is None else str(answer),
        question_type=_field(row, "question_type", str, where, required=False),
        evidence_boxes=_boxes(row.get("evidence_boxes"), where),
        mask_path=root / mask["path"] if mask else None,
        mask_values=mask_values,
        scorer=scorer,
        references=_strings(row, "references", where),
        options=_strings(row, "options", where),
        group=None if row.get("group") is None else str(row["group"]),
        benchmark=_field(row, "benchmark", str, where, required=False),
        image_ref=image_ref,
        marks=_boxes(row.get("marks"), where, "marks"),
        extra={k: v for k, v in row.items() if k not in known},
    )


def read_dataset(path: str | Path, limit: int | None = None, benchmark: str | None = None) -> list[Sample]:
    """Read a data set in any stored form (``workbench.dataset_formats``). A JSONL file is the
    workbench's own format (any malformed line fails with its line number); the other forms are
    read through ``benchmark`` (a ``workbench.benchmarks`` name), inferred from their columns when
    it is None."""
    if not Path(path).exists():
        raise DatasetError(f"data set not found: {path}")
    form = detect(path)
    if form.format != "jsonl":
        from workbench.benchmarks import read_benchmark

        return read_benchmark(form, benchmark, limit)
    if benchmark is not None:
        from workbench.benchmarks import check_benchmark_name

        check_benchmark_name(benchmark)
    path = form.path
    samples, seen = [], set()
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
            sample = sample_from_row(row, path.parent, where)
            if benchmark is not None and sample.benchmark is None:
                sample = replace(sample, benchmark=benchmark)
            if sample.id in seen:
                raise DatasetError(f"{where}: duplicate id {sample.id!r}")
            seen.add(sample.id)
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise DatasetError(f"{path}: no samples")
    return samples


def check_images(samples: Iterable[Sample]) -> None:
    """Decode every sample's image once: an undecodable file is one ``ImageError`` naming it,
    before a model is loaded."""
    for sample in samples:
        sample.load_image()


def sample_to_row(sample: Sample, root: Path) -> dict:
    ref = sample.image_ref
    image = (os.path.relpath(sample.image_path, root) if ref is None else
             {"format": ref.format, "source": ref.source, "row": ref.row, "column": ref.column, "item": ref.item})
    row = {"id": sample.id, "image": image, "question": sample.question}
    if sample.answer is not None:
        row["answer"] = sample.answer
    if sample.question_type is not None:
        row["question_type"] = sample.question_type
    if sample.evidence_boxes:
        row["evidence_boxes"] = [list(b) for b in sample.evidence_boxes]
    if sample.marks:
        row["marks"] = [list(b) for b in sample.marks]
    if sample.mask_path is not None:
        row["mask"] = {"path": os.path.relpath(sample.mask_path, root), "values": list(sample.mask_values)}
    if sample.scorer != "exact":
        row["scorer"] = sample.scorer
    for name in ("references", "options"):
        if getattr(sample, name):
            row[name] = list(getattr(sample, name))
    for name in ("group", "benchmark"):
        if getattr(sample, name) is not None:
            row[name] = getattr(sample, name)
    return row | sample.extra


def write_dataset(samples: Iterable[Sample], path: str | Path) -> Path:
    path = Path(path)
    lines = [json.dumps(sample_to_row(s, path.parent)) for s in samples]
    write_atomically(path, "\n".join(lines) + "\n")
    return path
