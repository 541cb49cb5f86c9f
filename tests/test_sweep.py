"""Sweeps: the rows they write, resuming, surviving an interruption, and the accuracy table."""

from __future__ import annotations

import functools
import json

import polars as pl
import pytest

from workbench.cli import main
from workbench.models.loading import load
from workbench.samples import read_dataset, sample_to_row
from workbench.sweep import (CONTROLS, MethodSpec, SweepError, SweepTask, UNPRUNED, accuracy_by_budget, read_sweep,
                             run_sweep, run_task)

DATASET = "data/eval/samples.jsonl"
METHODS = (MethodSpec("uniform_grid"), MethodSpec("random", (("seed", 3),)), MethodSpec("fastv"))
BUDGETS = (0.5, 16)


@functools.lru_cache(maxsize=None)
def shipped():
    return load()


@functools.lru_cache(maxsize=None)
def samples(n: int = 3):
    return tuple(read_dataset(DATASET, limit=n))


def test_rows_cover_every_method_and_budget_with_their_kept_counts(tmp_path):
    result = run_sweep(shipped(), samples()[:2], DATASET, METHODS, BUDGETS, tmp_path / "s", progress=False)
    table = result.table
    assert table.height == 2 * (1 + len(CONTROLS) + len(METHODS) * len(BUDGETS)) == result.new_rows
    assert set(table["method"]) == {UNPRUNED, *CONTROLS, "uniform_grid", "random(seed=3)", "fastv"}
    controls = table.filter(pl.col("method").is_in(CONTROLS))
    zero = controls.filter(pl.col("method") == "control:zero_tokens")
    assert zero["kept_count"].to_list() == [0, 0] and zero["budget"].to_list() == ["0", "0"]
    assert (zero["flops_ratio"] < 0.2).all()  # the text alone
    blank = controls.filter(pl.col("method") == "control:blank_image")
    assert blank["kept_count"].to_list() == [144, 144] and (blank["evidence_tokens"] > 0).all()
    ok = table.filter(~pl.col("method").is_in([UNPRUNED, *CONTROLS]))
    assert (ok["status"] == "ok").all()
    assert sorted(set(ok["budget_tokens"])) == [16, 72]  # 0.5 of 144 and a count of 16
    assert (ok["kept_count"] == ok["budget_tokens"]).all()
    full = table.filter(pl.col("method") == UNPRUNED)
    assert (full["flops_ratio"] == 1.0).all() and (full["kept_count"] == 144).all()
    assert (ok["flops_ratio"] < 1.0).all()
    # FastV prunes inside the decoder: the first layer still sees every visual token.
    fastv = ok.filter(pl.col("method") == "fastv")
    assert all(layers[0] == 144 and layers[-1] == kept
               for layers, kept in zip(fastv["visual_tokens_per_layer"], fastv["kept_count"]))
    stages = json.loads(fastv["stages"][0])
    assert stages[0]["where"] == 1 and len(stages[0]["kept"]) == fastv["kept_count"][0]
    recall = ok["evidence_recall"].drop_nulls()
    assert recall.len() and recall.is_between(0, 1).all()
    assert pl.read_parquet(tmp_path / "s" / "results.parquet").height == table.height


def test_resuming_skips_finished_rows_and_adds_new_ones(tmp_path):
    folder = tmp_path / "s"
    run_sweep(shipped(), samples()[:1], DATASET, METHODS[:1], BUDGETS, folder, progress=False)
    again = run_sweep(shipped(), samples()[:1], DATASET, METHODS[:1], BUDGETS, folder, progress=False)
    per_sample = 1 + len(CONTROLS)  # the unpruned run and the controls
    assert again.new_rows == 0 and again.table.height == per_sample + 2
    more = run_sweep(shipped(), samples()[:2], DATASET, METHODS[:2], BUDGETS, folder, progress=False)
    # the second sample in full, the first only for the new method
    assert more.new_rows == (per_sample + 4) + 2
    keys = more.table.select("sample_id", "method", "budget")
    assert keys.unique().height == keys.height == 2 * (per_sample + 4)


def test_an_interrupted_sweep_keeps_finished_samples_and_resumes(tmp_path, monkeypatch):
    import workbench.sweep as sweep

    folder, calls = tmp_path / "s", []
    real = sweep.run_tasks

    def flaky(adapter, tasks):
        calls.extend(task.sample["id"] for task in tasks)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(adapter, tasks)

    monkeypatch.setattr(sweep, "run_tasks", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(shipped(), samples()[:2], DATASET, METHODS[:1], BUDGETS, folder, progress=False)
    # the first sample's rows survive: the unpruned run, the controls, one method at two budgets
    assert pl.read_parquet(folder / "results.parquet").height == 1 + len(CONTROLS) + 2
    monkeypatch.setattr(sweep, "run_tasks", real)
    # A write torn by a kill leaves half a line: it is cut off, not read.
    with (folder / "rows.jsonl").open("a") as f:
        f.write('{"sample_id": "torn')
    resumed = run_sweep(shipped(), samples()[:2], DATASET, METHODS[:1], BUDGETS, folder, progress=False)
    per_sample = 1 + len(CONTROLS) + 2
    assert resumed.new_rows == per_sample and resumed.table.height == read_sweep(folder).height == 2 * per_sample


def test_a_task_is_plain_data_and_its_rows_depend_only_on_it():
    sample = samples()[0]
    task = SweepTask(sample_to_row(sample, __import__("pathlib").Path("data/eval")), "data/eval", METHODS, BUDGETS)
    assert SweepTask.from_json(task.to_json()) == task
    first, second = run_task(shipped(), task), run_task(shipped(), SweepTask.from_json(task.to_json()))
    volatile = {"wall_time_s", "record_time_s", "select_time_s", "prefill_time_s"}
    assert [{k: v for k, v in r.items() if k not in volatile} for r in first] == \
           [{k: v for k, v in r.items() if k not in volatile} for r in second]


def test_method_specs_parse_from_text_and_from_their_labels():
    spec = MethodSpec.parse("fastv:rows=text,layer=3")
    assert spec == MethodSpec("fastv", (("layer", 3), ("rows", "text")))
    assert MethodSpec.parse(spec.label) == spec and spec.label == "fastv(layer=3,rows=text)"
    assert MethodSpec.parse("random").label == "random"
    with pytest.raises(SweepError, match="not key=value"):
        MethodSpec.parse("fastv:layer")


def test_accuracy_table_puts_budgets_side_by_side_with_the_unpruned_model():
    rows = [{"sample_id": s, "method": m, "budget": b, "budget_tokens": t, "status": "ok", "correct": c}
            for s, m, b, t, c in [("1", UNPRUNED, "100%", 144, True), ("2", UNPRUNED, "100%", 144, False),
                                  ("1", "a", "50%", 72, True), ("2", "a", "50%", 72, True),
                                  ("1", "a", "10%", 14, False), ("2", "a", "10%", 14, True)]]
    table = accuracy_by_budget(pl.DataFrame(rows))
    assert table.columns == ["method", "50%", "10%", "unpruned"]
    assert table.row(0) == ("a", 1.0, 0.5, 0.5)


def test_folder_mismatches_and_bad_input_are_clear(tmp_path, capsys):
    folder = tmp_path / "s"
    run_sweep(shipped(), samples()[:1], DATASET, METHODS[:1], (0.5,), folder, progress=False)
    manifest = json.loads((folder / "sweep.json").read_text())
    (folder / "sweep.json").write_text(json.dumps(manifest | {"model": "another-model"}))
    with pytest.raises(SweepError, match="another-model"):
        run_sweep(shipped(), samples()[:1], DATASET, METHODS[:1], (0.5,), folder, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SweepError, match="not a sweep folder"):
        run_sweep(shipped(), samples()[:1], DATASET, METHODS[:1], (0.5,), tmp_path / "other", progress=False)
    assert main(["sweep", "--limit", "1", "--methods", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown pruning method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--budgets", "a lot", "--out", str(tmp_path / "y")])
    assert "budgets must be" in capsys.readouterr().err


def test_resuming_with_other_weights_under_the_same_name_is_refused(tmp_path):
    import copy

    import torch

    from workbench.models.registry import adapter_for

    adapter = shipped()
    folder = tmp_path / "s"
    run_sweep(adapter, samples()[:1], DATASET, METHODS[:1], (0.5,), folder, progress=False)
    retrained = copy.deepcopy(adapter.model)
    with torch.no_grad():
        next(retrained.parameters()).view(-1)[0] += 1.0
    other = adapter_for(retrained, adapter.processor, name=adapter.name)
    assert other.name == adapter.name and other.fingerprint != adapter.fingerprint
    assert adapter_for(copy.deepcopy(adapter.model), adapter.processor).fingerprint == adapter.fingerprint
    before = (folder / "rows.jsonl").read_text()
    with pytest.raises(SweepError, match="other weights .*would mix answers of two models"):
        run_sweep(other, samples()[:2], DATASET, METHODS[:1], (0.5,), folder, progress=False)
    assert (folder / "rows.jsonl").read_text() == before  # nothing appended
    manifest = json.loads((folder / "sweep.json").read_text())
    del manifest["weights"]  # a folder from before sweeps recorded their weights
    (folder / "sweep.json").write_text(json.dumps(manifest))
    with pytest.raises(SweepError, match="made before sweeps recorded one"):
        run_sweep(adapter, samples()[:1], DATASET, METHODS[:1], (0.5,), folder, progress=False)


def test_sweep_command_prints_the_accuracy_table(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["sweep", "--limit", "2", "--methods", "uniform_grid,random", "--budgets", "0.33,0.11",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "33%" in printed and "11%" in printed and "uniform_grid" in printed and "unpruned" in printed
    assert read_sweep(out).height == 2 * (1 + len(CONTROLS) + 4)


def test_samples_without_gold_answers_have_unknown_correctness(tmp_path):
    import shutil

    from workbench.samples import Sample, write_dataset

    source = samples()[0]
    shutil.copy(source.image_path, tmp_path / "img.png")
    dataset = write_dataset([Sample("q1", tmp_path / "img.png", source.question)], tmp_path / "s.jsonl")
    table = run_sweep(shipped(), read_dataset(dataset), str(dataset), METHODS[:1], (0.5,), tmp_path / "s",
                      progress=False).table
    assert table["correct"].null_count() == table.height == 2 + len(CONTROLS)
    assert table["gold_logprob"].null_count() == table["evidence_recall"].null_count() == table.height
    assert accuracy_by_budget(table).row(0)[1:] == (None, None, None, None)  # 50%, unpruned, the two controls


def test_a_batched_sweep_writes_the_rows_of_one_sample_at_a_time(tmp_path):
    """--batch-size: every run executes the batch's samples together (pre-LLM, in-LLM and
    callback methods, the controls); the rows are those of a sweep one sample at a time."""
    import dataclasses

    from workbench.samples import write_dataset

    # Questions of different lengths: the batch is padded, and masks must keep padding out.
    varied = [dataclasses.replace(s, question=s.question + " ?" * (3 * i)) for i, s in enumerate(samples())]
    dataset = str(write_dataset(varied, tmp_path / "varied.jsonl"))
    methods = METHODS + (MethodSpec("pyramiddrop"),)
    one = run_sweep(shipped(), read_dataset(dataset), dataset, methods, BUDGETS, tmp_path / "one", progress=False).table
    assert main(["sweep", "--dataset", dataset, "--methods", "uniform_grid;random:seed=3;fastv;pyramiddrop",
                 "--budgets", "0.5,16", "--batch-size", "2", "--out", str(tmp_path / "two")]) == 0
    two = read_sweep(tmp_path / "two")
    key = ["sample_id", "method", "budget"]
    one, two = one.sort(key), two.sort(key)
    assert one.height == two.height == 3 * (1 + len(CONTROLS) + len(methods) * len(BUDGETS))
    for column in ("status", "predicted_answer", "kept_count", "visual_tokens_per_layer", "correct", "loyal"):
        assert one[column].to_list() == two[column].to_list(), column
    kept = [[s["kept"] for s in json.loads(stages)] for stages in one["stages"]]
    assert kept == [[s["kept"] for s in json.loads(stages)] for stages in two["stages"]]
    for column in ("gold_logprob", "answer_logprob"):
        assert (one[column] - two[column]).abs().max() < 1e-4, column
