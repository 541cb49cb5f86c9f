"""What a sweep folder's rows were made from, so that a resume never mixes two experiments.

Besides the model and its weights (``workbench.sweep``), a sweep records the content hash of its
data set (the JSONL and every image and mask it names) and, per method label, the method's full
hyper-parameters (defaults included) and a code version: the hash of the source of the module that
defines the method (its ``select`` and the helpers beside it). A resume that finds any of them
changed is refused; the message says how to start fresh.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path

from workbench.errors import UserError


class SweepIdentityError(UserError, ValueError):
    """The folder's rows were made from something else than what this run would use."""


START_FRESH = "start fresh with another --out folder, or move this one aside"


def dataset_fingerprint(dataset: str | Path) -> str:
    """SHA-256 of the data-set file and of every file its rows name (images, masks), in order.
    Files that are missing or rows that do not parse are hashed as their text: the reader reports
    them, and a fingerprint must never fail."""
    path = Path(dataset)
    stored = _stored_digest(path)
    if stored is not None:
        return stored
    if path.is_dir():
        path = path / "samples.jsonl"
    digest = hashlib.sha256()
    data = path.read_bytes()
    digest.update(data)
    for line in data.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        mask = row.get("mask")
        for name in (row.get("image"), mask.get("path") if isinstance(mask, dict) else None):
            if isinstance(name, str):
                digest.update(_file_digest(path.parent / name))
    return digest.hexdigest()


def _stored_digest(path: Path) -> str | None:
    """For a parquet / arrow / COCO-style data set: the digest of every file that holds it
    (``dataset_formats.data_files``), each streamed, never read whole; None for a JSONL one."""
    from workbench.dataset_formats import DatasetFormatError, data_files, detect

    try:
        stored = detect(path)
        files = data_files(stored) if stored.format != "jsonl" else None
    except DatasetFormatError:
        return None  # the reader reports it
    if files is None:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        try:
            with file.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        except OSError:
            digest.update(b"missing")
    return digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return b"missing:" + str(path).encode()


PROJECT_PACKAGES = ("workbench", "analyses", "probes")


def code_version(method) -> str:
    """A short hash of the source of every project module ``method``'s class is built from: the one
    defining it and those of its base classes (a shared base such as the pre-LLM methods' decides
    behaviour too), and, for a composition, the same for each of its ``parts``."""
    methods = (method, *getattr(method, "parts", ()))
    modules = dict.fromkeys(cls.__module__ for m in methods for cls in type(m).__mro__
                            if cls.__module__.split(".")[0] in PROJECT_PACKAGES)
    source = "".join(inspect.getsource(sys.modules[name]) for name in modules)
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def method_version(method) -> dict:
    return {"params": json.loads(json.dumps(method.params(), sort_keys=True, default=list)),
            "code": code_version(method)}


def check_dataset(folder: Path, old: dict, fingerprint: str) -> None:
    recorded = old.get("dataset_sha256")
    if recorded != fingerprint:
        was = "its data set's content was not recorded (made before sweeps recorded it)" if recorded is None \
            else f"its data set {old.get('dataset')!r} had other content (sha256 {recorded[:12]}, now {fingerprint[:12]})"
        raise SweepIdentityError(f"{folder}: {was}; resuming would mix rows of two data sets: {START_FRESH}")


def check_methods(folder: Path, old: dict, versions: dict[str, dict]) -> None:
    """Each requested method label that the folder already holds must have the same parameters
    and code version."""
    recorded = old.get("method_versions")
    for label, version in versions.items():
        if label not in old.get("methods", []):
            continue  # a method new to this folder: nothing of it to mix
        before = (recorded or {}).get(label)
        if before is None:
            raise SweepIdentityError(f"{folder}: the version of {label} that made its rows was not recorded "
                                     f"(made before sweeps recorded it); {START_FRESH}")
        if before.get("params") != version["params"]:
            raise SweepIdentityError(f"{folder}: its rows of {label} were made with parameters {before.get('params')}, "
                                     f"now {version['params']}; {START_FRESH}")
        if before.get("code") != version["code"]:
            raise SweepIdentityError(f"{folder}: its rows of {label} were made by other code of the method "
                                     f"(version {before.get('code')}, now {version['code']}); {START_FRESH}")
