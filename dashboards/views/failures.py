"""Failures: the samples a method gets wrong at a budget while the unpruned model is right
(``analyses.failures.failures``), one at a time with its diagnosis (``diagnose_sample``): the
evidence tokens outlined, the dropped ones highlighted, and a button that re-runs the sample with
the dropped evidence restored (``restore_plan``) to show whether the answer recovers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import streamlit as st

from dashboards import state
from dashboards.views.common import pick_results_table, show_kept, show_original, verdict
from workbench.sweep import CONTROLS


def category_notes() -> dict[str, str]:
    """What each failure category of ``analyses.failures.classify`` means, in a line."""
    from analyses import failures as f

    return {
        f.RUN_ON: "the answer starts right but does not stop (more words follow the gold answer)",
        f.EVIDENCE_KEPT: "every evidence token was kept, yet the answer was lost",
        f.OVER_MERGING: "evidence was lost, mostly merged into other tokens; restoring it recovers the answer",
        f.SINK_DISTRACTION: "evidence was lost while visual sinks without evidence took 10 % or more of the "
                            "method's top-ranked tokens; restoring the evidence recovers the answer",
        f.POSITIONAL_BIAS: "evidence was lost, the kept tokens crowd one end of the sequence and the lost evidence "
                           "sits towards the other; restoring it recovers the answer",
        f.EVIDENCE_DROPPED: "evidence was dropped; putting it back recovers the answer",
        f.OTHER: "no evidence annotated, or the evidence was put back and the answer still did not recover",
    }


def all_merges(stages_json: str) -> list:
    """Every merge of every stage of a stored plan (what the dropped tokens were folded into)."""
    from workbench.pruning.plan import Stage

    return [m for s in json.loads(stages_json) for m in Stage.from_dict(s).folds]


def sweep_dataset(folder: Path) -> str:
    """The data set a sweep ran on (its ``sweep.json``), else the default one."""
    try:
        return json.loads((state.sweep_folder(folder) / "sweep.json").read_text())["dataset"]
    except (OSError, ValueError, KeyError):
        return state.DEFAULT_DATASET


@st.cache_data(show_spinner=False, max_entries=64)
def diagnosis(model: str, dataset: str, sample_id: str, method: str, budget: str, stored_json: str):
    """The diagnosis of a stored run: its plan and answers are read from the sweep's row
    (``stored_json``); only the occlusion saliency and the restores run the model."""
    from analyses.failures import diagnose_sample
    from workbench.sweep import MethodSpec

    sample = next(s for s in state.dataset(dataset) if s.id == sample_id)
    spec = MethodSpec.parse(method)
    stored = json.loads(stored_json)
    loaded = state.load_model(model)
    with loaded.lock:
        return diagnose_sample(loaded.adapter, sample, spec.create(), budget, label=spec.label, stored=stored,
                               unpruned_answer=stored.get("unpruned_answer"))


@st.cache_data(show_spinner=False, max_entries=64)
def restored_answer(model: str, dataset: str, sample_id: str, stages: str, method: str, budget_tokens: int,
                    n_visual: int, tokens: tuple[int, ...]) -> str:
    """The sample re-run under the executed plan with ``tokens`` put back (``restore_plan``), a
    pipeline run of the restored plan."""
    from analyses.failures import restore_plan
    from workbench import pipeline
    from workbench.pruning.plan import KeepPlan, Stage

    sample = next(s for s in state.dataset(dataset) if s.id == sample_id)
    plan = KeepPlan(method, budget_tokens, n_visual, tuple(Stage.from_dict(s) for s in json.loads(stages)))
    loaded = state.load_model(model)
    with loaded.lock:
        ready = pipeline.prepare_sample(loaded.adapter, sample)
        return pipeline.run(loaded.adapter, ready, None, plan=restore_plan(plan, tokens)).generation


def render(model: str) -> None:
    from analyses.failures import failures

    st.header("Failures")
    picked = pick_results_table("failures")
    if picked is None:
        return
    folder, table = picked
    methods = sorted(m for m in table["method"].unique().to_list() if m != "unpruned" and m not in CONTROLS)
    if not methods:
        st.info("this folder holds no pruned rows")
        return
    left, right = st.columns(2)
    method = left.selectbox("method", methods, key="failures_method")
    budgets = (table.filter(table["method"] == method).select("budget", "budget_tokens").unique()
               .sort("budget_tokens")["budget"].to_list())
    budget = right.selectbox("budget", budgets, key="failures_budget")
    failed = failures(table, method, budget)
    st.markdown(f"**{failed.height}** failure(s) of {method} at {budget}: wrong where the unpruned model is right")
    if failed.height == 0:
        return
    st.dataframe(failed.select("sample_id", "question_type", "gold_answer", "unpruned_answer", "predicted_answer", "kept_count",
                               "evidence_recall"), hide_index=True)
    sample_id = st.selectbox("failure", failed["sample_id"].to_list(), key="failures_sample")
    dataset = sweep_dataset(folder)
    try:
        sample = next(s for s in state.dataset(dataset) if s.id == sample_id)
    except Exception as e:
        st.error(f"cannot open sample {sample_id!r} from {dataset!r}: {e}")
        return
    row = failed.filter(pl.col("sample_id") == sample_id).row(0, named=True)
    with st.spinner("diagnosing (occlusion saliency and restores; the plan is read from the sweep) ..."):
        d = diagnosis(model, dataset, sample_id, method, budget, json.dumps(row, default=str))
    subject = state.subject_of_sample(sample)
    layout = state.layout(model, subject.key, subject)
    evidence = np.zeros(layout.n_tokens, dtype=bool)
    evidence[list(d.evidence)] = True
    st.markdown(f"**{d.question}** · gold **{d.gold}** · unpruned {verdict(d.unpruned_answer, d.unpruned_correct)}"
                f" · pruned {verdict(d.pruned_answer, d.pruned_correct)}  \n"
                f"category: **{d.category}** · evidence {d.n_evidence} tokens, {len(d.lost_evidence)} dropped"
                f" ({len(d.merged_evidence)} merged away) · {len(d.kept)} kept")
    notes = category_notes()
    st.caption(f"**{d.category}**: {notes.get(d.category, '')}")
    original, picture, facts = st.columns([2, 2, 3])
    with original:
        show_original(subject, 300)
    with picture:
        show_kept(subject, layout, d.kept, "kept tokens; evidence outlined (green kept, red dropped)",
                  merges=all_merges(d.stages), evidence=evidence, width=300)
    with facts:
        if d.lost_evidence:
            # the occlusion rank first: how much the answer needed the token, beside the method's rank of it
            st.dataframe(pl.DataFrame({"dropped evidence token": d.lost_evidence,
                                       "rank under occlusion": d.saliency_ranks,
                                       "rank under the method": d.method_ranks,
                                       "tokens ranked": d.method_ranked, "removed at": d.lost_stage}),
                         hide_index=True)
        flags = [name.removeprefix("flag_").replace("_", " ") for name, on in d.flags.items() if on]
        st.caption("flags: " + (", ".join(flags) if flags else "none"))
        with st.expander("what the categories mean"):
            st.markdown("\n".join(f"- **{name}**: {text}" for name, text in notes.items()))
    if not d.lost_evidence:
        st.info("no evidence token was dropped: the answer was lost with its evidence kept")
        return
    if st.button("re-run with the dropped evidence restored", key="failures_restore"):
        with st.spinner("re-running ..."):
            answer = restored_answer(model, dataset, sample_id, d.stages, method, d.budget_tokens, d.n_visual,
                                     tuple(d.lost_evidence))
        recovered = subject.is_correct(answer)
        message = f"with the {len(d.lost_evidence)} dropped evidence token(s) restored: {verdict(answer, recovered)}"
        (st.success if recovered else st.warning)(message + (" — the answer recovers" if recovered
                                                             else " — the answer does not recover"))
        restored = sorted(set(d.kept) | set(d.lost_evidence))
        show_kept(subject, layout, restored, "kept tokens after the restore", evidence=evidence, width=300)
