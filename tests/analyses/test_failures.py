"""Failure diagnosis on cases whose answer is known: hand-made plans and tables for the rank,
restore and taxonomy rules, and plans built on the trained shipped model that drop, merge or keep
exactly the evidence tokens of a sample."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest
import torch

from analyses import failures as F
from workbench.scoring import normalize_answer
from workbench.pruning.executor import execute
from workbench.pruning.method import PruningMethod, SelectionContext
from workbench.pruning.plan import PRE_LLM, Append, KeepPlan, Merge, Stage
from workbench.sweep import frame

torch.set_num_threads(1)


# --- test-only methods (not registered): a fixed plan, or a fixed stage chosen by the callback ---------

@dataclass(frozen=True)
class FixedPlan(PruningMethod):
    """Keeps ``kept`` before the LLM, folding ``merges`` (target, sources) in; optional scores."""

    kept: tuple[int, ...] = ()
    merges: tuple[tuple[int, tuple[int, ...]], ...] = ()
    scores: tuple[float, ...] | None = None
    name = "fixed"

    def select(self, context: SelectionContext) -> KeepPlan:
        merges = tuple(Merge.mean(t, s) for t, s in self.merges)
        return self.plan(context, [Stage(PRE_LLM, self.kept, self.scores, merges)])


@dataclass(frozen=True)
class CallbackDrop(PruningMethod):
    """Plans nothing; its layer callback keeps ``kept`` before decoder layer ``layer``."""

    kept: tuple[int, ...] = ()
    layer: int = 1
    name = "callback-drop"

    def select(self, context: SelectionContext) -> KeepPlan:
        return self.plan(context, [])

    def layer_callback(self, context: SelectionContext):
        return lambda layer, state: Stage(layer, self.kept) if layer == self.layer else None


# --- (d) ranks, plans and rules on hand-made inputs ------------------------------------------------------

def test_ranks_are_descending_nan_safe_and_share_ties():
    values = [3.0, math.nan, 5.0, 3.0, -math.inf, 1.0]
    r = F.ranks(values)
    assert r[2] == 1 and r[0] == r[3] == 2 and r[5] == 4
    assert math.isnan(r[1]) and math.isnan(r[4])
    among = [True, True, False, True, True, True]
    r = F.ranks(values, among)
    assert math.isnan(r[2]) and r[0] == r[3] == 1 and r[5] == 3
    r = F.ranks(values, descending=False)
    assert r[5] == 1 and r[0] == r[3] == 2 and r[2] == 4
    assert np.isnan(F.ranks([math.nan, math.nan])).all()


def two_stage_plan() -> KeepPlan:
    """8 tokens. Pre-LLM keeps the 6 highest-scored (drops 1 and 4), token 6 unscored; before
    layer 2 a low-score-keeping stage keeps 0, 2, 3 and merges 7 into 3."""
    pre = (5.0, 1.0, 6.0, 7.0, 0.5, 4.0, math.nan, 3.0)
    late = (0.1, math.nan, 0.2, 0.3, math.nan, 0.9, 0.8, 0.7)  # low = favoured
    return KeepPlan("hand", 3, 8, (Stage(PRE_LLM, (0, 2, 3, 5, 6, 7), pre),
                                   Stage(2, (0, 2, 3), late, (Merge.mean(3, (7,)),))))


def test_method_ranks_come_from_the_removing_stage_in_its_own_direction():
    plan = two_stage_plan()
    assert F.removing_stage(plan, 4) == 0 and F.removing_stage(plan, 7) == 1 and F.removing_stage(plan, 0) is None
    assert F.stage_direction(plan, 0) is True and F.stage_direction(plan, 1) is False
    r = F.method_ranks(plan, [1, 4, 7, 5, 6, 0])
    # stage 0 ranks the 7 scored tokens descending: 1.0 is 6th, 0.5 is 7th
    assert r[0] == 6 and r[1] == 7
    # stage 1 ranks the 6 tokens that entered it (0, 2, 3, 5, 6, 7) ascending
    assert r[2] == 4 and r[3] == 6  # 0.7 is 4th lowest of (0.1,0.2,0.3,0.9,0.8,0.7); 0.9 is 6th
    assert r[4] == 5 and math.isnan(r[5])  # 6 is scored by stage 1 (0.8); 0 survives
    assert F.top_ranked(plan, 1).tolist() == [0, 2, 3]
    assert F.top_ranked(plan, 0).tolist() == [3, 2, 0, 5, 7, 1]
    unscored = KeepPlan("u", 2, 4, (Stage(PRE_LLM, (0, 1)),))
    assert math.isnan(F.method_ranks(unscored, [3])[0]) and len(F.top_ranked(unscored, 0)) == 0


def test_restore_plan_puts_tokens_back_into_every_stage_and_removes_their_merges():
    plan = two_stage_plan()
    restored = F.restore_plan(plan, [7, 4])
    assert restored.stages[0].kept == (0, 2, 3, 4, 5, 6, 7)
    assert restored.stages[1].kept == (0, 2, 3, 4, 7) and restored.stages[1].merges == ()
    assert restored.stages[1].where == 2 and restored.stages[1].scores == plan.stages[1].scores
    other = F.restore_plan(plan, [5])  # a merge not touching the restored token stays
    assert other.stages[1].merges == plan.stages[1].merges and other.final_kept == (0, 2, 3, 5)
    assert F.restore_plan(plan, []) is plan
    # an appended token (SparseVLM's recycled cluster) made with a restored token goes the same way
    appended = KeepPlan("a", 2, 6, (Stage(1, (0, 2, 3), appends=(Append(2, (1,), (.5, .5)), Append(3, (4,), (.5, .5)))),))
    assert F.restore_plan(appended, [1]).stages[0].appends == (Append(3, (4,), (.5, .5)),)
    assert [m.target for m in appended.stages[0].folds] == [2, 3]  # what the views draw as merged


def test_position_and_sink_rules():
    # 11 tokens, q = 0, .1, ..., 1: kept in the last rows, lost evidence at the top
    skew, offset = F.position_metrics(11, [8, 9, 10], [0, 1])
    assert skew == pytest.approx(0.4) and offset == pytest.approx(-0.85)
    assert F.positional_flag(skew, offset)
    assert not F.positional_flag(*F.position_metrics(11, [8, 9, 10], [7]))  # gap 0.2 < 0.25
    assert not F.positional_flag(*F.position_metrics(11, [4, 5, 6], [0]))  # kept set centred
    assert not F.positional_flag(*F.position_metrics(11, [0, 1, 2], [1]))  # evidence on the kept side
    assert not F.positional_flag(*F.position_metrics(11, [1], []))
    sinks = np.array([30.0, 0, 0, 25.0, 0, 0])
    evidence = np.array([False, False, False, True, False, False])
    assert F.sink_metrics([0, 3, 1, 2], sinks, evidence, 20.0) == (1, 0.25)  # 3 is a sink with evidence
    assert F.sink_metrics([1, 2], sinks, evidence, 20.0) == (0, 0.0)
    assert F.sink_metrics([], sinks, evidence, 20.0)[0] == 0 and math.isnan(F.sink_metrics([1], None, evidence, 1)[1])
    assert F.default_sink_tau(4096) == 20.0 and F.default_sink_tau(1024) == 10.0


@pytest.mark.parametrize("facts, category, flags", [
    (dict(pruned_correct=True, n_evidence=3, n_lost=3, n_merged=0, restore_recovers=True), F.NOT_A_FAILURE,
     {"flag_evidence_dropped"}),
    (dict(pruned_correct=False, n_evidence=3, n_lost=0, n_merged=0, restore_recovers=None), F.EVIDENCE_KEPT,
     {"flag_evidence_kept"}),
    (dict(pruned_correct=False, n_evidence=0, n_lost=0, n_merged=0, restore_recovers=None), F.OTHER, set()),
    (dict(pruned_correct=False, n_evidence=4, n_lost=4, n_merged=0, restore_recovers=True), F.EVIDENCE_DROPPED,
     {"flag_evidence_dropped"}),
    (dict(pruned_correct=False, n_evidence=4, n_lost=4, n_merged=0, restore_recovers=False), F.OTHER, set()),
    (dict(pruned_correct=False, n_evidence=4, n_lost=4, n_merged=3, restore_recovers=True), F.OVER_MERGING,
     {"flag_evidence_dropped", "flag_over_merging"}),
    (dict(pruned_correct=False, n_evidence=4, n_lost=4, n_merged=2, restore_recovers=True), F.EVIDENCE_DROPPED,
     {"flag_evidence_dropped", "flag_over_merging"}),  # half merged: not a majority
    (dict(pruned_correct=False, n_evidence=4, n_lost=2, n_merged=0, restore_recovers=True,
          kept_position_skew=0.3, evidence_position_offset=-0.5), F.POSITIONAL_BIAS,
     {"flag_evidence_dropped", "flag_positional_bias"}),
    (dict(pruned_correct=False, n_evidence=4, n_lost=2, n_merged=0, restore_recovers=False,
          kept_position_skew=0.3, evidence_position_offset=-0.5), F.OTHER, {"flag_positional_bias"}),
    (dict(pruned_correct=False, n_evidence=4, n_lost=2, n_merged=0, restore_recovers=True,
          kept_position_skew=0.3, evidence_position_offset=-0.5, sink_share_top=0.2), F.SINK_DISTRACTION,
     {"flag_evidence_dropped", "flag_positional_bias", "flag_sink_distraction"}),
    (dict(pruned_correct=False, n_evidence=4, n_lost=2, n_merged=0, restore_recovers=True,
          sink_share_top=0.05), F.EVIDENCE_DROPPED, {"flag_evidence_dropped"}),
    (dict(pruned_correct=False, n_evidence=4, n_lost=0, n_merged=0, restore_recovers=None,
          kept_position_skew=0.3, evidence_position_offset=-0.5, sink_share_top=0.5), F.EVIDENCE_KEPT,
     {"flag_evidence_kept"}),  # sink/positional need lost evidence
])
def test_taxonomy_rules(facts, category, flags):
    got, got_flags = F.classify(**facts)
    assert got == category
    assert {k for k, v in got_flags.items() if v} == flags


def test_taxonomy_counts_every_category():
    rows = [{"category": c, **{f: f == F.FLAG_OF.get(c) for f in F.FLAGS}}
            for c in [F.EVIDENCE_DROPPED, F.EVIDENCE_DROPPED, F.OVER_MERGING, F.OTHER, F.NOT_A_FAILURE]]
    rows[2]["flag_evidence_dropped"] = True
    table = F.taxonomy(F.diagnosis_frame(rows))
    assert table["category"].to_list() == list(F.CATEGORIES)
    got = {r["category"]: r for r in table.iter_rows(named=True)}
    assert got[F.EVIDENCE_DROPPED]["count"] == 2 and got[F.EVIDENCE_DROPPED]["share"] == 0.5
    assert got[F.EVIDENCE_DROPPED]["flagged"] == 3 and got[F.OVER_MERGING]["share"] == 0.25
    assert got[F.OTHER]["flagged"] == 1 and got[F.SINK_DISTRACTION]["count"] == 0
    assert table["share"].sum() == pytest.approx(1.0)
    empty = F.taxonomy(F.diagnosis_frame([]))
    assert empty["count"].sum() == 0 and empty["share"].null_count() == len(F.CATEGORIES)


# --- (e) failures() on a hand-made sweep table ---------------------------------------------------------

def sweep_row(sample, method, budget, correct, status="ok", answer=None):
    return {"sample_id": sample, "method": method, "budget": budget, "status": status,
            "correct": correct if status == "ok" else None, "predicted_answer": answer or ("right" if correct else "wrong"),
            "gold_answer": "right"}


def test_failures_picks_pruned_wrong_where_unpruned_right():
    rows = [sweep_row(s, "unpruned", "100%", ok) for s, ok in [("a", True), ("b", True), ("c", False), ("d", True)]]
    rows += [sweep_row("a", "fastv", "25%", False), sweep_row("b", "fastv", "25%", True),
             sweep_row("c", "fastv", "25%", False), sweep_row("d", "fastv", "25%", False),
             sweep_row("a", "fastv", "50%", False), sweep_row("b", "random", "25%", False),
             sweep_row("d", "fastv(layer=3)", "25%", False),
             sweep_row("e", "fastv", "25%", None, status="not_applicable")]
    table = frame(rows)
    got = F.failures(table, "fastv", "25%")
    assert got["sample_id"].to_list() == ["a", "d"]
    assert got["unpruned_answer"].to_list() == ["right", "right"] and set(got["budget"]) == {"25%"}
    assert F.failures(table, "fastv", 0.25)["sample_id"].to_list() == ["a", "d"]  # a Budget works too
    assert F.failures(table, "fastv", 0.5)["sample_id"].to_list() == ["a"]
    assert F.failures(table, "random", "50%").height == 0
    assert F.parse_budget("25%") == 0.25 and F.parse_budget("64") == 64 and F.parse_budget(0.5) == 0.5


# --- (a, b, c) constructed cases on the trained shipped model ---------------------------------------------

@pytest.fixture(scope="module")
def trained():
    from workbench.models.loading import load

    return load("shapes-vlm")


@functools.lru_cache(maxsize=None)
def _samples():
    from workbench.samples import read_dataset

    return read_dataset("data/eval/samples.jsonl", limit=24)


def _right(answer, sample) -> bool:
    return normalize_answer(answer) == normalize_answer(sample.answer)


def find_case(adapter, method_for, limit=24, run_on=False):
    """The first sample (data set order) with evidence that the unpruned model answers right and
    that ``method_for(evidence, rest)`` gets wrong, with that method: with a run-on answer (the
    gold answer, then more words) when ``run_on``, else with any other."""
    for sample in _samples()[:limit]:
        prepared = adapter.prepare(sample.load_image(), sample.question)
        layout = prepared.layout
        evidence = layout.evidence_tokens(sample.evidence_mask())
        if not evidence.any() or evidence.all():
            continue
        n = layout.n_tokens
        if not _right(execute(adapter, prepared, KeepPlan.keep_all(n, where=None)).answer, sample):
            continue
        method = method_for(np.flatnonzero(evidence), np.flatnonzero(~evidence))
        context = SelectionContext(layout, n)
        pruned = execute(adapter, prepared, method.select(context), callback=method.layer_callback(context))
        if not _right(pruned.answer, sample) and F.runs_on(pruned.answer, sample.answer) == run_on:
            return sample, method, prepared
    pytest.fail("no sample in the first samples of the eval set fits the constructed case")


def drop_evidence(evidence, rest):
    return FixedPlan(kept=tuple(int(i) for i in rest))


def test_dropping_exactly_the_evidence_is_diagnosed_as_evidence_dropped(trained):
    sample, method, prepared = find_case(trained, drop_evidence)
    diagnosis = F.diagnose_sample(trained, sample, method, len(method.kept))
    evidence = np.flatnonzero(prepared.layout.evidence_tokens(sample.evidence_mask()))
    assert diagnosis.unpruned_correct and not diagnosis.pruned_correct
    assert diagnosis.saliency_answer == sample.answer  # occlusion scores the gold answer
    assert diagnosis.lost_evidence == diagnosis.evidence == tuple(evidence.tolist())
    assert diagnosis.merged_evidence == () and set(diagnosis.lost_stage) == {PRE_LLM}
    assert diagnosis.evidence_restore_recovers is True and _right(diagnosis.evidence_restore_answer, sample)
    assert diagnosis.category == F.EVIDENCE_DROPPED
    assert diagnosis.flags["flag_evidence_dropped"] and not diagnosis.flags["flag_over_merging"]
    # the method has no scores: its ranks are NaN; saliency ranks every lost token among all N
    assert all(math.isnan(r) for r in diagnosis.method_ranks)
    assert all(1 <= r <= diagnosis.n_visual for r in diagnosis.saliency_ranks)
    # the saliency control restores as many dropped tokens, and all dropped tokens are evidence here
    assert diagnosis.saliency_restored == diagnosis.lost_evidence and diagnosis.saliency_restore_recovers
    row = diagnosis.to_row()
    assert set(row) == set(F.DIAGNOSIS_SCHEMA) and row["category"] == F.EVIDENCE_DROPPED
    assert row["n_lost_evidence"] == len(evidence) and row["evidence_recall"] == 0.0

    # the same sample through ``diagnose`` and a hand-made sweep table, with precomputed saliency
    table = frame([sweep_row(sample.id, "unpruned", "100%", True, answer=sample.answer),
                   sweep_row(sample.id, "fixed", str(len(method.kept)), False, answer=diagnosis.pruned_answer)])
    out = F.diagnose(trained, [sample], table, method, str(len(method.kept)), progress=False)
    assert out.height == 1 and out["category"].to_list() == [F.EVIDENCE_DROPPED]
    assert out["sweep_answer"][0] == out["pruned_answer"][0] == diagnosis.pruned_answer
    assert F.taxonomy(out).filter(pl.col("category") == F.EVIDENCE_DROPPED)["share"][0] == 1.0


def test_an_in_llm_drop_is_restored_into_the_stage_that_made_it(trained):
    sample, method, prepared = find_case(trained, lambda e, rest: CallbackDrop(kept=tuple(int(i) for i in rest)))
    n = prepared.layout.n_tokens
    diagnosis = F.diagnose_sample(trained, sample, method, n, saliency=np.zeros(n))
    assert set(diagnosis.lost_stage) == {"1"} and diagnosis.category == F.EVIDENCE_DROPPED
    # the executed plan, replayed without the callback, is what the method ran
    context = SelectionContext(prepared.layout, n)
    live = execute(trained, prepared, method.select(context), callback=method.layer_callback(context))
    assert live.plan.stages[0].where == 1
    assert execute(trained, prepared, live.plan).answer_ids == live.answer_ids


def test_an_answer_that_does_not_stop_is_a_run_on_not_lost_evidence(trained):
    sample, method, prepared = find_case(trained, lambda e, rest: FixedPlan(kept=tuple(int(i) for i in e)),
                                         run_on=True)
    diagnosis = F.diagnose_sample(trained, sample, method, len(method.kept),
                                  saliency=np.zeros(prepared.layout.n_tokens))
    words = F.normalize_answer(diagnosis.pruned_answer).split()
    assert words[0] == F.normalize_answer(sample.answer) and len(words) > 1
    assert diagnosis.category == F.RUN_ON and diagnosis.flags["flag_run_on"]
    assert not F.runs_on(sample.answer, sample.answer)  # the answer alone is not a run-on
    assert not F.runs_on("zzz " + diagnosis.pruned_answer, sample.answer)  # nor one that starts otherwise


def test_keeping_all_evidence_and_still_failing(trained):
    # keep only the evidence tokens: on some samples (counting, relations) the model needs context
    sample, method, prepared = find_case(trained, lambda e, rest: FixedPlan(kept=tuple(int(i) for i in e)))
    diagnosis = F.diagnose_sample(trained, sample, method, len(method.kept),
                                  saliency=np.zeros(prepared.layout.n_tokens))
    assert diagnosis.lost_evidence == () and diagnosis.n_evidence > 0
    assert diagnosis.evidence_restore_answer is None and diagnosis.evidence_restore_recovers is None
    assert diagnosis.category == F.EVIDENCE_KEPT and diagnosis.flags["flag_evidence_kept"]


def merge_evidence(evidence, rest):
    """Every evidence token folded into the non-evidence token nearest their centre (sequence order)."""
    target = int(rest[np.argmin(np.abs(rest - evidence.mean()))])
    return FixedPlan(kept=tuple(int(i) for i in rest), merges=((target, tuple(int(i) for i in evidence)),))


def test_merging_the_evidence_away_is_diagnosed_as_over_merging(trained):
    sample, method, prepared = find_case(trained, merge_evidence)
    diagnosis = F.diagnose_sample(trained, sample, method, len(method.kept),
                                  saliency=np.zeros(prepared.layout.n_tokens))
    assert diagnosis.merged_evidence == diagnosis.lost_evidence == diagnosis.evidence
    assert diagnosis.evidence_restore_recovers is True
    assert diagnosis.category == F.OVER_MERGING and diagnosis.flags["flag_over_merging"]


def test_diagnosis_scores_with_every_reference_and_option():
    """Correctness in the diagnosis is the sample's own scoring: all its references and options,
    not the single majority answer."""
    from pathlib import Path

    from workbench.samples import Sample
    choice = Sample("q", Path("x.png"), "Which animal?", answer="B", scorer="multiple_choice",
                    options=("dog", "cat", "bird"))
    assert F._correct("It is a cat.", choice)  # names option B's text
    assert not F._correct("It is a bird.", choice)
    vqa = Sample("v", Path("x.png"), "What colour?", answer="red", scorer="vqa_soft",
                 references=("blue",) * 4 + ("red",) * 3 + ("green",) * 3)
    assert F._correct("blue", vqa)  # four annotators said blue: full credit though "red" is stored
    assert not F._correct("green", vqa)  # three of ten: 0.9 soft credit, not right
