"""Methods: what each pruning method keeps at one budget, the score map that ranked the tokens, the
answer the pruned model gives and what it costs (visual tokens per decoder layer, prefill FLOPs).
Methods are grouped and coloured by what scores their tokens (``analyses.method_style``) and laid
out a fixed number per row, so twenty of them read as well as two."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go
import polars as pl
import streamlit as st

from analyses.method_style import ordered, styles
from dashboards import state
from workbench import overlay
from dashboards.views.common import show_heatmap, show_kept, verdict

DEFAULT_METHODS = ("fastv", "uniform_grid")
PER_ROW = 4  # methods side by side: wide enough for a name and a 240 px image at any method count
IMAGE_WIDTH = 240


def describe(where) -> str:
    from workbench.pruning.plan import describe_where

    return describe_where(where)


KEPT_SCHEMA = {"method": pl.String, "scored by": pl.String, "kept tokens": pl.Int64, "stages": pl.Int64,
               "effective tokens": pl.Float64, "FLOPs (x unpruned)": pl.Float64, "answer": pl.String,
               "correct": pl.Boolean, "note": pl.String}


def kept_table(runs) -> pl.DataFrame:
    # the schema is explicit: a column that is all None (every method failed) still gets its type
    style = styles(r.method for r in runs)
    return pl.DataFrame([{"method": r.method, "scored by": style[r.method].group_label,
                          "kept tokens": r.kept_count if r.error is None else None,
                          "stages": len(r.plan.stages) if r.plan is not None else 0,
                          "effective tokens": r.effective_tokens,
                          "FLOPs (x unpruned)": round(r.flops_ratio, 3) if r.flops_ratio is not None else None,
                          "answer": r.answer, "correct": r.correct, "note": r.error or ""} for r in runs],
                        schema=KEPT_SCHEMA)


def tokens_per_layer_figure(runs) -> go.Figure:
    """Visual tokens each decoder layer runs on, per method: where the cost is saved."""
    style = styles(r.method for r in runs)
    figure = go.Figure()
    for run in runs:
        if run.error is None and run.visual_tokens_per_layer:
            s = style[run.method]
            figure.add_trace(go.Scatter(x=list(range(len(run.visual_tokens_per_layer))),
                                        y=list(run.visual_tokens_per_layer), name=run.method, mode="lines+markers",
                                        line=dict(color=s.colour), marker=dict(symbol=s.marker, size=8),
                                        legendgroup=s.group_label, legendgrouptitle_text=s.group_label))
    figure.update_layout(title="visual tokens per decoder layer (the efficiency axis)", height=360,
                         xaxis=dict(title="decoder layer", tickmode="linear", dtick=1), yaxis_title="visual tokens",
                         margin=dict(l=10, r=10, t=40, b=10), legend=dict(font=dict(size=10), groupclick="toggleitem"))
    return figure


def run_all(model: str, subject, methods: list[str], budget: int) -> list:
    """Each method's run, with a progress bar (a run of many methods takes seconds)."""
    runs = []
    bar = st.progress(0.0, text=f"running {len(methods)} method(s) ...")
    for i, method in enumerate(methods):
        bar.progress(i / len(methods), text=f"running {method} ({i + 1} of {len(methods)}) ...")
        runs.append(state.method_run(model, subject.key, method, budget, subject))
    bar.empty()
    return runs


def method_cell(subject, layout, run, style, evidence, shared) -> None:
    st.markdown(f"<div style='white-space:nowrap;overflow:hidden;text-overflow:ellipsis;font-weight:700;"
                f"font-size:1.1rem;border-left:6px solid {style.colour};padding-left:6px' "
                f"title='{html.escape(run.method)}'>{html.escape(run.method)}</div>", unsafe_allow_html=True)
    st.caption(f"scored by: {style.group_label}")
    if run.error is not None:
        st.warning(run.error)
        return
    cost = f" · {run.flops_ratio:.2f}x FLOPs" if run.flops_ratio is not None else ""
    st.markdown(f"answer: {verdict(run.answer, run.correct)} · **{run.kept_count}** kept{cost}")
    stages = run.plan.stages
    if not stages:
        st.caption("keeps every token")
        return
    last = stages[-1]
    show_kept(subject, layout, last.kept, f"{describe(last.where)}: {len(last.kept)} kept"
              + (f", {len(last.folds)} merges" if last.folds else ""), merges=last.folds, evidence=evidence,
              width=IMAGE_WIDTH)
    scored = [s for s in stages if s.scores is not None]
    if scored:
        stage = scored[-1]
        unscored = " (grey: not scored at this stage)" if np.isnan(np.asarray(stage.score_array, float)).any() else ""
        show_heatmap(subject, layout, stage.score_array, f"score map {describe(stage.where)}{unscored}",
                     width=IMAGE_WIDTH, colour_scale=shared)
    if len(stages) > 1:
        with st.expander(f"all {len(stages)} stages"):
            for stage in stages[:-1]:
                show_kept(subject, layout, stage.kept, f"{describe(stage.where)}: {len(stage.kept)} kept",
                          merges=stage.folds, evidence=evidence, width=IMAGE_WIDTH)


def render(model: str, subject) -> None:
    from workbench.pruning.registry import available_methods

    st.header("Methods")
    layout = state.layout(model, subject.key, subject)
    n = layout.n_tokens
    budget = st.slider("budget (visual tokens kept)", 1, n, max(1, round(n * 0.25)), key="methods_budget")
    st.caption(f"{budget} of {n} visual tokens ({budget / n:.0%})")
    every = st.checkbox("every method", key="methods_every")
    if every:
        methods = available_methods()
    else:
        methods = st.multiselect("methods", available_methods(), default=list(DEFAULT_METHODS), key="methods_chosen")
    if not methods:
        st.info("pick one or more methods")
        return
    methods = ordered(methods)  # grouped by what scores their tokens
    evidence = state.evidence_tokens(layout, subject)
    runs = run_all(model, subject, methods, budget)
    style = styles(methods)
    st.subheader("kept tokens and cost per method")
    st.dataframe(kept_table(runs), hide_index=True)
    st.plotly_chart(tokens_per_layer_figure(runs), key="methods_tokens_per_layer")
    shared = None
    if st.checkbox("one colour scale for every score map", key="methods_shared_scale"):
        arrays = [s.score_array for r in runs if r.plan is not None for s in r.plan.stages if s.scores is not None]
        if arrays:
            finite = [np.asarray(a, dtype=float) for a in arrays]
            signed = any(np.nanmin(a) < 0 for a in finite if np.isfinite(a).any())
            shared = overlay.value_scale(None, signed=signed, over=finite)
    if subject.gold is not None:
        st.caption(f"gold answer: {subject.gold}; each method's last stage is drawn with its key; the score map is "
                   "the last ranking stage's")
    for start in range(0, len(runs), PER_ROW):
        columns = st.columns(PER_ROW)
        for column, run in zip(columns, runs[start:start + PER_ROW]):
            with column:
                method_cell(subject, layout, run, style[run.method], evidence, shared)
