"""Sweeps survive interruption and concurrency: one writer per folder, readers that never write, and
a resume that refuses to mix rows of another data set or another version of a method."""

from __future__ import annotations

import functools
import json
import os
import shutil
import stat

import polars as pl
import pytest

from workbench.cli import main
from workbench.folder_lock import FolderLocked, exclusive
from workbench.models.loading import load
from workbench.samples import read_dataset
from workbench.sweep import CONTROLS, MethodSpec, read_sweep, run_sweep
from workbench.sweep_identity import SweepIdentityError

DATASET = "data/eval/samples.jsonl"
RANDOM = (MethodSpec("random"),)


@functools.lru_cache(maxsize=None)
def shipped():
    return load()


def copied_dataset(folder, n: int = 2):
    """The first ``n`` eval samples, each with its own copy of its image, in a folder the test may change."""
    samples = read_dataset(DATASET, limit=n)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (line, sample) in enumerate(zip(open(DATASET), samples)):
        row = json.loads(line)
        shutil.copy(sample.image_path, folder / "images" / f"{i}.png")
        row["image"] = f"images/{i}.png"
        row.pop("mask", None)
        rows.append(row)
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sweep(dataset, folder, methods=RANDOM, budgets=(0.5,)):
    """One sample of ``dataset`` at most, to keep the tests fast."""
    return run_sweep(shipped(), read_dataset(dataset, limit=1), str(dataset), methods, budgets, folder,
                     progress=False)


# --- 6. one writer per folder; readers never write ----------------------------------------------------

def test_a_second_writer_is_refused_with_the_holders_name(tmp_path, capsys):
    folder = tmp_path / "s"
    folder.mkdir()
    with exclusive(folder):
        with pytest.raises(FolderLocked, match=f"pid {os.getpid()} on "):
            run_sweep(shipped(), read_dataset(DATASET, limit=1), DATASET, RANDOM, (0.5,), folder, progress=False)
        assert main(["sweep", "--limit", "1", "--methods", "random", "--out", str(folder)]) == 2
        assert f"is being written by pid {os.getpid()}" in capsys.readouterr().err
    run_sweep(shipped(), read_dataset(DATASET, limit=1), DATASET, RANDOM, (0.5,), folder, progress=False)


def test_reading_a_sweep_never_changes_its_journal(tmp_path):
    folder = tmp_path / "s"
    sweep(DATASET, folder)
    journal = folder / "rows.jsonl"
    with journal.open("a") as f:
        f.write('{"sample_id": "torn')  # a writer mid-append, or killed there
    before = journal.read_bytes()
    assert read_sweep(folder).height == 2 + len(CONTROLS)
    assert journal.read_bytes() == before


# --- 7. a sweep's identity: the data set's content and each method's version --------------------------

def test_a_different_data_set_under_the_same_path_is_refused(tmp_path):
    dataset = copied_dataset(tmp_path / "data")
    folder = tmp_path / "s"
    sweep(dataset, folder)
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    rows[0]["answer"] = "something else"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = (folder / "rows.jsonl").read_bytes()
    with pytest.raises(SweepIdentityError, match="other content.*start fresh"):
        sweep(dataset, folder)
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows[:1]) + "\n")  # same text, one more byte
    with pytest.raises(SweepIdentityError):
        sweep(dataset, folder)
    assert (folder / "rows.jsonl").read_bytes() == before


def test_an_image_changed_under_the_same_name_is_another_data_set(tmp_path):
    dataset = copied_dataset(tmp_path / "data")
    folder = tmp_path / "s"
    sweep(dataset, folder)
    image = next((tmp_path / "data" / "images").iterdir())
    shutil.copy("data/eval/images/scene-00009.png", image)
    with pytest.raises(SweepIdentityError, match="other content"):
        sweep(dataset, folder)


def test_a_method_with_other_parameters_or_code_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "s"
    sweep(DATASET, folder)
    manifest = json.loads((folder / "sweep.json").read_text())
    assert manifest["method_versions"]["random"]["params"] == {"position": "reindex", "seed": 0}
    assert len(manifest["method_versions"]["random"]["code"]) == 16
    (folder / "sweep.json").write_text(json.dumps(manifest | {"method_versions": {
        "random": {"params": {"seed": 1}, "code": manifest["method_versions"]["random"]["code"]}}}))
    with pytest.raises(SweepIdentityError, match="random were made with parameters"):
        sweep(DATASET, folder)
    (folder / "sweep.json").write_text(json.dumps(manifest))
    monkeypatch.setattr("workbench.sweep_identity.code_version", lambda method: "edited-since")
    with pytest.raises(SweepIdentityError, match="other code of the method .*start fresh"):
        sweep(DATASET, folder)
    monkeypatch.undo()
    # A method new to the folder adds its rows; the old ones stay.
    assert sweep(DATASET, folder, methods=RANDOM + (MethodSpec("uniform_grid"),)).new_rows == 1


# --- 8. an undecodable image is an error row, and the sweep goes on ------------------------------------

def test_an_undecodable_image_is_an_error_row_and_the_sweep_goes_on(tmp_path):
    dataset = copied_dataset(tmp_path / "data", n=3)
    broken = sorted((tmp_path / "data" / "images").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated PNG
    table = run_sweep(shipped(), read_dataset(dataset), str(dataset), RANDOM, (0.5,), tmp_path / "s",
                      progress=False).table
    errors = table.filter(pl.col("status") == "error")
    per_sample = 2 + len(CONTROLS)  # the unpruned run, the controls, random at one budget
    assert errors.height == per_sample and errors["message"].str.contains(broken.name).all()
    assert (table.filter(pl.col("status") == "ok").height == 2 * per_sample)


# --- 4, 11. results follow the umask; the answer columns say whose answer --------------------------------

def test_sweep_results_follow_the_umask_and_name_both_answers(tmp_path):
    old = os.umask(0o022)
    try:
        table = sweep(DATASET, tmp_path / "s").table
    finally:
        os.umask(old)
    for name in ("sweep.json", "results.parquet"):
        assert stat.S_IMODE((tmp_path / "s" / name).stat().st_mode) == 0o644
    assert {"gold_answer", "predicted_answer"} <= set(table.columns) and "answer" not in table.columns
    assert (table["gold_answer"] == read_dataset(DATASET, limit=1)[0].answer).all()


def test_a_journal_from_before_the_rename_still_reads(tmp_path):
    folder = tmp_path / "s"
    sweep(DATASET, folder)
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    old = [{("gold" if k == "gold_answer" else "answer" if k == "predicted_answer" else k): v for k, v in r.items()}
           for r in rows]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    table = read_sweep(folder)
    assert table["predicted_answer"].null_count() == 0 and table["gold_answer"].null_count() == 0


def test_evaluate_names_both_answers(tmp_path):
    out = tmp_path / "answers.parquet"
    assert main(["evaluate", "--limit", "2", "--no-blank", "--attention-samples", "0", "--out", str(out)]) == 0
    table = pl.read_parquet(out)
    assert {"gold_answer", "predicted_answer"} <= set(table.columns) and "answer" not in table.columns
    assert "prediction" not in table.columns


def test_the_sweep_command_names_a_sample_that_could_not_run(tmp_path, capsys):
    dataset = copied_dataset(tmp_path / "data", n=2)
    broken = tmp_path / "data" / "images" / "1.png"
    broken.write_bytes(broken.read_bytes()[:100])
    assert main(["sweep", "--dataset", str(dataset), "--methods", "random", "--budgets", "0.5",
                 "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert f"could not run ({broken}: cannot decode image" in out
