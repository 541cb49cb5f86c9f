"""Compare: from a sweep or report folder inside the results folder, accuracy-vs-budget curves
with their confidence intervals, the Jaccard overlap of the methods' kept sets, and evidence
recall per method (all computed by ``analyses.comparison``)."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

from dashboards.views.common import pick_results_table


def accuracy_figure(curves) -> go.Figure:
    figure = go.Figure()
    for method in curves["method"].unique(maintain_order=True).to_list():
        part = curves.filter(curves["method"] == method).sort("budget_tokens")
        x, y = part["budget_tokens"].to_list(), part["accuracy"].to_list()
        high = [h - a for h, a in zip(part["ci_high"].to_list(), y)]
        low = [a - lo for lo, a in zip(part["ci_low"].to_list(), y)]
        figure.add_trace(go.Scatter(x=x, y=y, name=method, mode="lines+markers",
                                    error_y=dict(type="data", array=high, arrayminus=low, visible=True),
                                    text=part["budget"].to_list(), hovertemplate="%{text}: %{y:.3f}"))
    figure.update_layout(title="accuracy vs budget (95% Wilson interval)", xaxis_title="visual tokens kept",
                         yaxis_title="accuracy", yaxis_range=[0, 1.05], height=380,
                         margin=dict(l=10, r=10, t=40, b=10))
    return figure


def overlap_figure(overlap, budget: str) -> go.Figure:
    part = overlap.filter(overlap["budget"] == budget)
    methods = sorted(set(part["method_a"].to_list()))
    value = {(a, b): j for a, b, j in part.select("method_a", "method_b", "jaccard").iter_rows()}
    z = [[value.get((a, b)) for b in methods] for a in methods]
    figure = go.Figure(go.Heatmap(z=z, x=methods, y=methods, zmin=0, zmax=1, colorscale="Viridis",
                                  text=[[f"{v:.2f}" if v is not None else "" for v in row] for row in z],
                                  texttemplate="%{text}"))
    figure.update_layout(title=f"Jaccard overlap of kept tokens at {budget}", height=380,
                         margin=dict(l=10, r=10, t=40, b=10))
    return figure


def recall_figure(recall) -> go.Figure:
    figure = go.Figure()
    for method in recall["method"].unique(maintain_order=True).to_list():
        part = recall.filter(recall["method"] == method).sort("budget_tokens")
        figure.add_trace(go.Scatter(x=part["budget_tokens"].to_list(), y=part["recall"].to_list(), name=method,
                                    mode="lines+markers",
                                    error_y=dict(type="data", array=part["recall_sem"].fill_null(0).to_list())))
    figure.update_layout(title="evidence recall (share of evidence tokens kept, ± s.e.)",
                         xaxis_title="visual tokens kept", yaxis_title="recall", yaxis_range=[0, 1.05],
                         height=380, margin=dict(l=10, r=10, t=40, b=10))
    return figure


def render() -> None:
    from analyses import comparison

    st.header("Compare")
    picked = pick_results_table("compare")
    if picked is None:
        return
    folder, table = picked
    st.caption(f"{folder}: {table.height} rows, {table['sample_id'].n_unique()} samples")
    curves = comparison.accuracy_curves(table)
    st.plotly_chart(accuracy_figure(curves), width="stretch", key="compare_accuracy")
    with st.expander("accuracy table"):
        st.dataframe(curves, hide_index=True)
    overlap = comparison.kept_overlap(table)
    recall = comparison.evidence_recall_by_budget(table, include_unpruned=False)
    left, right = st.columns(2)
    with left:
        budgets = overlap["budget"].unique(maintain_order=True).to_list()
        if budgets:
            budget = st.selectbox("overlap at budget", budgets, key="compare_budget")
            st.plotly_chart(overlap_figure(overlap, budget), width="stretch", key="compare_overlap")
        else:
            st.info("no pruned rows to compare")
    with right:
        if recall.height:
            st.plotly_chart(recall_figure(recall), width="stretch", key="compare_recall")
            st.dataframe(recall, hide_index=True)
        else:
            st.info("no evidence annotations in these rows")
