"""The sentences a report states, each computed from its tables (never written by hand).

Three questions the field keeps asking, answered on the user's own model and data:
does redundancy among visual tokens grow with depth; do attention-based methods keep tokens
by position rather than content; which methods fail by dropping the evidence.
"""

from __future__ import annotations

import polars as pl

from analyses.method_style import scored_by
from workbench.sweep import UNPRUNED

SPATIAL_BASELINE = "uniform_grid"
POSITION_MARGIN = 0.1  # a kept-row centroid this far from 0.5 counts as a positional skew
# A depth trend is stated only when it is close to monotone: with 3-4 layers a Spearman rho of 0.5
# is one swapped pair.
TREND_RHO = 0.8
# Two layers always have a rho of +-1, so a trend needs at least three; and a change smaller than
# the two decimals the finding prints is no trend a reader could see.
MIN_TREND_LAYERS = 3
MIN_TREND_CHANGE = 0.01


def trend_verdict(rho: float | None, n_layers: int | None = None, first: float | None = None,
                  last: float | None = None) -> str:
    if n_layers is not None and n_layers < MIN_TREND_LAYERS:
        return f"cannot show a depth trend over {n_layers} layer{'s' if n_layers != 1 else ''}"
    if first is not None and last is not None and abs(last - first) < MIN_TREND_CHANGE:
        return "stays flat with depth"
    if rho is not None and rho >= TREND_RHO:
        return "grows with depth"
    if rho is not None and rho <= -TREND_RHO:
        return "falls with depth"
    return "has no monotone trend with depth"


def _labels_scored_by(frame: pl.DataFrame, *sources: str) -> list[str]:
    return [m for m in frame["method"].unique().to_list() if scored_by(m) in sources]


def _metric(frame: pl.DataFrame, stack: str, metric: str) -> pl.DataFrame:
    return frame.filter((pl.col("stack") == stack) & (pl.col("metric") == metric)).sort("layer")


def redundancy_finding(tables: dict) -> str | None:
    mean, trend = tables.get("redundancy_mean"), tables.get("redundancy_trend")
    if mean is None or trend is None or not mean.height:
        return None
    parts = []
    for stack, name in (("llm", "LLM"), ("tower", "vision tower")):
        values = _metric(mean, stack, "cos_mean")
        row = trend.filter((pl.col("stack") == stack) & (pl.col("metric") == "cos_mean"))
        if not values.height or not row.height:
            continue
        rho = row["spearman"][0]
        path = " -> ".join(f"{v:.2f}" for v in values["value"])
        verdict = trend_verdict(rho, values.height, values["value"][0], values["value"][-1])
        parts.append(f"in the {name} it {verdict} (mean pairwise cosine of the visual tokens "
                     f"by layer: {path}; Spearman rho {rho if rho is None else round(rho, 2)})")
    if not parts:
        return None
    n = int(mean["n_samples"].max())
    return f"**Redundancy** ({n} samples): " + "; ".join(parts) + "."


def positional_finding(tables: dict, budget: str) -> str | None:
    position = tables.get("kept_position")
    if position is None or not position.height:
        return None
    at = position.filter(pl.col("budget") == budget)
    # the methods scored by the LLM's attention from text rows, where RoPE's position bias applies
    attention = (at.filter(pl.col("method").is_in(_labels_scored_by(at, "text_attention")))
                 .sort("row_centroid", descending=True))
    if not attention.height:
        return None
    skewed = attention.filter((pl.col("row_centroid") - 0.5).abs() >= POSITION_MARGIN)
    listing = ", ".join(f"{m} {r:.2f}" for m, r in attention.select("method", "row_centroid").iter_rows())
    baseline = at.filter(pl.col("method") == SPATIAL_BASELINE)
    reference = f"; {SPATIAL_BASELINE} {baseline['row_centroid'][0]:.2f}" if baseline.height else ""
    verdict = (f"{skewed.height} of {attention.height} attention-based methods show a positional bias"
               if skewed.height else f"none of the {attention.height} attention-based methods shows a positional bias")
    text = (f"**Positional bias** at {budget}: {verdict} (mean image row of the kept tokens, 0 = top, 1 = bottom, "
            f"0.5 = even: {listing}{reference}; a bias is a distance of at least {POSITION_MARGIN} from 0.5).")
    # Tower-side scores ([CLS] attention, tower flow) can be skewed too, for reasons other than RoPE.
    others = (at.filter(pl.col("method").is_in(_labels_scored_by(at, "visual_attention", "similarity"))
                        & ((pl.col("row_centroid") - 0.5).abs() >= POSITION_MARGIN)).sort("row_centroid"))
    if others.height:
        text += (" Of the other methods, " + ", ".join(f"{m} {r:.2f}" for m, r in
                                                        others.select("method", "row_centroid").iter_rows())
                 + " keep tokens off the image's vertical centre.")
    bias = tables.get("positional_bias_mean")
    if bias is not None and bias.height:
        rows = bias.filter((pl.col("metric") == "row_centroid") & (pl.col("rows") == "last")).sort("layer")
        with_rope = rows.filter(pl.col("signal") == "attention")["value"].to_list()
        without = rows.filter(pl.col("signal") == "attention_norope")["value"].to_list()
        if with_rope and without:
            text += (" The last token's attention centroid by layer is "
                     + ", ".join(f"{v:.2f}" for v in with_rope) + " with RoPE and "
                     + ", ".join(f"{v:.2f}" for v in without) + " with RoPE removed from the score.")
    return text


def failure_finding(tables: dict, budget: str) -> str | None:
    taxonomy = tables.get("failure_taxonomy")
    recall = tables.get("evidence_recall")
    if taxonomy is None or not taxonomy.height:
        return None
    dropped = (taxonomy.filter(pl.col("category").is_in(["evidence dropped", "over-merging"]))
               .group_by("method").agg(pl.col("count").sum().alias("dropped"), pl.col("diagnosed").first(),
                                       pl.col("failures").first())
               .sort(["dropped", "failures"], descending=True))
    worst = dropped.filter(pl.col("dropped") > 0).head(3)
    if not int(taxonomy.group_by("method").agg(pl.col("diagnosed").first())["diagnosed"].sum()):
        return (f"**Failures** at {budget}: none to diagnose (no sample that the unpruned model answers "
                "correctly and a pruned one does not; samples without a gold answer never count).")
    if not worst.height:
        return f"**Failures** at {budget}: no diagnosed failure recovers when its dropped evidence is restored."
    listing = "; ".join(f"{m}: {d} of {n} diagnosed failures (of {f}) recover when the evidence it dropped or "
                        f"merged away is put back" for m, d, n, f in
                        worst.select("method", "dropped", "diagnosed", "failures").iter_rows())
    text = f"**Failures by lost evidence** at {budget}: {listing}."
    if recall is not None and recall.height:
        low = (recall.filter((pl.col("budget") == budget) & (pl.col("method") != "unpruned"))
               .sort("recall").head(3))
        text += " Lowest evidence recall: " + ", ".join(f"{m} {r:.2f}" for m, r in low.select("method", "recall").iter_rows()) + "."
    return text


def accuracy_finding(tables: dict, budget: str) -> str | None:
    accuracy = tables.get("accuracy")
    if accuracy is None:
        return None
    base = accuracy.filter(pl.col("method") == "unpruned")
    at = accuracy.filter(pl.col("budget") == budget).sort("accuracy", descending=True)
    if not at.height:
        return "**Accuracy**: the samples carry no gold answers, so no accuracy is reported."
    best, worst = at.row(0, named=True), at.row(at.height - 1, named=True)

    def named(row) -> str:  # every method tied with ``row``
        tied = at.filter(pl.col("accuracy") == row["accuracy"])["method"].sort().to_list()
        return f"{' / '.join(tied)} {row['accuracy']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"

    start = f"unpruned {base['accuracy'][0]:.3f}; " if base.height else ""
    return (f"**Accuracy** at {budget} ({best['n']} samples): {start}best {named(best)}, worst {named(worst)} "
            f"(95 % Wilson intervals).{_controls(tables, budget)}")


def _controls(tables: dict, budget: str) -> str:
    """What the image is worth, and how far chance alone spreads: the sweep's controls and the
    random baseline's seeds."""
    text = ""
    controls = tables.get("controls")
    if controls is not None and controls.height:
        value = dict(controls.select("method", "accuracy").iter_rows())
        parts = [f"{label} {value[key]:.3f}" for key, label in (("control:zero_tokens", "with zero visual tokens"),
                                                                ("control:blank_image", "on a blank image"))
                 if key in value]
        text += " Controls: " + ", ".join(parts) + "."
    seeds = tables.get("random_seeds")
    if seeds is not None and seeds.height:
        at = seeds.filter(pl.col("budget") == budget)["accuracy"]
        if at.len() > 1:
            text += (f" The random baseline over {at.len()} seeds at {budget}: mean {at.mean():.3f}, "
                     f"{at.min():.3f} to {at.max():.3f}.")
    return text


def cost_finding(tables: dict) -> str | None:
    """Methods compared at equal cost: which points make the accuracy-FLOPs Pareto front, and what
    the best method buys with the cheapest front point's FLOPs or fewer."""
    cost = tables.get("accuracy_vs_cost")
    if cost is None or not cost.height:
        return None
    pruned = cost.filter((pl.col("method") != UNPRUNED) & ~pl.col("method").str.starts_with("control:"))
    front = pruned.filter(pl.col("pareto_flops")).sort("flops_ratio")
    if not front.height:
        return None
    points = ", ".join(f"{m} at {b} ({a:.3f} for {f:.2f} of the FLOPs)"
                       for m, b, a, f in front.select("method", "budget", "accuracy", "flops_ratio").iter_rows())
    cheapest = float(front["flops_ratio"][0])
    within = pruned.filter(pl.col("flops_ratio") <= cheapest + 1e-9).sort("accuracy", descending=True)
    best = within.row(0, named=True)
    return (f"**Accuracy at equal cost**: the Pareto front of accuracy against prefill FLOPs is {points}. "
            f"At the lowest cost on it ({cheapest:.2f} of the unpruned FLOPs) the best is {best['method']} at "
            f"{best['budget']} ({best['accuracy']:.3f}); a method's nominal budget alone does not set its cost.")


def run_on_finding(tables: dict, budget: str) -> str | None:
    """Wrong answers that begin with the right one and do not stop, named as such."""
    taxonomy = tables.get("failure_taxonomy")
    if taxonomy is None or not taxonomy.height:
        return None
    run_on = (taxonomy.filter((pl.col("category") == "run-on answer") & (pl.col("count") > 0))
              .sort("count", descending=True))
    if not run_on.height:
        return None
    listing = ", ".join(f"{m} {c} of {n}" for m, c, n in run_on.select("method", "count", "diagnosed").iter_rows())
    return (f"**Run-on answers** at {budget}: of the diagnosed failures, {listing} begin with the right answer "
            "and do not stop; they fail to end the answer, not to see the evidence.")


def findings(tables: dict, budget: str) -> list[str]:
    found = [accuracy_finding(tables, budget), benchmark_finding(tables, budget), cost_finding(tables),
             redundancy_finding(tables), positional_finding(tables, budget), failure_finding(tables, budget),
             run_on_finding(tables, budget), literature_finding(tables)]
    return [f for f in found if f]


# --- the standard benchmarks' metrics and the literature's observations ---------------------------------

def report_tables(adapter, samples, tables: dict, config, progress: bool = True) -> dict:
    """The tables of the report's benchmark and literature sections: the official metrics of each
    benchmark among the samples (from the sweep's rows, scored the one way), and the literature's
    observations measured on the first ``analysis_samples`` samples."""
    from analyses import literature
    from workbench.benchmarks import benchmark_summary

    out = {}
    sweep = tables.get("sweep")
    if sweep is not None and sweep.height:
        summary = benchmark_summary(sweep, samples)
        if summary.height:
            out["benchmark_metrics"] = summary
    if "literature" in config.analyses and config.analysis_samples:
        measured = literature.measure(adapter, samples[: config.analysis_samples], progress)
        out |= {f"literature_{name}": frame for name, frame in measured.items()}
    return out


def report_key_tables(tables: dict, budget: str) -> dict[str, pl.DataFrame]:
    """The benchmark metrics (unpruned, controls and every method at ``budget``) and the literature
    claims beside the papers' values, shown in full in the report."""
    from workbench.benchmarks import summary_wide

    out = {}
    metrics = tables.get("benchmark_metrics")
    if metrics is not None and metrics.height:
        at = metrics.filter((pl.col("budget") == budget) | (pl.col("method") == UNPRUNED)
                            | pl.col("method").str.starts_with("control:"))
        out[f"Official benchmark metrics (unpruned, controls and at {budget})"] = summary_wide(at)
    claims = tables.get("literature_claims")
    if claims is not None and claims.height:
        out["The literature's observations on this model"] = claims.select(
            "finding", "paper", "paper_model", "paper_value", "measured")
    return out


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def literature_finding(tables: dict) -> str | None:
    """One sentence per paper's observation, the value measured here beside the paper's."""
    claims = tables.get("literature_claims")
    if claims is None or not claims.height:
        return None
    got = dict(claims.select("finding", "measured").iter_rows())
    n = tables["literature_attention_by_role"]["sample_id"].n_unique()
    dims = tables.get("literature_sink_dimensions")
    found = ", ".join(str(d) for d in dims["dim"].head(3)) if dims is not None and dims.height else "none"
    zero = tables.get("literature_zero_by_benchmark")
    per = ("; accuracy with zero visual tokens against unpruned: "
           + ", ".join(f"{b} {_percent(z)} vs {_percent(u)}" for b, z, u in
                            zero.select("benchmark", "zero_tokens", "unpruned").iter_rows())
           if zero is not None and zero.height else "")
    return (f"**The literature on this model** ({n} samples; the papers' values are for LLaVA-1.5-7B): image tokens "
            f"are {_percent(got['image_token_share'])} of the input (FastV 0.64) and get the least attention per token "
            f"in {_percent(got['image_least_attended_after_2'])} of the layers from 2 on (FastV 1.00); the system "
            f"prompt takes {_percent(got['system_attention_deep'])} of the last token's attention in the deeper half "
            f"(FastV 0.85); FastV's kept tokens (K=3, R=0.75) sit at mean row {_percent(got['fastv_kept_row_rope'])} "
            f"with RoPE and {_percent(got['fastv_kept_row_norope'])} without (FEATHER 0.807); "
            f"{_percent(got['visual_sink_share'])} of the visual tokens are visual sinks, sink dimensions {found} "
            f"(VAR 2533, 1415); top-k tokens chosen at two layers overlap by {_percent(got['topk_overlap'])} "
            f"(near 0); with zero visual tokens {_percent(got['zero_token_retention'])} of the unpruned accuracy "
            f"remains (MMTok: 0.92 on MMMU, 0.91 on ScienceQA){per}.")


def benchmark_finding(tables: dict, budget: str) -> str | None:
    """The headline official metric of each benchmark, unpruned and for the best method at ``budget``."""
    from workbench.benchmarks import BENCHMARKS, HEADLINE

    metrics = tables.get("benchmark_metrics")
    if metrics is None or not metrics.height:
        return None
    parts = []
    for name in metrics["benchmark"].unique(maintain_order=True).to_list():
        headline = HEADLINE.get(name)
        rows = metrics.filter((pl.col("benchmark") == name) & (pl.col("metric") == headline))
        base = rows.filter(pl.col("method") == UNPRUNED)
        at = rows.filter((pl.col("budget") == budget) & (pl.col("method") != UNPRUNED)
                         & ~pl.col("method").str.starts_with("control:")).sort("value", descending=True)
        if not base.height:
            continue
        text = f"{BENCHMARKS[name].title.split(' (')[0]} {headline} {base['value'][0]:.3f} unpruned"
        if at.height:
            text += f", best at {budget} {at['method'][0]} {at['value'][0]:.3f}"
        parts.append(text + f" (scorer {BENCHMARKS[name].scorer})")
    return ("**Official benchmark metrics**: " + "; ".join(parts) + ".") if parts else None
