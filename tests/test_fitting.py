"""Batches that fit: on running out of device memory a batch is halved for good, and nothing is lost."""

from __future__ import annotations

import os

import pytest
import torch

from workbench.fitting import DoesNotFit, Fitting


def fits_up_to(limit: int, seen: list):
    """Work that squares its items and runs out of memory on a batch above ``limit``."""
    def work(chunk):
        seen.append(len(chunk))
        if len(chunk) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return [x * x for x in chunk]
    return work


def test_a_batch_that_runs_out_of_memory_is_halved_for_good_and_nothing_is_lost():
    seen, lines = [], []
    fitting = Fitting(8, "sweep", notice=lines.append)
    chunks = list(fitting.run(fits_up_to(3, seen), list(range(20))))
    assert [x for chunk in chunks for x in chunk] == [x * x for x in range(20)]
    # 8 and 4 fail once each; from then on batches of 2, never the failed sizes again
    assert seen == [8, 4] + [2] * 10 and fitting.size == 2
    assert lines == ["sweep: a batch of 8 ran out of device memory; going on in batches of 4",
                     "sweep: a batch of 4 ran out of device memory; going on in batches of 2"]


def test_a_whole_list_at_once_while_it_fits():
    seen = []
    fitting = Fitting(None, "sweep", notice=lambda line: None)
    assert list(fitting.run(fits_up_to(10, seen), [1, 2, 3])) == [[1, 4, 9]]
    assert list(fitting.run(fits_up_to(1, seen), [1, 2, 3])) == [[1], [4], [9]]
    assert seen == [3, 3, 1, 1, 1] and fitting.size == 1


def test_an_item_that_does_not_fit_alone_is_one_line_and_other_errors_pass_through():
    fitting = Fitting(4, "sweep", label=lambda x: f"sample {x}", notice=lambda line: None)
    with pytest.raises(DoesNotFit) as error:
        list(fitting.run(fits_up_to(0, []), ["a", "b"]))
    assert str(error.value) == ("sample a alone runs out of device memory (CUDA out of memory. Tried to "
                                "allocate 2.00 GiB); load the model in a smaller --dtype (bfloat16) or spread it "
                                "over more GPUs (--device-map)")

    def broken(chunk):
        raise ValueError("not about memory")
    with pytest.raises(ValueError, match="not about memory"):
        list(Fitting(4, "sweep").run(broken, [1, 2]))


def _oom_above(limit: int, real, seen: list):
    def run(adapter, tasks):
        seen.append(len(tasks))
        if len(tasks) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(adapter, tasks)
    return run


def test_a_sweep_whose_batches_run_out_of_memory_writes_every_row_once(tmp_path, monkeypatch, capsys):
    from tests.test_sweep import DATASET, samples, shipped
    from workbench import sweep
    from workbench.sweep import MethodSpec, run_sweep

    seen = []
    methods, budgets = (MethodSpec("fastv"),), (0.25,)
    one = run_sweep(shipped(), samples(), DATASET, methods, budgets, tmp_path / "one", progress=False).table
    monkeypatch.setattr(sweep, "run_tasks", _oom_above(1, sweep.run_tasks, seen))
    fitted = run_sweep(shipped(), samples(), DATASET, methods, budgets, tmp_path / "two", progress=False,
                       batch_size=2).table
    assert seen == [2, 1, 1, 1]
    key = ["sample_id", "method", "budget"]
    assert fitted.select(key).sort(key).rows() == one.select(key).sort(key).rows()
    assert fitted.select(key).is_duplicated().sum() == 0
    assert "sweep: a batch of 2 ran out of device memory; going on in batches of 1" in capsys.readouterr().err


def test_a_ray_worker_halves_its_batches_too(monkeypatch):
    from tests.test_sweep import samples, shipped
    from workbench import sweep
    from workbench.distributed import SweepWorker
    from workbench.samples import sample_to_row
    from workbench.sweep import MethodSpec, SweepTask

    seen = []
    monkeypatch.setattr(sweep, "run_tasks", _oom_above(2, sweep.run_tasks, seen))
    worker = SweepWorker(lambda device: shipped(), "cpu", os.getcwd())
    tasks = [SweepTask(sample_to_row(s, os.getcwd()), os.getcwd(), (MethodSpec("fastv"),), (0.25,)).to_json()
             for s in samples()]
    rows = worker.run(tasks)
    assert [r[0]["sample_id"] for r in rows] == [s.id for s in samples()]
    assert seen == [3, 1, 1, 1]  # 3 // 2 = 1: the next call starts at batches of one
    worker.run(tasks[:2])
    assert seen[4:] == [1, 1]


def test_answering_a_data_set_halves_its_batches_too(monkeypatch, capsys):
    from tests.test_sweep import samples, shipped
    from workbench.evaluate import answer_dataset

    adapter = shipped()
    expected = answer_dataset(adapter, list(samples()), batch_size=1, progress=False)
    real, seen = adapter.answer_batch, []

    def answer_batch(images, questions, max_new_tokens):
        seen.append(len(images))
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return real(images, questions, max_new_tokens)
    monkeypatch.setattr(adapter, "answer_batch", answer_batch)
    answers = answer_dataset(adapter, list(samples()), batch_size=4, progress=False)
    assert answers.equals(expected) and seen == [3, 1, 1, 1]
    assert "answering: a batch of 3 ran out of device memory; going on in batches of 1" in capsys.readouterr().err
