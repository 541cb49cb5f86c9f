"""``workbench sweep`` and ``workbench report`` end to end on stored benchmark files, with the
shipped model and with a saved tiny model of a real family (its answers are meaningless; the
pipeline must run and score them the benchmark's way)."""

import polars as pl

from tests import benchmark_files as B
from tests.models.test_cli_families import run_workbench
from tests.tiny_models import save_tiny
from workbench.cli import main
from workbench.scoring import score
from workbench.sweep import UNPRUNED, read_sweep

REPORT_TOML = ('methods = ["fastv", "random"]\nbudgets = [0.5]\ndiagnose_budget = 0.5\nanalysis_samples = 1\n'
               'diagnose_per_method = 1\n')


def test_sweep_and_report_on_stored_benchmarks_with_the_shipped_model(tmp_path, capsys):
    pope = B.build("pope", tmp_path)
    assert main(["sweep", "--dataset", str(pope), "--methods", "random", "--budgets", "0.5",
                 "--out", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    assert "POPE (object hallucination, yes/no)" in out and "yes_ratio" in out and "adversarial" in out
    rows = read_sweep(tmp_path / "sweep")
    unpruned = rows.filter(pl.col("method") == UNPRUNED).sort("sample_id")
    assert unpruned["sample_id"].to_list() == ["100", "101", "102", "103", "104"]
    assert unpruned["gold_answer"].to_list() == ["yes", "no", "yes", "no", "no"]
    # each answer scored by lmms-eval's POPE protocol, the one scorer the benchmark names
    for generation, gold, value in unpruned.select("predicted_answer", "gold_answer", "score").iter_rows():
        assert value == score("pope_lmms_eval", generation, [gold]).value

    mme = B.build("mme", tmp_path)
    (tmp_path / "report.toml").write_text(REPORT_TOML)
    assert main(["report", "--config", str(tmp_path / "report.toml"), "--dataset", str(mme),
                 "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "**Official benchmark metrics**: MME all/perception" in summary
    assert "## Official benchmark metrics" in summary and "perception" in summary
    assert "**The literature on this model** (1 samples" in summary and "FEATHER 0.807" in summary
    claims = pl.read_parquet(tmp_path / "report" / "tables" / "literature_claims.parquet")
    assert claims["measured"].drop_nulls().len() >= 7
    metrics = pl.read_parquet(tmp_path / "report" / "tables" / "benchmark_metrics.parquet")
    assert {"all/perception", "all/cognition", "existence/score"} <= set(metrics["metric"])


def test_sweep_and_report_on_a_stored_benchmark_with_a_saved_tiny_llava(tmp_path):
    checkpoint = save_tiny("llava", tmp_path / "checkpoint")
    vqav2 = B.build("vqav2", tmp_path, rows=B.vqav2_rows() + [B.vqav2_rows()[0] | {"question_id": 91}])
    (tmp_path / "report.toml").write_text(REPORT_TOML)
    done = run_workbench(
        ["sweep", "--model", checkpoint, "--dataset", str(vqav2), "--limit", "2", "--methods", "random",
         "--budgets", "0.5", "--out", str(tmp_path / "sweep")],
        ["report", "--config", str(tmp_path / "report.toml"), "--model", checkpoint, "--dataset", str(vqav2),
         "--benchmark", "vqav2", "--samples", "2", "--out", str(tmp_path / "report")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "VQAv2 (open-ended visual questions)" in done.stdout and "vqa_accuracy" in done.stdout
    rows = read_sweep(tmp_path / "sweep").filter(pl.col("status") == "ok")
    assert set(rows["sample_id"]) == {"90", "91"} and rows["score"].is_not_null().all()
    assert "**Official benchmark metrics**: VQAv2 vqa_accuracy" in (tmp_path / "report" / "summary.md").read_text()
