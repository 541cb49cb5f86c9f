"""Sweeps on Ray: each worker (a Ray actor) loads the model once and runs whole ``SweepTask``s.

The driver never holds the model. It asks a worker which model it loaded (name, weights
fingerprint) and how many visual tokens a sample gets (the budget checks), then hands
``workbench.sweep.sweep_with`` a ``Runner`` whose tasks go to the workers as JSON, ``batch_size``
samples to a call (run as one batch, ``workbench.sweep.run_tasks``), two calls in flight per worker
so none waits on the driver. Rows come back as each task finishes; the driver alone
writes the sweep folder (journal, table, lock), so an interrupted sweep resumes exactly as a
single-process one does: tasks in flight are lost and run again, finished ones are never repeated.

Placement: ``device`` "cuda" (or "cuda:N") gives each worker one GPU as a Ray resource and loads the
model on it; "cpu" gives each worker an equal share of the cluster's CPUs. Workers start in the
driver's working directory where it exists, so relative paths (data set, checkpoint) read the same
files; on a cluster of several machines they must be reachable at the same paths on every node.

Ray is an optional extra (``pip install -e '.[ray]'``); ``require_ray`` says so in one line.
"""

from __future__ import annotations

import functools
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from workbench.errors import UserError
from workbench.models.base import ModelAdapter
from workbench.pruning.budget import Budget
from workbench.samples import Sample
from workbench.sweep import MethodSpec, Runner, SweepResult, SweepTask, sweep_with, task_fitting

IN_FLIGHT = 2  # tasks queued per worker: the next one is there when the last finishes

Loader = Callable[[str], ModelAdapter]  # device -> the loaded model; runs on each worker


class RayNotAvailable(UserError, ImportError):
    """``--ray`` without Ray installed."""


class DistributedError(UserError, RuntimeError):
    """A Ray cluster that cannot run the sweep as asked, or a worker lost mid-sweep."""


def require_ray():
    """The ``ray`` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayNotAvailable("--ray needs Ray, an optional extra: install it with "
                              "`pip install -e '.[ray]'` (or run the sweep without --ray)") from None
    return ray


@dataclass(frozen=True)
class Placement:
    """What each of ``workers`` workers asks Ray for, and where it puts the model."""

    workers: int
    num_cpus: int
    num_gpus: int
    device: str


def placement(resources: dict, device: str, workers: int | None) -> Placement:
    """Workers for a cluster with ``resources`` (``ray.cluster_resources()``): one per GPU on
    "cuda", one per CPU on "cpu" unless ``workers`` says how many; refused when the cluster cannot
    hold them all (they would wait for resources forever)."""
    cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
    if device.startswith("cuda"):
        if gpus == 0:
            raise DistributedError(f"--device {device} asks for GPU workers, but the Ray cluster has no GPU "
                                   "(use --device cpu, or a cluster with GPUs)")
        workers = workers or gpus
        if workers > gpus:
            raise DistributedError(f"{workers} GPU workers asked for, but the Ray cluster has {gpus} GPU(s)")
        # Each worker sees only its own GPU (Ray sets CUDA_VISIBLE_DEVICES), so it is "cuda" there.
        return Placement(workers, max(1, cpus // workers) if cpus >= workers else 0, 1, "cuda")
    workers = workers or max(1, cpus)
    if workers > max(cpus, 1):
        raise DistributedError(f"{workers} workers asked for, but the Ray cluster has {cpus} CPU(s)")
    return Placement(workers, max(1, cpus // workers), 0, device)


class SweepWorker:
    """A Ray actor's state: the model, loaded once. A failed load is kept and raised by ``ready``,
    since Ray reports a constructor's exception without its type or message."""

    def __init__(self, load: Loader, device: str, cwd: str):
        if os.path.isdir(cwd):
            os.chdir(cwd)
        from workbench.cli import single_threaded_blas

        single_threaded_blas()  # as the command line does
        self.adapter, self.error = None, None
        self.fitting = task_fitting(None)  # each call's tasks as one batch while they fit
        try:
            self.adapter = load(device)
        except Exception as e:  # noqa: BLE001  (re-raised by ``ready`` on the driver's call)
            self.error = e

    def ready(self) -> tuple[str, str]:
        """The loaded model's name and weights fingerprint."""
        if self.error is not None:
            raise self.error
        return self.adapter.name, self.adapter.fingerprint

    def visual_tokens(self, sample: Sample) -> int | None:
        from workbench.images import ImageError

        try:
            return self.adapter.prepare(sample.load_image(), sample.question).layout.n_tokens
        except ImageError:
            return None

    def run(self, tasks: list[str]) -> list[list[dict]]:
        """Each task's rows, the tasks run as one batch (in smaller ones, for good, once a batch
        runs out of device memory)."""
        from workbench.sweep import run_tasks

        work = functools.partial(run_tasks, self.adapter)
        return [rows for chunk in self.fitting.run(work, [SweepTask.from_json(task) for task in tasks]) for rows in chunk]


def _get(ray, refs):
    """``ray.get``, with a worker's exception raised as itself (a user error stays one line) and a
    lost worker as a ``DistributedError``."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, BaseException):
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        raise DistributedError("a Ray worker died mid-sweep (out of memory, or its node was lost): "
                               f"{str(e).splitlines()[0]}; every finished sample is saved: run the same command "
                               "to resume") from None


def _rows(ray, workers: list, tasks: Sequence[SweepTask], batch_size: int = 1) -> Iterator[list[dict]]:
    """Each task's rows as its batch finishes, ``IN_FLIGHT`` batches queued on every worker."""
    queue, pending = (tasks[start:start + batch_size] for start in range(0, len(tasks), batch_size)), {}

    def submit(worker) -> None:
        batch = next(queue, None)
        if batch is not None:
            pending[worker.run.remote([task.to_json() for task in batch])] = worker

    for worker in workers:
        for _ in range(IN_FLIGHT):
            submit(worker)
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        worker = pending.pop(done)
        submit(worker)
        yield from _get(ray, done)


def check_address(address: str | None) -> None:
    """``DistributedError`` in one line when ``address`` (HOST:PORT or ray://HOST:PORT) is no address
    or nothing listens there: Ray itself would retry for 20 s and end in a traceback."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--ray {address}: not a cluster address (HOST:PORT, ray://HOST:PORT or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise DistributedError(f"--ray {address}: nothing answers there ({e.strerror or e}); start a cluster "
                               "with `ray start --head` and pass the address it prints, or give --ray no "
                               "address for a new local cluster") from None


@contextmanager
def _cluster(ray, address: str | None):
    """Connected to the cluster at ``address`` (a new local one when None), or to the one this
    process is already connected to; disconnected (a local cluster stopped) on leaving, unless it
    was connected before."""
    check_address(address)
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError) as e:  # something answers at the address, but no Ray cluster
        where = f"the Ray cluster at {address}" if address else "a new local Ray cluster"
        raise DistributedError(f"--ray: could not connect to {where}: {str(e).splitlines()[0]}") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def ray_runner(load: Loader, device: str = "cpu", address: str | None = None, workers: int | None = None,
               batch_size: int = 1) -> Iterator[Runner]:
    """A ``Runner`` whose tasks run on Ray workers, each holding the model loaded by ``load``; the
    workers are stopped on leaving."""
    ray = require_ray()
    with _cluster(ray, address):
        place = placement(ray.cluster_resources(), device, workers)
        remote = ray.remote(SweepWorker).options(num_cpus=place.num_cpus, num_gpus=place.num_gpus)
        actors = [remote.remote(load, place.device, os.getcwd()) for _ in range(place.workers)]
        try:
            (model, fingerprint), *_ = _get(ray, [actor.ready.remote() for actor in actors])
            yield Runner(model, fingerprint, lambda sample: _get(ray, actors[0].visual_tokens.remote(sample)),
                         lambda tasks: _rows(ray, actors, tasks, batch_size))
        finally:
            for actor in actors:
                ray.kill(actor)


def run_on_ray(load: Loader, samples: Sequence[Sample], dataset: str, methods: Sequence[MethodSpec],
               budgets: Sequence[Budget], folder: str | Path, max_new_tokens: int = 8, progress: bool = True,
               *, device: str = "cpu", address: str | None = None, workers: int | None = None,
               batch_size: int = 1) -> SweepResult:
    """``workbench.sweep.run_sweep`` with the tasks on Ray workers, ``batch_size`` samples per batch
    on each: the same folder, the same rows."""
    with ray_runner(load, device, address, workers, batch_size) as runner:
        return sweep_with(runner, samples, dataset, methods, budgets, folder, max_new_tokens, progress)
