"""One writer per folder: an advisory lock on ``<folder>/.lock`` that names its holder.

The lock is ``flock`` on an open file, so the kernel releases it when the holder exits or is
killed: a crashed run never leaves a folder locked. The file's text (pid, host, start time) is
only there to name the holder in the message a second writer gets. Readers take no lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from workbench.errors import UserError

LOCK_NAME = ".lock"


class FolderLocked(UserError, RuntimeError):
    """Another process is writing this folder; the message names it."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


@contextmanager
def exclusive(folder: str | Path, what: str = "folder"):
    """Hold the folder's write lock for the ``with`` block; ``FolderLocked`` if another process
    holds it."""
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(f"{folder} is being written by {_holder(path)}; one writer per {what}: "
                               "wait for it to finish, or use another --out folder") from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
