"""Methods: what each pruning method keeps at one budget, stage by stage, the score map that ranked
the tokens, and the answer the pruned model gives."""

from __future__ import annotations

import polars as pl
import streamlit as st

from dashboards import state
from dashboards.views.common import show_heatmap, show_kept, verdict

DEFAULT_METHODS = ("fastv", "uniform_grid")


def describe(where) -> str:
    from workbench.pruning.plan import describe_where

    return describe_where(where)


KEPT_SCHEMA = {"method": pl.String, "kept tokens": pl.Int64, "stages": pl.Int64, "answer": pl.String,
               "correct": pl.Boolean, "note": pl.String}


def kept_table(runs) -> pl.DataFrame:
    # the schema is explicit: a column that is all None (every method failed) still gets its type
    return pl.DataFrame([{"method": r.method, "kept tokens": r.kept_count if r.error is None else None,
                          "stages": len(r.plan.stages) if r.plan is not None else 0,
                          "answer": r.answer, "correct": r.correct, "note": r.error or ""} for r in runs],
                        schema=KEPT_SCHEMA)


def render(model: str, subject) -> None:
    from workbench.pruning.registry import available_methods

    st.header("Methods")
    layout = state.layout(model, subject.key, subject)
    n = layout.n_tokens
    budget = st.slider("budget (visual tokens kept)", 1, n, max(1, round(n * 0.25)), key="methods_budget")
    st.caption(f"{budget} of {n} visual tokens ({budget / n:.0%})")
    methods = st.multiselect("methods", available_methods(), default=list(DEFAULT_METHODS), key="methods_chosen")
    if not methods:
        st.info("pick one or more methods")
        return
    evidence = state.evidence_tokens(layout, subject)
    runs = []
    with st.spinner("running the pruned model ..."):
        for method in methods:
            runs.append(state.method_run(model, subject.key, method, budget, subject))
    st.subheader("kept tokens per method")
    st.dataframe(kept_table(runs), hide_index=True)
    if subject.gold is not None:
        st.caption(f"gold answer: {subject.gold}; evidence tokens outlined green where the sample has them")
    columns = st.columns(len(runs))
    for column, run in zip(columns, runs):
        with column:
            st.markdown(f"#### {run.method}")
            if run.error is not None:
                st.warning(run.error)
                continue
            st.markdown(f"answer: {verdict(run.answer, run.correct)} · **{run.kept_count}** kept")
            stages = run.plan.stages
            if not stages:
                st.caption("keeps every token")
            for stage in stages:
                show_kept(subject, layout, stage.kept, f"{describe(stage.where)}: {len(stage.kept)} kept"
                          + (f", {len(stage.merges)} merges" if stage.merges else ""),
                          merges=stage.merges, evidence=evidence, width=256)
                if stage.scores is not None:
                    show_heatmap(subject, layout, stage.score_array, f"score map {describe(stage.where)}", width=256)
