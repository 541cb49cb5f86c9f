"""Each figure as data (``FigureSpec``), drawn twice: plotly for the HTML page, matplotlib for PNGs.

Keeping the figure's content in one place means the interactive and the static figure can never
disagree; the two renderers only translate a spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import polars as pl

from analyses.method_style import ordered, styles

@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    kind: Literal["line", "bar", "stacked_bar", "heatmap", "scatter"]
    data: pl.DataFrame
    x: str
    y: str
    series: str | None = None  # one line / bar group per value
    z: str | None = None  # heatmap cell values (x and y are categories)
    low: str | None = None  # interval bounds of y (error bars)
    high: str | None = None
    xlabel: str = ""
    ylabel: str = ""
    reference: float | None = None  # a horizontal line (e.g. the unpruned accuracy)
    front: str | None = None  # scatter: a bool column; its points are joined by a line (a Pareto front)


def _front(spec: FigureSpec) -> tuple[list, list]:
    """The front's points, sorted by x."""
    part = spec.data.filter(pl.col(spec.front)).sort(spec.x)
    return part[spec.x].to_list(), part[spec.y].to_list()


def _groups(spec: FigureSpec):
    if spec.series is None:
        yield spec.y, spec.data
        return
    parts = {str(key): part for (key,), part in spec.data.sort(spec.series).group_by(spec.series, maintain_order=True)}
    # methods in their groups (by what scores their tokens), so the legend reads family by family
    names = ordered(parts) if spec.series == "method" else list(parts)
    for name in names:
        yield name, parts[name]


def _method_styles(spec: FigureSpec) -> dict:
    """Each method's colour and marker when the series are methods (``analyses.method_style``)."""
    if spec.series != "method":
        return {}
    return styles(spec.data[spec.series].cast(pl.String).unique().to_list())


def _integer_x(spec: FigureSpec) -> bool:
    return spec.x == "layer"  # layers are whole numbers: no 0.5 ticks


def _heatmap_grid(spec: FigureSpec):
    xs = list(dict.fromkeys(spec.data[spec.x].to_list()))
    ys = list(dict.fromkeys(spec.data[spec.y].to_list()))
    lookup = {(a, b): v for a, b, v in spec.data.select(spec.x, spec.y, spec.z).iter_rows()}
    return xs, ys, [[lookup.get((x, y)) for x in xs] for y in ys]


# --- plotly -------------------------------------------------------------------------------------

def to_plotly(spec: FigureSpec):
    import plotly.graph_objects as go

    fig = go.Figure()
    style = _method_styles(spec)
    height = 420
    if spec.kind == "heatmap":
        xs, ys, z = _heatmap_grid(spec)
        fig.add_trace(go.Heatmap(x=xs, y=ys, z=z, colorscale="Viridis", zmin=0, zmax=1))
        height = max(420, 20 * len(ys) + 160)
        # every label on both axes: plotly thins category ticks unless given each one
        fig.update_xaxes(tickmode="array", tickvals=xs, ticktext=xs, tickangle=-60, type="category")
        fig.update_yaxes(tickmode="array", tickvals=ys, ticktext=ys, type="category", autorange="reversed")
    else:
        for name, part in _groups(spec):
            look = {}
            if name in style:
                look = dict(marker=dict(color=style[name].colour, symbol=style[name].marker, size=8),
                            legendgroup=style[name].group_label, legendgrouptitle_text=style[name].group_label)
                if spec.kind == "line":
                    look["line"] = dict(color=style[name].colour)
            x, y = part[spec.x].to_list(), part[spec.y].to_list()
            error = None
            if spec.low and spec.high:
                error = dict(type="data", array=(part[spec.high] - part[spec.y]).to_list(),
                             arrayminus=(part[spec.y] - part[spec.low]).to_list())
            if spec.kind in ("line", "scatter"):
                mode = "lines+markers" if spec.kind == "line" else "markers"
                fig.add_trace(go.Scatter(x=x, y=y, name=name, mode=mode, error_y=error,
                                         text=part["budget"].to_list() if "budget" in part.columns else None, **look))
            else:
                fig.add_trace(go.Bar(x=x, y=y, name=name, error_y=error))
        if style:
            height = max(420, 24 * len(style) + 200)  # the legend lists every method and each group's title
        if spec.kind == "stacked_bar":
            fig.update_layout(barmode="stack")
        if spec.front:
            x, y = _front(spec)
            fig.add_trace(go.Scatter(x=x, y=y, name="Pareto front", mode="lines", line=dict(color="black", dash="dot")))
    if spec.reference is not None:
        fig.add_hline(y=spec.reference, line_dash="dash", annotation_text=f"{spec.reference:.3f}")
    fig.update_layout(title=spec.title, xaxis_title=spec.xlabel, yaxis_title=spec.ylabel, height=height,
                      margin=dict(l=60, r=20, t=50, b=60), template="plotly_white", legend=dict(font=dict(size=10)))
    if _integer_x(spec):
        fig.update_xaxes(tickmode="linear", dtick=1)
    if spec.kind in ("bar", "stacked_bar"):
        fig.update_xaxes(tickmode="array", tickvals=spec.data[spec.x].unique(maintain_order=True).to_list())
    return fig


# --- matplotlib ---------------------------------------------------------------------------------

def to_png(spec: FigureSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    # Other series (not methods) cycle 20 colours with markers beside them; methods get their own style.
    ax.set_prop_cycle(color=plt.cm.tab20.colors, marker=["o", "s", "^", "D", "v"] * 4)
    style = _method_styles(spec)
    try:
        if spec.kind == "heatmap":
            xs, ys, z = _heatmap_grid(spec)
            image = ax.imshow([[float("nan") if v is None else v for v in row] for row in z], vmin=0, vmax=1,
                              cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(xs)), xs, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(len(ys)), ys, fontsize=7)
            fig.colorbar(image, ax=ax)
        else:
            groups = list(_groups(spec))
            categories = list(dict.fromkeys(v for _, part in groups for v in part[spec.x].to_list()))
            bottom = {c: 0.0 for c in categories}
            width = 0.8 / (1 if spec.kind == "stacked_bar" else max(len(groups), 1))
            for i, (name, part) in enumerate(groups):
                x, y = part[spec.x].to_list(), [float("nan") if v is None else v for v in part[spec.y].to_list()]
                error = None
                if spec.low and spec.high:
                    error = [(part[spec.y] - part[spec.low]).to_list(), (part[spec.high] - part[spec.y]).to_list()]
                look = ({"color": style[name].colour, "marker": style[name].mpl_marker} if name in style else {})
                if spec.kind == "line":
                    ax.errorbar(x, y, yerr=error, capsize=3, label=name, elinewidth=0.6, **look)
                elif spec.kind == "scatter":
                    ax.plot(x, y, linestyle="none", label=name, **look)
                else:
                    slots = [categories.index(v) for v in x]
                    if spec.kind == "stacked_bar":
                        ax.bar(slots, y, 0.8, bottom=[bottom[v] for v in x], label=name)
                        for v, h in zip(x, y):
                            bottom[v] += h
                    else:
                        ax.bar([s + (i - (len(groups) - 1) / 2) * width for s in slots], y, width, yerr=error,
                               label=name, capsize=2)
            if spec.front:
                ax.plot(*_front(spec), color="black", linestyle=":", marker="", label="Pareto front")
            if spec.kind not in ("line", "scatter"):
                ax.set_xticks(range(len(categories)), categories, rotation=60, ha="right", fontsize=7)
            if len(groups) > 1:
                ax.legend(fontsize=6, ncol=2 if len(groups) > 8 else 1, loc="best")
        if spec.reference is not None:
            ax.axhline(spec.reference, linestyle="--", color="grey")
        if _integer_x(spec):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(spec.title, fontsize=10)
        ax.set_xlabel(spec.xlabel)
        ax.set_ylabel(spec.ylabel)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# --- the report's figures -------------------------------------------------------------------------

def figure_specs(tables: dict, budget: str) -> list[FigureSpec]:
    specs = []
    cost = tables.get("accuracy_vs_cost")
    if cost is not None and cost.height:
        specs.append(FigureSpec(
            "accuracy_vs_flops", "Accuracy against cost: prefill FLOPs (one point per method and budget; "
            "Pareto front dotted)", "scatter", cost, "flops_ratio", "accuracy", series="method",
            xlabel="prefill FLOPs / unpruned", ylabel="accuracy", front="pareto_flops"))
        if cost["time_ratio"].null_count() < cost.height:
            specs.append(FigureSpec(
                "accuracy_vs_time", "Accuracy against cost: measured prefill time (Pareto front dotted)", "scatter",
                cost.filter(pl.col("time_ratio").is_not_null()), "time_ratio", "accuracy", series="method",
                xlabel="prefill wall time / unpruned", ylabel="accuracy", front="pareto_time"))
    accuracy = tables.get("accuracy")
    if accuracy is not None and accuracy.height:
        base = accuracy.filter(pl.col("method") == "unpruned")
        specs.append(FigureSpec(
            "accuracy", "Accuracy vs. visual-token budget (95 % Wilson intervals)", "line",
            accuracy.filter(pl.col("method") != "unpruned").sort("budget_tokens"), "budget_tokens", "accuracy",
            series="method", low="ci_low", high="ci_high", xlabel="visual tokens kept", ylabel="accuracy",
            reference=base["accuracy"][0] if base.height else None))
    recall = tables.get("evidence_recall")
    if recall is not None and recall.height:
        specs.append(FigureSpec(
            "evidence_recall", f"Share of the ground-truth evidence tokens kept, at {budget}", "bar",
            recall.filter((pl.col("budget") == budget) & (pl.col("method") != "unpruned")).sort("recall"),
            "method", "recall", ylabel="evidence recall"))
    overlap = tables.get("kept_overlap")
    if overlap is not None and overlap.height:
        specs.append(FigureSpec(
            "kept_overlap", f"Kept-set overlap (Jaccard) between methods, at {budget}", "heatmap",
            overlap.filter(pl.col("budget") == budget).sort("method_a", "method_b"), "method_a", "method_b",
            z="jaccard"))
    position = tables.get("kept_position")
    if position is not None and position.height:
        specs.append(FigureSpec(
            "kept_position", f"Mean image row of the kept tokens at {budget} (0 top, 1 bottom)", "bar",
            position.filter(pl.col("budget") == budget).sort("row_centroid"), "method", "row_centroid",
            ylabel="row centroid", reference=0.5))
    mean = tables.get("redundancy_mean")
    if mean is not None and mean.height:
        for metric, label in (("cos_mean", "mean pairwise cosine"), ("effective_rank", "effective rank")):
            specs.append(FigureSpec(
                f"redundancy_{metric}", f"Redundancy among visual tokens by depth: {label}", "line",
                mean.filter(pl.col("metric") == metric).sort("layer"), "layer", "value", series="stack",
                xlabel="layer", ylabel=label))
    bias = tables.get("positional_bias_mean")
    if bias is not None and bias.height:
        specs.append(FigureSpec(
            "attention_row_centroid", "Where the last token's attention falls (row centroid; with vs. without RoPE)",
            "line", bias.filter((pl.col("metric") == "row_centroid") & (pl.col("rows") == "last")
                                & (pl.col("stack") == "llm")).sort("layer"),
            "layer", "value", series="signal", xlabel="decoder layer", ylabel="row centroid", reference=0.5))
    alignment = tables.get("evidence_alignment_mean")
    if alignment is not None and alignment.height:
        auc = alignment.filter(pl.col("metric") == "auc").with_columns(
            series=pl.col("signal") + " / " + pl.col("rows"))
        specs.append(FigureSpec(
            "evidence_auc", "Does attention point at the evidence? ROC AUC per layer (0.5 = chance)", "line",
            auc.sort("layer"), "layer", "value", series="series", xlabel="layer (-1: saliency)", ylabel="AUC",
            reference=0.5))
    dominance = tables.get("modality_dominance_mean")
    if dominance is not None and dominance.height:
        specs.append(FigureSpec(
            "modality_dominance", "Modality dominance index (text over visual attention per token)", "line",
            dominance.filter(pl.col("metric") == "mdi").sort("layer"), "layer", "value", xlabel="decoder layer",
            ylabel="MDI", reference=1.0))
    taxonomy = tables.get("failure_taxonomy")
    if taxonomy is not None and taxonomy.height:
        # Only the first few failures of each method are diagnosed: the bars count those, and each
        # method's label says how many of its failures that is.
        most = int(taxonomy["diagnosed"].max())
        labelled = taxonomy.filter(pl.col("count") > 0).with_columns(
            method=pl.format("{} ({} of {})", "method", "diagnosed", "failures"))
        specs.append(FigureSpec(
            "failure_taxonomy", f"Causes of the diagnosed failures at {taxonomy['budget'][0]}: at most {most} "
            "diagnosed per method (label: diagnosed of all its failures)", "stacked_bar",
            labelled.sort("method"), "method", "count", series="category",
            ylabel="diagnosed failures (not all failures)"))
    return specs
