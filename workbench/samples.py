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

Boxes are in pixels of the original image, x1/y1 exclusive. Extra keys are kept in ``extra``.
An id is a non-empty string or integer (where it names a folder, ``workbench.files.safe_name`` keeps
it inside the output folder); a question is never empty; an integer answer is read as its text.
Images are opened by ``workbench.images`` (EXIF orientation, 16-bit, palette, alpha on white).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from workbench.files import write_atomically, write_atomically_bytes  # noqa: F401  (re-exported)
from workbench.images import open_image, open_rgb
from workbench.scoring import SCORERS

Box = tuple[float, float, float, float]


class DatasetError(ValueError):
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
    extra: dict = field(default_factory=dict, compare=False)

    def load_image(self) -> Image.Image:
        return open_rgb(self.image_path)

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


def _field(row: dict, name: str, kind, where: str, required: bool = True):
    if name not in row or row[name] is None:
        if required:
            raise DatasetError(f"{where}: missing field {name!r}")
        return None
    if not isinstance(row[name], kind):
        raise DatasetError(f"{where}: field {name!r} must be {getattr(kind, '__name__', kind)}, got {row[name]!r}")
    return row[name]


def _boxes(value, where: str) -> tuple[Box, ...]:
    if value is None:
        return ()
    try:
        if isinstance(value, (str, dict)) or any(isinstance(box, (str, dict)) for box in value):
            raise TypeError
        boxes = tuple(tuple(float(c) for c in box) for box in value)
    except (TypeError, ValueError, OverflowError):
        raise DatasetError(f"{where}: 'evidence_boxes' must be a list of [x0, y0, x1, y1]") from None
    for box in boxes:
        if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
            raise DatasetError(f"{where}: bad evidence box {list(box)} (need x0 < x1 and y0 < y1)")
    return boxes  # type: ignore[return-value]


def sample_from_row(row: dict, root: Path, where: str) -> Sample:
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    image = root / _field(row, "image", str, where)
    if not image.is_file():
        raise DatasetError(f"{where}: image file not found: {image}")
    mask = _field(row, "mask", dict, where, required=False)
    if mask is not None and not isinstance(mask.get("path"), str):
        raise DatasetError(f"{where}: field 'mask' needs a 'path' string, got {mask!r}")
    known = {"id", "image", "question", "answer", "question_type", "evidence_boxes", "mask", "scorer"}
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
        extra={k: v for k, v in row.items() if k not in known},
    )


def read_dataset(path: str | Path, limit: int | None = None) -> list[Sample]:
    """Read a JSONL data set; any malformed line fails with its line number."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.jsonl"
    if not path.is_file():
        raise DatasetError(f"data set not found: {path}")
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
        open_rgb(sample.image_path)


def sample_to_row(sample: Sample, root: Path) -> dict:
    row = {"id": sample.id, "image": os.path.relpath(sample.image_path, root), "question": sample.question}
    if sample.answer is not None:
        row["answer"] = sample.answer
    if sample.question_type is not None:
        row["question_type"] = sample.question_type
    if sample.evidence_boxes:
        row["evidence_boxes"] = [list(b) for b in sample.evidence_boxes]
    if sample.mask_path is not None:
        row["mask"] = {"path": os.path.relpath(sample.mask_path, root), "values": list(sample.mask_values)}
    if sample.scorer != "exact":
        row["scorer"] = sample.scorer
    return row | sample.extra


def write_dataset(samples: Iterable[Sample], path: str | Path) -> Path:
    path = Path(path)
    lines = [json.dumps(sample_to_row(s, path.parent)) for s in samples]
    write_atomically(path, "\n".join(lines) + "\n")
    return path
