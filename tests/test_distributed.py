"""Sweeps on Ray: a local cluster of two CPU workers gives the single-process sweep's table, and an
interrupted distributed sweep resumes with no row lost or duplicated."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import polars as pl
import pytest
import ray

from workbench.cli import main
from workbench.distributed import DistributedError, placement, run_on_ray
from workbench.models.loading import load
from workbench.samples import read_dataset
from workbench.sweep import KEY, MethodSpec, read_sweep, run_sweep

DATASET = "data/eval/samples.jsonl"
METHODS = (MethodSpec("uniform_grid"), MethodSpec("fastv"))  # before the LLM, and inside it
BUDGETS = (0.5,)
TIMING = ("wall_time_s", "record_time_s", "select_time_s", "prefill_time_s")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster of two CPUs for the module (starting one takes ~10 s), shut down after."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The table of the same sweep run in this process."""
    samples = read_dataset(DATASET, limit=3)
    return run_sweep(load(), samples, DATASET, METHODS, BUDGETS, tmp_path_factory.mktemp("local") / "s",
                     progress=False).table


def comparable(table: pl.DataFrame) -> pl.DataFrame:
    """The rows in key order without the timing columns (which differ from run to run)."""
    return table.drop(TIMING).sort(KEY)


def workers_stopped(wait_s: float = 10.0) -> bool:
    """Whether the cluster's CPUs are all free again (Ray returns a killed worker's share soon after)."""
    import time

    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU", 0) < 2:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def load_counted(marks: str, device: str):
    """The shipped model, leaving a mark per load in ``marks`` (one file per worker process)."""
    with open(Path(marks) / str(os.getpid()), "a") as f:
        f.write("load\n")
    return load(device=device)


def test_the_command_on_ray_writes_the_single_process_table(cluster, single_process, tmp_path, capsys):
    folder = tmp_path / "s"
    assert main(["sweep", "--ray", "--limit", "3", "--methods", "uniform_grid,fastv", "--budgets", "0.5",
                 "--out", str(folder)]) == 0
    assert "15 new rows" in capsys.readouterr().out  # 3 samples x (unpruned, 2 controls, 2 methods)
    table = pl.read_parquet(folder / "results.parquet")
    assert comparable(table).equals(comparable(single_process))
    assert comparable(read_sweep(folder)).equals(comparable(single_process))
    assert workers_stopped()


def test_an_interrupted_distributed_sweep_resumes_with_no_row_lost_or_duplicated(cluster, single_process, tmp_path,
                                                                                 monkeypatch):
    import workbench.distributed as distributed

    folder, samples, real = tmp_path / "s", read_dataset(DATASET, limit=3), distributed._rows
    marks = tmp_path / "marks"
    marks.mkdir()
    load_marked = functools.partial(load_counted, str(marks))

    def interrupted(*args):
        rows = real(*args)
        yield next(rows)  # one sample finishes; the others are in flight on the workers
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed, "_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_on_ray(load_marked, samples, DATASET, METHODS, BUDGETS, folder, progress=False)
    first = read_sweep(folder)
    assert first["sample_id"].n_unique() == 1 and first.height == single_process.height // 3
    assert pl.read_parquet(folder / "results.parquet").height == first.height
    with (folder / "rows.jsonl").open("a") as f:
        f.write('{"sample_id": "torn')  # a kill mid-write leaves half a line
    monkeypatch.setattr(distributed, "_rows", real)
    # The rest as one batch of two samples on a worker: the same rows (batching keeps the answers;
    # its float rounding is tested where batching is).
    resumed = run_on_ray(load_marked, samples, DATASET, METHODS, BUDGETS, folder, progress=False, batch_size=2)
    assert resumed.new_rows == single_process.height - first.height
    assert resumed.table.select(KEY).is_unique().all()
    same = [*KEY, "status", "kept_count", "predicted_answer", "correct"]
    assert resumed.table.select(same).sort(KEY).equals(single_process.select(same).sort(KEY))
    assert read_sweep(folder).select(same).sort(KEY).equals(single_process.select(same).sort(KEY))
    # Two workers a run, each a process of its own that loaded the model once.
    assert sorted(p.read_text() for p in marks.iterdir()) == ["load\n"] * 4


def test_workers_take_gpus_as_resources_and_a_cluster_too_small_is_refused():
    gpu = placement({"CPU": 16.0, "GPU": 4.0}, "cuda:1", None)
    assert (gpu.workers, gpu.num_gpus, gpu.num_cpus, gpu.device) == (4, 1, 4, "cuda")
    cpu = placement({"CPU": 8.0}, "cpu", 2)
    assert (cpu.workers, cpu.num_gpus, cpu.num_cpus, cpu.device) == (2, 0, 4, "cpu")
    assert placement({"CPU": 2.0}, "cpu", None).workers == 2
    with pytest.raises(DistributedError, match="no GPU"):
        placement({"CPU": 8.0}, "cuda", None)
    with pytest.raises(DistributedError, match="3 workers asked for, but the Ray cluster has 2 CPU"):
        placement({"CPU": 2.0}, "cpu", 3)


def test_ray_missing_or_misused_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the .[ray] extra were not installed
    assert main(["sweep", "--ray", "--limit", "1", "--methods", "random", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ray needs Ray" in err and "pip install -e '.[ray]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()
    assert main(["sweep", "--ray-workers", "2", "--limit", "1", "--out", str(tmp_path / "s")]) == 2
    assert "add --ray" in capsys.readouterr().err


def test_a_cluster_address_where_nothing_answers_is_one_line_at_once(tmp_path, capsys):
    """Ray would retry such an address for 20 s and end in a traceback."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address, expected in ((f"127.0.0.1:{port}", "nothing answers there"), ("nohost", "not a cluster address")):
        assert main(["sweep", "--ray", address, "--limit", "1", "--methods", "random",
                     "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "s").exists()
