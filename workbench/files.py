"""Writing files safely: atomic replaces that follow the umask, output paths checked before any
work, and sample ids turned into folder names that cannot leave their output folder."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from workbench.errors import UserError


class OutputError(UserError, ValueError):
    """An output path that cannot be written as asked; the message names it and says why."""


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_sibling(path: Path) -> str:
    """A new empty file beside ``path``, with the mode a plain ``open`` would give it: mkstemp
    makes it 0600, and the result would keep that mode after the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    return tmp


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    write_atomically_bytes(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_atomically_bytes(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the result over ``path`` (e.g. ``frame.write_parquet``)."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output(path: str | Path, what: str = "--out", folder: bool = True) -> Path:
    """Refuse, before any work, an output path that could not be written: one under a regular
    file, a folder where a file is wanted (or the reverse), or a place without write permission.
    Creates nothing."""
    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise OutputError(f"{what} {path}: is a file, not a folder")
        if not folder and path.is_dir():
            raise OutputError(f"{what} {path}: is a folder, not a file")
    existing = path if path.is_dir() else path.parent  # the folder the output goes into, or is
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {path}: cannot be created, {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: {existing} is not writable")
    return path


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def safe_name(sample_id: str) -> str:
    """A file-system name for a sample id: the id itself when it is a plain name, else the id with
    every other character replaced, plus a hash of the id so that two ids never share a name.
    Never empty, never ".", "..", a path or absolute."""
    text = str(sample_id)
    if SAFE_NAME.fullmatch(text) and ".." not in text:
        return text
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:60] or "sample"
    return f"{cleaned}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def child_folder(out: str | Path, sample_id: str) -> Path:
    """``out / safe_name(sample_id)``, checked to lie inside ``out``."""
    out = Path(out)
    child = out / safe_name(sample_id)
    if child.resolve().parent != out.resolve():  # never true by construction; kept as the guarantee
        raise OutputError(f"sample id {sample_id!r} would be written outside {out}")
    return child
