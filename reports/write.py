"""Build a report folder: compute, then write every file whole (temporary file, then rename)."""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict
from pathlib import Path

import polars as pl

from reports import compute
from reports.config import ReportConfig
from reports.figures import figure_specs, to_plotly, to_png
from reports.findings import findings, report_key_tables, report_tables
from workbench.models.base import ModelAdapter
from workbench.samples import read_dataset, write_atomically, write_atomically_bytes
from workbench.sweep import budget_label


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def markdown_table(frame: pl.DataFrame) -> str:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines)


def html_table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>"
                   for row in frame.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_tables(tables: dict, budget: str) -> dict[str, pl.DataFrame]:
    """The tables summary.md and the page show in full (the rest are in tables/*.parquet)."""
    out = {}
    accuracy = tables.get("accuracy")
    if accuracy is not None and accuracy.height:
        wide = (accuracy.filter(pl.col("method") != "unpruned")
                .pivot(on="budget", index="method", values="accuracy").sort("method"))
        base = accuracy.filter(pl.col("method") == "unpruned")
        if base.height:
            wide = wide.with_columns(unpruned=pl.lit(base["accuracy"][0]))
        out["Accuracy by method and budget"] = wide
    recall = tables.get("evidence_recall")
    position = tables.get("kept_position")
    if recall is not None and recall.height and position is not None:
        at = (recall.filter(pl.col("budget") == budget).select("method", evidence_recall="recall")
              .join(position.filter(pl.col("budget") == budget).select("method", "row_centroid"), on="method",
                    how="left").sort("evidence_recall", descending=True))
        out[f"Evidence recall and kept-row centroid at {budget}"] = at
    taxonomy = tables.get("failure_taxonomy")
    if taxonomy is not None and taxonomy.height:
        out["Diagnosed failures by cause"] = (taxonomy.pivot(on="category", index=["method", "failures", "diagnosed"],
                                                             values="count").sort("method"))
    return out


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:13px;margin:1em 0}}td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}li{{margin:.4em 0}}</style>
</head><body><h1>{title}</h1><p>{meta}</p><h2>Findings</h2><ul>{findings}</ul>{lead}{tables}<h2>Figures</h2>{figures}
</body></html>"""


LEAD = ("accuracy_vs_flops", "accuracy_vs_time")  # the figures the page opens with


def _md_bold_to_html(text: str) -> str:
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


KEPT_IMAGE = "kept_tokens"  # figures/kept_tokens.png: what each method keeps on one sample


def _png_bytes(image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_report(folder: Path, config: ReportConfig, tables: dict, meta: str, kept_image=None) -> Path:
    """``kept_image``: (PIL image, caption) of what each method keeps on one sample, or None."""
    import base64

    budget = budget_label(config.diagnose_budget)
    found = findings(tables, budget)
    keys = key_tables(tables, budget) | report_key_tables(tables, budget)
    specs = figure_specs(tables, budget)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        write_atomically_bytes(folder / "tables" / f"{name}.parquet", frame.write_parquet)
    for spec in specs:
        write_atomically_bytes(folder / "figures" / f"{spec.name}.png", lambda tmp, spec=spec: to_png(spec, Path(tmp)))
    # The page leads with accuracy against cost; plotly.js is inlined once, so it works offline.
    ordered = [s for s in specs if s.name in LEAD] + [s for s in specs if s.name not in LEAD]
    rendered = {spec.name: to_plotly(spec).to_html(full_html=False, include_plotlyjs=(i == 0), default_height="420px")
                for i, spec in enumerate(ordered)}
    lead = "".join(rendered[s.name] for s in ordered if s.name in LEAD)
    kept_html, kept_md = "", []
    if kept_image is not None:
        png, caption = _png_bytes(kept_image[0]), kept_image[1]
        write_atomically_bytes(folder / "figures" / f"{KEPT_IMAGE}.png", lambda tmp: Path(tmp).write_bytes(png))
        kept_html = (f"<h2>What the methods keep</h2><p>{html.escape(caption)}</p><img alt='kept tokens per method' "
                     f"style='max-width:100%' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
        kept_md = ["## What the methods keep", "", caption, "", f"![kept tokens per method](figures/{KEPT_IMAGE}.png)",
                   ""]
    figures_html = "".join(rendered[s.name] for s in ordered if s.name not in LEAD)
    title = f"Pruning report: {config.model}"
    page = PAGE.format(title=html.escape(title), meta=html.escape(meta),
                       findings="".join(f"<li>{_md_bold_to_html(f)}</li>" for f in found),
                       tables="".join(f"<h2>{html.escape(k)}</h2>{html_table(v)}" for k, v in keys.items()),
                       figures=figures_html,
                       lead=(f"<h2>Accuracy against cost</h2>{lead}" if lead else "") + kept_html)
    write_atomically(folder / "index.html", page)
    summary = [f"# {title}", "", meta, "", "## Findings", ""] + [f"- {f}" for f in found] + [""]
    summary += kept_md
    for name, frame in keys.items():
        summary += [f"## {name}", "", markdown_table(frame), ""]
    summary += ["## Figures", ""] + [f"![{s.title}](figures/{s.name}.png)" for s in specs] + [""]
    summary += ["Tables behind every figure: `tables/*.parquet`; the sweep itself: `sweep/`.", ""]
    write_atomically(folder / "summary.md", "\n".join(summary))
    write_atomically(folder / "report.json", json.dumps(asdict(config), indent=1))
    return folder


def build_report(adapter: ModelAdapter, config: ReportConfig, progress: bool = True) -> Path:
    started = time.perf_counter()
    folder = Path(config.out)
    samples = read_dataset(config.dataset, config.samples, config.benchmark)
    tables: dict[str, pl.DataFrame] = {}
    if {"comparison", "failures"} & set(config.analyses):
        tables |= compute.sweep_tables(adapter, samples, config, folder, progress)
    if {"redundancy", "misalignment"} & set(config.analyses) and config.analysis_samples:
        tables |= compute.recording_tables(adapter, samples[: config.analysis_samples], config, progress)
    if "failures" in config.analyses and config.diagnose_per_method:
        tables |= compute.failure_tables(adapter, samples, tables["sweep"], config, progress)
    tables |= report_tables(adapter, samples, tables, config, progress)  # benchmark metrics, literature
    analysed = min(config.analysis_samples, len(samples))
    meta = (f"{adapter.name} on {len(samples)} samples of {config.dataset} ({analysed} recorded for "
            f"the redundancy and misalignment analyses); budgets {', '.join(budget_label(b) for b in config.budgets)}; "
            f"built in {time.perf_counter() - started:.0f} s.")
    kept_image = None
    if "sweep" in tables:
        from reports.kept_tokens import kept_tokens_image

        kept_image = kept_tokens_image(adapter, samples, tables["sweep"], budget_label(config.diagnose_budget))
    return write_report(folder, config, tables, meta, kept_image)
