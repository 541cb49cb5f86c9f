"""``workbench report``: config handling and a small report built end to end on the shipped model."""

from __future__ import annotations

import polars as pl
import pytest

from workbench.cli import main
from workbench.report.config import ReportConfig, ReportConfigError, load_config
from workbench.report.figures import FigureSpec, to_png
from workbench.report.findings import positional_finding, redundancy_finding


def test_config_reads_toml_and_rejects_mistakes(tmp_path):
    good = tmp_path / "r.toml"
    good.write_text('samples = 5\nmethods = ["fastv", "random:seed=2"]\nbudgets = [0.5, 16]\ndiagnose_budget = 16\n')
    config = load_config(good, out=str(tmp_path / "o"))
    assert config.samples == 5 and config.methods == ("fastv", "random:seed=2") and config.budgets == (0.5, 16)
    assert config.out == str(tmp_path / "o")
    for text, message in [("sampels = 5\n", "unknown keys"), ("samples = 0\n", "positive"),
                          ("analyses = ['nope']\n", "unknown analyses"), ("samples = [\n", "not valid TOML"),
                          ("diagnose_budget = 0.5\n", "not one of the budgets")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ReportConfigError, match=message):
            load_config(bad)
    with pytest.raises(ReportConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_bad_config_on_the_command_line_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("sampels = 5\n")
    assert main(["report", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown keys ['sampels']" in err and "Traceback" not in err


def test_findings_are_computed_from_the_tables():
    mean = pl.DataFrame({"stack": ["llm"] * 3, "layer": [0, 1, 2], "metric": ["cos_mean"] * 3,
                         "value": [0.2, 0.4, 0.6], "n_samples": [4] * 3})
    trend = pl.DataFrame({"stack": ["llm"], "metric": ["cos_mean"], "spearman": [1.0]})
    text = redundancy_finding({"redundancy_mean": mean, "redundancy_trend": trend})
    assert "grows with depth" in text and "0.20 -> 0.40 -> 0.60" in text and "4 samples" in text
    position = pl.DataFrame({"method": ["fastv", "feather", "uniform_grid"], "budget": ["11%"] * 3,
                             "row_centroid": [0.8, 0.55, 0.5]})
    text = positional_finding({"kept_position": position}, "11%")
    assert text.startswith("**Positional bias** at 11%: 1 of 2 attention-based methods")
    assert "fastv 0.80" in text and "uniform_grid 0.50" in text


def test_png_figures_are_drawn_from_specs(tmp_path):
    data = pl.DataFrame({"m": ["a", "a", "b", "b"], "x": [1, 2, 1, 2], "y": [0.5, 0.6, 0.4, 0.3],
                         "lo": [0.4, 0.5, 0.3, 0.2], "hi": [0.6, 0.7, 0.5, 0.4]})
    for kind in ("line", "bar", "stacked_bar"):
        path = tmp_path / f"{kind}.png"
        to_png(FigureSpec(kind, kind, kind, data, "x", "y", series="m", low="lo", high="hi"), path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path = tmp_path / "heat.png"
    to_png(FigureSpec("h", "h", "heatmap", data, "m", "x", z="y"), path)
    assert path.stat().st_size > 1000


def test_a_small_report_builds_offline_and_resumes(tmp_path):
    from workbench.models.loading import load
    from workbench.report.write import build_report

    config = ReportConfig(samples=3, analysis_samples=1, methods=("fastv", "uniform_grid", "random"),
                          budgets=(0.5, 0.11), diagnose_budget=0.11, diagnose_per_method=1, out=str(tmp_path / "r"))
    adapter = load()
    folder = build_report(adapter, config, progress=False)
    page = (folder / "index.html").read_text()
    assert "Findings" in page and "plotly" in page.lower()
    assert 'src="http' not in page  # plotly.js is inlined: the page works offline
    summary = (folder / "summary.md").read_text()
    assert "**Accuracy** at 11%" in summary and "**Positional bias**" in summary and "**Redundancy**" in summary
    assert (folder / "figures" / "accuracy.png").stat().st_size > 1000
    tables = {p.stem for p in (folder / "tables").glob("*.parquet")}
    assert {"sweep", "accuracy", "kept_overlap", "redundancy", "positional_bias", "diagnoses",
            "failure_taxonomy"} <= tables
    sweep = pl.read_parquet(folder / "tables" / "sweep.parquet")
    assert sweep.height == 3 * (1 + 3 * 2)
    rows_before = (folder / "sweep" / "rows.jsonl").read_text()
    build_report(adapter, config, progress=False)
    assert (folder / "sweep" / "rows.jsonl").read_text() == rows_before  # the sweep resumed, nothing re-run
