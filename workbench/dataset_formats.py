"""The stored forms a data set comes in, told apart by what is on disk, and read through the
``datasets`` library so that a large split costs little memory.

* ``jsonl``    the workbench's own format (``workbench.samples``): a ``.jsonl`` file, or a folder
               holding ``samples.jsonl``.
* ``parquet``  a ``.parquet`` file, or a folder of parquet shards (searched recursively), as the
               hub repositories lmms-eval reads store them: images as a struct of ``bytes`` and
               ``path`` (the ``datasets`` Image feature).
* ``arrow``    a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``*.arrow``), or by
               ``DatasetDict.save_to_disk`` with one split (``dataset_dict.json``).
* ``coco``     a COCO-style annotation ``.json`` (``images`` + ``annotations`` with ``bbox``), its
               image files in the same folder or in ``images/`` beside it; or a folder holding one.

Parquet and arrow are memory-mapped: only the columns a benchmark maps are read to build samples,
and an image is decoded when a sample asks for it (``load_image``), from its row alone. Parquet is
converted once into the ``datasets`` cache (``HF_DATASETS_CACHE``), as ``load_dataset`` does.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workbench.errors import UserError
from workbench.images import ImageError, to_rgb

EXPECTED = ("a JSONL file (or a folder with samples.jsonl), a .parquet file or a folder of parquet shards, "
            "a folder written by datasets' save_to_disk, or a COCO-style annotation .json with its images")


class DatasetFormatError(UserError, ValueError):
    """A path that is none of the stored forms the workbench reads."""


@dataclass(frozen=True)
class StoredForm:
    format: str  # "jsonl", "parquet", "arrow" or "coco"
    path: Path  # what the user named, resolved
    files: tuple[Path, ...]  # the files that hold the data (hashed by the sweep's fingerprint)


def _coco_json(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return '"images"' in head or '"annotations"' in head


def detect(path: str | Path) -> StoredForm:
    """Which stored form ``path`` is; ``DatasetFormatError`` (one line) when it is none of them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetFormatError(f"data set not found: {path} (expected {EXPECTED})")
    path = path.resolve()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return StoredForm("jsonl", path, (path,))
        if suffix == ".parquet":
            return StoredForm("parquet", path, (path,))
        if suffix == ".json" and _coco_json(path):
            return StoredForm("coco", path, (path,))
        raise DatasetFormatError(f"{path}: not a data set the workbench reads; expected {EXPECTED}")
    if (path / "samples.jsonl").is_file():
        return StoredForm("jsonl", path / "samples.jsonl", (path / "samples.jsonl",))
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return StoredForm("arrow", path, tuple(sorted(path.rglob("*.arrow"))))
    shards = tuple(sorted(p for p in path.rglob("*.parquet") if p.is_file()))
    if shards:
        return StoredForm("parquet", path, shards)
    annotations = [p for p in sorted(path.glob("*.json")) if _coco_json(p)]
    if len(annotations) == 1:
        return StoredForm("coco", annotations[0], (annotations[0],))
    if len(annotations) > 1:
        raise DatasetFormatError(f"{path}: several annotation files ({', '.join(p.name for p in annotations)}); "
                                 "name the one to read")
    raise DatasetFormatError(f"{path}: no data set in this folder; expected {EXPECTED}")


# --- parquet and arrow: through ``datasets`` ----------------------------------------------------------

# Converting parquet into the cache leaves the converter's buffers in the process (measured: about
# 1 MiB per MiB of parquet, half of it kept after the pool's release); above this size the
# conversion runs in a child process, so a sweep's memory stays flat in the size of the split.
CONVERT_APART_BYTES = 64 * 2**20


def _convert(files: list[str]) -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.load_dataset("parquet", data_files=files, split="train")


def _convert_in_child(files: list[str]) -> None:
    """Fill the ``datasets`` cache from another process; a failure there is left for the reading
    process to report (it runs the same conversion and raises the library's error)."""
    import subprocess
    import sys

    code = "import json, sys; from workbench.dataset_formats import _convert; _convert(json.loads(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, json.dumps(files)], capture_output=True,
                   cwd=Path(__file__).resolve().parents[1], check=False)


def open_table(format: str, path: str):
    """The memory-mapped ``datasets.Dataset`` of a parquet or arrow stored form, with every image
    column left undecoded (cached per process while its files are unchanged: a sample's image
    re-opens nothing)."""
    form = detect(path)
    state = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in form.files)
    return _open_table(format, path, state)


@functools.lru_cache(maxsize=4)
def _open_table(format: str, path: str, state: tuple):
    import datasets

    datasets.disable_progress_bars()  # one bar per shard would bury the workbench's own
    form = detect(path)
    try:
        if format == "parquet":
            files = [str(f) for f in form.files]
            if sum(f.stat().st_size for f in form.files) > CONVERT_APART_BYTES:
                _convert_in_child(files)
            table = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            table = datasets.load_from_disk(str(form.path))
    except Exception as e:  # datasets raises many types for a broken file; all are the user's file
        raise DatasetFormatError(f"{form.path}: cannot read it as {format} ({type(e).__name__}: {e})") from None
    if isinstance(table, datasets.DatasetDict):
        if len(table) != 1:
            raise DatasetFormatError(f"{form.path}: a DatasetDict with splits {', '.join(table)}; name one split's "
                                     f"folder, e.g. {form.path / next(iter(table))}")
        table = next(iter(table.values()))
    for name, feature in table.features.items():
        if isinstance(feature, datasets.Image):
            table = table.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.List) and isinstance(feature.feature, datasets.Image):
            table = table.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return table


@dataclass(frozen=True)
class ImageRef:
    """Where a sample's image is stored inside a table: row, column and, for a column holding a
    list of images (SEED-Bench), the item."""

    format: str
    source: str
    row: int
    column: str
    item: int | None = None

    def where(self) -> str:
        return f"{self.source} row {self.row} column {self.column!r}" + ("" if self.item is None else f"[{self.item}]")


def image_bytes(value, ref: ImageRef) -> bytes | Path:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):  # an image stored by path, relative to the data
            path = Path(value["path"])
            return path if path.is_absolute() else Path(ref.source).parent / path
    raise ImageError(f"{ref.where()}: no image stored there")


def load_image(ref: ImageRef) -> Image.Image:
    """Decode one stored image (only its row is read) as 8-bit RGB; ``ImageError`` names the row."""
    value = open_table(ref.format, ref.source)[ref.row][ref.column]
    if ref.item is not None:
        if not isinstance(value, list) or ref.item >= len(value):
            raise ImageError(f"{ref.where()}: no image stored there")
        value = value[ref.item]
    data = image_bytes(value, ref)
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            return to_rgb(image, name=ref.where())
    except FileNotFoundError:
        raise ImageError(f"{ref.where()}: image file not found: {data}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{ref.where()}: cannot decode image ({e})") from None


def iter_rows(table, columns: list[str], batch_size: int = 1024):
    """(row index, row dict of ``columns``) over a table, reading only those columns."""
    narrow = table.select_columns(columns)
    index = 0
    for batch in narrow.iter(batch_size=batch_size):
        for i in range(len(batch[columns[0]])):
            yield index, {c: batch[c][i] for c in columns}
            index += 1


# --- COCO-style annotation JSON -----------------------------------------------------------------------

def read_coco(path: Path) -> tuple[list[dict], Path]:
    """One row per annotation: the annotation's own keys plus ``file_name``, ``width``, ``height`` of
    its image; and the folder its images are in."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetFormatError(f"{path}: not a readable annotation JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(
            data.get("annotations"), list):
        raise DatasetFormatError(f"{path}: a COCO-style annotation JSON needs lists 'images' and 'annotations'")
    images = {}
    for image in data["images"]:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DatasetFormatError(f"{path}: every entry of 'images' needs 'id' and 'file_name', got {image!r}")
        images[image["id"]] = image
    rows = []
    for number, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            raise DatasetFormatError(f"{path}: annotation {number} names no image of 'images' "
                                     f"(image_id {ann.get('image_id') if isinstance(ann, dict) else ann!r})")
        image = images[ann["image_id"]]
        rows.append({**ann, "file_name": image["file_name"], "width": image.get("width"),
                     "height": image.get("height")})
    folder = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    return rows, folder


def data_files(form: StoredForm) -> list[Path]:
    """Every file whose content is the data set: the stored files, and for a COCO-style form also
    the image files its annotations name (what a sweep's fingerprint hashes)."""
    if form.format != "coco":
        return list(form.files)
    records, folder = read_coco(form.path)
    return list(form.files) + sorted({folder / r["file_name"] for r in records})
