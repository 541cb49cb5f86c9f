"""Compare: from a sweep or report folder inside the results folder, accuracy against cost with the
Pareto front (prefill FLOPs, effective visual tokens or measured time), accuracy-vs-budget curves
with their confidence intervals, the Jaccard overlap of the methods' kept sets, and evidence recall
per method (all computed by ``analyses.comparison``). Methods are grouped and coloured by what
scores their tokens (``analyses.method_style``)."""

from __future__ import annotations

import plotly.graph_objects as go
import polars as pl
import streamlit as st

from analyses.method_style import ordered, styles
from dashboards.views.common import pick_results_table

# x axis of the accuracy-against-cost chart: label -> (column of ``accuracy_vs_cost``, axis title)
COSTS = {
    "prefill FLOPs": ("flops_ratio", "prefill FLOPs / unpruned"),
    "effective visual tokens (mean per decoder layer)": ("effective_tokens", "visual tokens per decoder layer (mean)"),
    "measured prefill time": ("time_ratio", "prefill wall time / unpruned"),
}


def _legend(n: int) -> dict:
    # every entry shown: a vertical legend as tall as the figure makes it, grouped by score source
    return dict(font=dict(size=10), groupclick="toggleitem", tracegroupgap=4)


def _height(n: int, least: int = 420) -> int:
    return max(least, 24 * n + 200)  # a legend entry per method and a title per group, none scrolled away


def _trace_style(style) -> dict:
    return dict(line=dict(color=style.colour), marker=dict(symbol=style.marker, size=8, color=style.colour),
                legendgroup=style.group_label, legendgrouptitle_text=style.group_label)


def accuracy_figure(curves) -> go.Figure:
    methods = ordered(curves["method"].unique().to_list())
    style = styles(methods)
    figure = go.Figure()
    for method in methods:
        part = curves.filter(curves["method"] == method).sort("budget_tokens")
        x, y = part["budget_tokens"].to_list(), part["accuracy"].to_list()
        high = [h - a for h, a in zip(part["ci_high"].to_list(), y)]
        low = [a - lo for lo, a in zip(part["ci_low"].to_list(), y)]
        figure.add_trace(go.Scatter(x=x, y=y, name=method, mode="lines+markers",
                                    error_y=dict(type="data", array=high, arrayminus=low, visible=True, thickness=1),
                                    text=part["budget"].to_list(), hovertemplate=method + " %{text}: %{y:.3f}",
                                    **_trace_style(style[method])))
    figure.update_layout(title="accuracy vs budget (95% Wilson interval)", xaxis_title="visual tokens kept",
                         yaxis_title="accuracy", yaxis_range=[0, 1.05], height=_height(len(methods)),
                         margin=dict(l=10, r=10, t=40, b=10), legend=_legend(len(methods)))
    return figure


def cost_points(table: pl.DataFrame, cost: str) -> pl.DataFrame:
    """``comparison.accuracy_vs_cost`` with ``front``: the points on the Pareto front of ``cost``
    (lower cost and higher accuracy; points without the cost are left out)."""
    from analyses import comparison

    column = COSTS[cost][0]
    points = comparison.accuracy_vs_cost(table).filter(pl.col(column).is_not_null())
    if not points.height:
        return points.with_columns(front=pl.lit(False))
    return points.with_columns(front=pl.Series(comparison.pareto_front(points[column], points["accuracy"])))


def cost_figure(points: pl.DataFrame, cost: str) -> go.Figure:
    column, title = COSTS[cost]
    methods = ordered(points["method"].unique().to_list())
    style = styles(methods)
    figure = go.Figure()
    for method in methods:
        part = points.filter(pl.col("method") == method)
        figure.add_trace(go.Scatter(x=part[column].to_list(), y=part["accuracy"].to_list(), name=method,
                                    mode="markers", text=part["budget"].to_list(),
                                    hovertemplate=method + " %{text}: %{y:.3f} at %{x:.3g}<extra></extra>",
                                    **_trace_style(style[method])))
    front = points.filter(pl.col("front")).sort(column)
    figure.add_trace(go.Scatter(x=front[column].to_list(), y=front["accuracy"].to_list(), name="Pareto front",
                                mode="lines", line=dict(color="black", dash="dot"), legendgroup="front",
                                legendgrouptitle_text="best trade-off"))
    figure.update_layout(title=f"accuracy against cost: {cost} (one point per method and budget; Pareto front dotted)",
                         xaxis_title=title, yaxis_title="accuracy", yaxis_range=[0, 1.05], height=_height(len(methods)),
                         margin=dict(l=10, r=10, t=40, b=10), legend=_legend(len(methods)))
    return figure


def overlap_figure(overlap, budget: str) -> go.Figure:
    part = overlap.filter(overlap["budget"] == budget)
    methods = ordered(part["method_a"].to_list())
    value = {(a, b): j for a, b, j in part.select("method_a", "method_b", "jaccard").iter_rows()}
    z = [[value.get((a, b)) for b in methods] for a in methods]
    figure = go.Figure(go.Heatmap(z=z, x=methods, y=methods, zmin=0, zmax=1, colorscale="Viridis",
                                  colorbar=dict(title="Jaccard"),
                                  text=[[f"{v:.2f}" if v is not None else "" for v in row] for row in z],
                                  texttemplate="%{text}" if len(methods) <= 12 else None))
    # every method named on both axes: plotly thins category ticks unless told each one
    ticks = dict(tickmode="array", tickvals=methods, ticktext=methods, tickfont=dict(size=10), type="category")
    figure.update_layout(title=f"Jaccard overlap of kept tokens at {budget}", height=_height(len(methods)),
                         margin=dict(l=10, r=10, t=40, b=10), xaxis=dict(tickangle=-60, **ticks),
                         yaxis=dict(autorange="reversed", **ticks))
    return figure


def recall_figure(recall) -> go.Figure:
    methods = ordered(recall["method"].unique().to_list())
    style = styles(methods)
    figure = go.Figure()
    for method in methods:
        part = recall.filter(recall["method"] == method).sort("budget_tokens")
        figure.add_trace(go.Scatter(x=part["budget_tokens"].to_list(), y=part["recall"].to_list(), name=method,
                                    mode="lines+markers",
                                    error_y=dict(type="data", array=part["recall_sem"].fill_null(0).to_list(),
                                                 thickness=1), **_trace_style(style[method])))
    figure.update_layout(title="evidence recall (share of evidence tokens kept, ± s.e.)",
                         xaxis_title="visual tokens kept", yaxis_title="recall", yaxis_range=[0, 1.05],
                         height=_height(len(methods)), margin=dict(l=10, r=10, t=40, b=10),
                         legend=_legend(len(methods)))
    return figure


def render() -> None:
    from analyses import comparison

    st.header("Compare")
    picked = pick_results_table("compare")
    if picked is None:
        return
    folder, table = picked
    st.caption(f"{folder.name}: {table.height} rows, {table['sample_id'].n_unique()} samples; methods grouped and "
               "coloured by what scores their tokens")
    cost = st.selectbox("cost axis", list(COSTS), key="compare_cost")
    points = cost_points(table, cost)
    if points.height:
        st.plotly_chart(cost_figure(points, cost), width="stretch", key="compare_cost_chart")
        with st.expander("accuracy and cost table (FLOPs, effective tokens, time; on the front)"):
            st.dataframe(points, hide_index=True)
    else:
        st.info(f"these rows record no {cost}")
    curves = comparison.accuracy_curves(table)
    st.plotly_chart(accuracy_figure(curves), width="stretch", key="compare_accuracy")
    with st.expander("accuracy table"):
        st.dataframe(curves, hide_index=True)
    overlap = comparison.kept_overlap(table)
    recall = comparison.evidence_recall_by_budget(table, include_unpruned=False)
    budgets = overlap["budget"].unique(maintain_order=True).to_list()
    if budgets:
        budget = st.selectbox("overlap at budget", budgets, key="compare_budget")
        st.plotly_chart(overlap_figure(overlap, budget), width="stretch", key="compare_overlap")
    else:
        st.info("no pruned rows to compare")
    if recall.height:
        st.plotly_chart(recall_figure(recall), width="stretch", key="compare_recall")
        with st.expander("evidence recall table"):
            st.dataframe(recall, hide_index=True)
    else:
        st.info("no evidence annotations in these rows")
