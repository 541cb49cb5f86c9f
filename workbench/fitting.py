"""Batches that fit the device: a list run in chunks, the chunk halved for good when memory runs out.

A batch size is a guess: the same ``--batch-size 16`` fits one model, data set and GPU and not
another, and a sweep's longest samples come late. Instead of losing the run (and of a whole
sweep retrying every later batch at the size that failed), ``Fitting`` halves its chunk size on
``torch.OutOfMemoryError``, frees the device's cache, says so in one line and goes on at the
smaller size; a single item that does not fit alone is one line too (``DoesNotFit``). Results do
not depend on the chunking: batched runs give the answers of one sample at a time.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from tqdm import tqdm

from workbench.errors import UserError

Item = TypeVar("Item")
Result = TypeVar("Result")


class DoesNotFit(UserError, MemoryError):
    """One item alone runs out of device memory."""


def _notice(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # above any progress bar, not through it


def free_device_memory() -> None:
    """Give the memory of a failed try back: its tensors are unreachable once its exception is
    handled; the allocator keeps their blocks until asked."""
    gc.collect()
    if torch.accelerator.is_available():
        torch.accelerator.empty_cache()


@dataclass
class Fitting:
    """Runs lists in chunks of at most ``size`` items (None: a whole list at once), ``size`` halved
    for the rest of the run each time a chunk runs out of device memory. ``what`` names the work
    in the lines it prints; ``label`` names an item."""

    size: int | None
    what: str
    label: Callable[[object], str] = str
    notice: Callable[[str], None] = field(default=_notice, repr=False)

    def run(self, work: Callable[[Sequence[Item]], list[Result]], items: Sequence[Item]) -> Iterator[list[Result]]:
        """``work``'s results on ``items``, one list per chunk, in order, each as its chunk finishes."""
        start = 0
        while start < len(items):
            chunk = items[start:] if self.size is None else items[start: start + self.size]
            results = self._attempt(work, chunk)
            if results is not None:
                start += len(chunk)
                yield results

    def _attempt(self, work, chunk: Sequence) -> list | None:
        """``work(chunk)``, or None when it ran out of memory (the size is halved then)."""
        try:
            return work(chunk)
        except torch.OutOfMemoryError as error:
            if len(chunk) == 1:
                raise DoesNotFit(f"{self.label(chunk[0])} alone runs out of device memory "
                                 f"({str(error).splitlines()[0]}); load the model in a smaller --dtype "
                                 "(bfloat16) or spread it over more GPUs (--device-map)") from None
        # Out of the handler: the failed try's tensors are unreachable now.
        free_device_memory()
        self.size = len(chunk) // 2
        self.notice(f"{self.what}: a batch of {len(chunk)} ran out of device memory; "
                    f"going on in batches of {self.size}")
        return None
