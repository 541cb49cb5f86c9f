"""``workbench report``: config handling and a small report built end to end on the shipped model."""

from __future__ import annotations

import polars as pl
import pytest

from workbench.cli import main
from reports.config import ReportConfig, ReportConfigError, load_config
from reports.figures import FigureSpec, to_png
from reports.findings import accuracy_finding, failure_finding, positional_finding, redundancy_finding


def test_config_reads_toml_and_rejects_mistakes(tmp_path):
    good = tmp_path / "r.toml"
    good.write_text('samples = 5\nmethods = ["fastv", "random:seed=2"]\nbudgets = [0.5, 16]\ndiagnose_budget = 16\n')
    config = load_config(good, out=str(tmp_path / "o"))
    assert config.samples == 5 and config.methods == ("fastv", "random:seed=2") and config.budgets == (0.5, 16)
    assert config.out == str(tmp_path / "o")
    for text, message in [("sampels = 5\n", "unknown keys"), ("samples = 0\n", "positive"), ("batch_size = 0\n", "positive"),
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


def test_two_layers_or_a_flat_path_never_claim_a_depth_trend():
    two = pl.DataFrame({"stack": ["llm"] * 2, "layer": [0, 1], "metric": ["cos_mean"] * 2,
                        "value": [0.281, 0.279], "n_samples": [4] * 2})
    falls = pl.DataFrame({"stack": ["llm"], "metric": ["cos_mean"], "spearman": [-1.0]})  # always +-1 on two layers
    text = redundancy_finding({"redundancy_mean": two, "redundancy_trend": falls})
    assert "cannot show a depth trend over 2 layers" in text and "falls" not in text
    flat = pl.concat([two, pl.DataFrame({"stack": ["llm"], "layer": [2], "metric": ["cos_mean"], "value": [0.277],
                                         "n_samples": [4]})])
    text = redundancy_finding({"redundancy_mean": flat, "redundancy_trend": falls})
    assert "stays flat with depth" in text and "falls" not in text


def test_findings_are_computed_from_the_tables():
    mean = pl.DataFrame({"stack": ["llm"] * 3, "layer": [0, 1, 2], "metric": ["cos_mean"] * 3,
                         "value": [0.2, 0.4, 0.6], "n_samples": [4] * 3})
    trend = pl.DataFrame({"stack": ["llm"], "metric": ["cos_mean"], "spearman": [1.0]})
    text = redundancy_finding({"redundancy_mean": mean, "redundancy_trend": trend})
    assert "grows with depth" in text and "0.20 -> 0.40 -> 0.60" in text and "4 samples" in text
    # one swapped pair of three layers (rho 0.5) is not called a trend
    bumpy = redundancy_finding({"redundancy_mean": mean.with_columns(pl.Series("value", [0.4, 0.2, 0.6])),
                                "redundancy_trend": trend.with_columns(pl.lit(0.5).alias("spearman"))})
    assert "has no monotone trend with depth" in bumpy and "grows" not in bumpy
    falling = redundancy_finding({"redundancy_mean": mean, "redundancy_trend": trend.with_columns(
        pl.lit(-1.0).alias("spearman"))})
    assert "falls with depth" in falling
    position = pl.DataFrame({"method": ["fastv", "feather", "uniform_grid"], "budget": ["11%"] * 3,
                             "row_centroid": [0.8, 0.55, 0.5]})
    text = positional_finding({"kept_position": position}, "11%")
    assert text.startswith("**Positional bias** at 11%: 1 of 2 attention-based methods")
    assert "fastv 0.80" in text and "uniform_grid 0.50" in text and "other methods" not in text
    tower = pl.concat([position, pl.DataFrame({"method": ["fastervlm", "divprune", "random"], "budget": ["11%"] * 3,
                                               "row_centroid": [0.16, 0.52, 0.2]})])
    text = positional_finding({"kept_position": tower}, "11%")
    assert "Of the other methods, fastervlm 0.16 keep" in text and "divprune" not in text and "random" not in text
    # a method's variant is grouped with its method, by what scores its tokens
    variants = pl.DataFrame({"method": ["fastv(layer=3)", "visionzip(dominant=10)", "uniform_grid"],
                             "budget": ["11%"] * 3, "row_centroid": [0.9, 0.1, 0.5]})
    text = positional_finding({"kept_position": variants}, "11%")
    assert text.startswith("**Positional bias** at 11%: 1 of 1 attention-based methods") and "fastv(layer=3) 0.90" in text
    assert "Of the other methods, visionzip(dominant=10) 0.10 keep" in text


def test_accuracy_finding_names_every_tied_method():
    accuracy = pl.DataFrame({"method": ["unpruned", "a", "b", "c"], "budget": ["100%", "11%", "11%", "11%"],
                             "n": [8] * 4, "accuracy": [1.0, 0.75, 0.5, 0.5], "ci_low": [0.7, 0.4, 0.2, 0.2],
                             "ci_high": [1.0, 0.9, 0.8, 0.8]})
    text = accuracy_finding({"accuracy": accuracy}, "11%")
    assert "unpruned 1.000; best a 0.750 [0.400, 0.900], worst b / c 0.500 [0.200, 0.800]" in text


def test_failure_finding_counts_dropped_and_merged_evidence():
    taxonomy = pl.DataFrame({"method": ["m", "m", "m", "n"], "budget": ["11%"] * 4,
                             "category": ["evidence dropped", "over-merging", "other", "other"],
                             "count": [2, 1, 1, 3], "diagnosed": [4, 4, 4, 3], "failures": [9, 9, 9, 3]})
    text = failure_finding({"failure_taxonomy": taxonomy}, "11%")
    assert text == ("**Failures by lost evidence** at 11%: m: 3 of 4 diagnosed failures (of 9) recover when the "
                    "evidence it dropped or merged away is put back.")
    none = failure_finding({"failure_taxonomy": taxonomy.filter(pl.col("method") == "n")}, "11%")
    assert "no diagnosed failure recovers" in none


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
    from reports.write import build_report

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
    # an image of the kept tokens, in the page (inlined) and beside the summary
    from PIL import Image

    kept = Image.open(folder / "figures" / "kept_tokens.png")
    assert kept.width > 3 * 150 and "What the methods keep" in page and "data:image/png;base64," in page
    assert "![kept tokens per method](figures/kept_tokens.png)" in summary
    import re

    assert re.search(r"Causes of the diagnosed failures at 11%: at most \d diagnosed per method", page)
    tables = {p.stem for p in (folder / "tables").glob("*.parquet")}
    assert {"sweep", "accuracy", "kept_overlap", "redundancy", "positional_bias", "diagnoses",
            "failure_taxonomy"} <= tables
    sweep = pl.read_parquet(folder / "tables" / "sweep.parquet")
    assert sweep.height == 3 * (1 + 3 * 2)  # the report's tables show each method once, controls apart
    rows_before = (folder / "sweep" / "rows.jsonl").read_text()
    build_report(adapter, config, progress=False)
    assert (folder / "sweep" / "rows.jsonl").read_text() == rows_before  # the sweep resumed, nothing re-run


def test_the_report_sweeps_its_samples_in_batches_of_its_batch_size(tmp_path, monkeypatch):
    from reports import compute
    from reports.write import build_report
    from workbench.models.loading import load

    class Stop(Exception):
        pass

    asked = []

    def sweep(*args, batch_size=1, **kwargs):
        asked.append(batch_size)
        raise Stop

    monkeypatch.setattr(compute, "run_sweep", sweep)
    for size in (ReportConfig().batch_size, 3):
        with pytest.raises(Stop):
            build_report(load(), ReportConfig(samples=2, methods=("fastv",), batch_size=size, out=str(tmp_path / "r")),
                         progress=False)
    assert asked == [8, 3]


def test_a_sweep_made_with_other_weights_is_moved_aside_not_resumed(tmp_path):
    import json
    from types import SimpleNamespace

    from reports.compute import set_aside_stale_sweep

    def old_sweep(weights):
        (tmp_path / "sweep").mkdir()
        manifest = {"format": "x"} if weights is None else {"format": "x", "weights": weights}
        (tmp_path / "sweep" / "sweep.json").write_text(json.dumps(manifest))
        (tmp_path / "sweep" / "rows.jsonl").write_text("old rows\n")

    now = SimpleNamespace(fingerprint="new")
    assert set_aside_stale_sweep(now, tmp_path) is None  # no sweep yet
    old_sweep("new")
    assert set_aside_stale_sweep(now, tmp_path) is None and (tmp_path / "sweep").is_dir()  # same weights: resume
    (tmp_path / "sweep").rename(tmp_path / "kept")
    old_sweep("abc")
    assert set_aside_stale_sweep(now, tmp_path) == tmp_path / "sweep-abc"
    assert (tmp_path / "sweep-abc" / "rows.jsonl").read_text() == "old rows\n" and not (tmp_path / "sweep").exists()
    old_sweep("abc")
    assert set_aside_stale_sweep(now, tmp_path) == tmp_path / "sweep-abc-1"
    old_sweep(None)  # made before sweeps recorded their weights
    assert set_aside_stale_sweep(now, tmp_path) == tmp_path / "sweep-unfingerprinted"


def test_a_report_sweep_of_other_method_code_is_moved_aside_not_refused(tmp_path, monkeypatch):
    import json

    from workbench.models.loading import load
    from reports.compute import set_aside_stale_sweep
    from workbench.samples import read_dataset
    from workbench.sweep import MethodSpec, run_sweep

    adapter, dataset, specs = load(), "data/eval/samples.jsonl", [MethodSpec("random")]
    run_sweep(adapter, read_dataset(dataset, limit=1), dataset, specs, (0.5,), tmp_path / "sweep", progress=False)
    assert set_aside_stale_sweep(adapter, tmp_path, dataset, specs) is None  # the same experiment: resume
    monkeypatch.setattr("workbench.sweep_identity.code_version", lambda method: "edited-since")
    aside = set_aside_stale_sweep(adapter, tmp_path, dataset, specs)
    assert aside is not None and json.loads((aside / "sweep.json").read_text())["methods"] == ["random"]
    assert not (tmp_path / "sweep").exists()


def test_layer_axes_have_whole_ticks_and_methods_their_group_colours(tmp_path, monkeypatch):
    import matplotlib.figure

    from analyses.method_style import styles
    from reports.figures import to_plotly

    layers = FigureSpec("l", "l", "line", pl.DataFrame({"layer": [0, 1, 2], "value": [0.1, 0.2, 0.3]}), "layer",
                        "value")
    assert to_plotly(layers).layout.xaxis.dtick == 1
    ticks = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: ticks.setdefault("x", list(fig.axes[0].get_xticks())))
    to_png(layers, tmp_path / "l.png")
    assert ticks["x"] and all(float(t).is_integer() for t in ticks["x"])
    methods = pl.DataFrame({"method": ["uniform_grid", "fastv", "divprune"], "flops_ratio": [0.2, 0.3, 0.25],
                            "accuracy": [0.5, 0.7, 0.6], "budget": ["11%"] * 3})
    figure = to_plotly(FigureSpec("c", "c", "scatter", methods, "flops_ratio", "accuracy", series="method"))
    style = styles(["uniform_grid", "fastv", "divprune"])
    assert [t.name for t in figure.data] == ["fastv", "divprune", "uniform_grid"]  # grouped by what scores them
    assert [t.marker.color for t in figure.data] == [style[m].colour for m in ("fastv", "divprune", "uniform_grid")]


def test_every_heatmap_row_is_labelled():
    from reports.figures import to_plotly

    names = [f"m{i:02d}" for i in range(20)]
    data = pl.DataFrame({"a": [a for a in names for _ in names], "b": [b for _ in names for b in names],
                         "j": [0.5] * 400})
    figure = to_plotly(FigureSpec("h", "h", "heatmap", data, "a", "b", z="j"))
    assert list(figure.layout.yaxis.tickvals) == names and list(figure.layout.xaxis.tickvals) == names
