"""Why a pruning method fails on a sample: which evidence it lost, how it ranked it, and whether
putting it back fixes the answer.

For one method at one budget, ``failures`` lists the samples of a sweep where the unpruned model
is right and the pruned one wrong; ``diagnose_sample`` opens one of them up:

1. **The plan, re-derived.** ``method.select`` on a recording of the method's needs (the same pure
   selection the sweep ran) and ``execute`` with the method's layer callback; the *executed* plan
   (``Execution.plan``: every stage applied, the callback's included) is what everything below
   reads, so in-LLM methods are diagnosed on the stages they actually chose.
2. **Evidence.** ``layout.evidence_tokens(sample.evidence_mask())`` (as the sweep's
   ``evidence_recall``). *Lost* evidence: evidence tokens not in the final kept set. *Merged*
   evidence: lost tokens that the stage which removed them folded into a kept token (a merge
   source); *discarded* evidence: lost and not merged.
3. **Ranks** of each lost evidence token (1 = the most favoured; ties share the best rank; NaN
   where a token has no finite score):
   * under the method's own score: ``Stage.scores`` of the stage that removed it, among the tokens
     alive when that stage ran and scored by it. The direction is the stage's own: descending
     unless the tokens the stage kept have a lower mean score than the ones it dropped (a method
     that keeps low scores), then ascending. NaN for stages without scores.
   * under saliency: ``occlusion`` (k = 1) of every visual token, computed once per sample on the
     UNPRUNED model, scoring the GOLD answer (the sample's ``answer``; the unpruned model's greedy
     answer only when the sample has none). Gold, not the model's own answer, because the
     question is which tokens the correct answer needs; on a failure (unpruned right) the two
     agree up to ``normalize_answer``. Ranked descending among all N tokens.
4. **Counterfactual restores** (``restore_plan``), both executed without any callback:
   * *evidence restore*: every stage of the executed plan keeps ``kept ∪ lost evidence``, and
     every merge with a lost evidence token among its sources is removed (the target keeps its
     own state). A token removed by an in-LLM stage is thereby put back into exactly the stage
     that removed it (the earlier stages already kept it).
   * *saliency restore*: the same number of dropped tokens (not in the final kept set, evidence
     or not), the ones with the highest occlusion, restored the same way. A control: does
     restoring *the evidence* matter more than restoring the same number of tokens the model's
     own saliency likes?
   Each records its answer and whether it recovers the gold answer (by the data set's scorer).

The taxonomy (``classify``): every sample gets flags, and one primary category, the first of
these that applies:

====  ===================================  ================================================================
 #    primary category                     rule
====  ===================================  ================================================================
 0    "not a failure"                      the pruned answer is correct (only if asked about such a sample)
 0b   "run-on answer"                      the pruned generation begins with the gold answer but does not
                                           stop after it (more words follow): a failure to end the answer,
                                           kept apart from losing the evidence
 1    "answer lost despite evidence kept"  the sample has evidence tokens and none was lost
 2    "over-merging"                       evidence was lost, the evidence restore recovers, and more than
                                           half of the lost evidence tokens were merged away
 3    "sink distraction"                   evidence restore recovers and the sink flag is set
 4    "positional bias"                    evidence restore recovers and the positional flag is set
 5    "evidence dropped"                   evidence restore recovers
 6    "other"                              anything else (no evidence annotated; evidence lost but putting
                                           it back does not recover the answer)
====  ===================================  ================================================================

The flags (each independent of the others):

* ``flag_run_on``: the pruned generation begins with the gold answer and more words follow it.
* ``flag_evidence_kept``: n_evidence > 0 and no evidence lost.
* ``flag_evidence_dropped``: some lost evidence was discarded (not merged) and the evidence restore
  recovers.
* ``flag_over_merging``: some lost evidence was merged away and the evidence restore recovers.
* ``flag_positional_bias``: evidence was lost and the kept set sits on the other side of the
  sequence from it. With q_i = i / (N - 1) the normalised sequence position of visual token i
  (for a single row-major grid: its image row, top = 0), ``kept_position_skew`` = mean q over the
  final kept set - mean q over all N tokens, and ``evidence_position_offset`` = mean q over the
  lost evidence - mean q over the final kept set. Set when |skew| >= ``POSITION_SKEW`` (0.15),
  |offset| >= ``POSITION_GAP`` (0.25) and the offset points the other way from the skew (kept
  tokens crowd one end of the sequence, the lost evidence sits towards the other). Under a
  uniformly random kept set the skew is ~0 (0.04 standard deviation for 36 of 144).
* ``flag_sink_distraction``: evidence was lost and the method's top-ranked tokens are taken up by
  visual sinks that hold no evidence. The top-ranked tokens: of the first stage that removed lost
  evidence and has scores, the m best-ranked tokens (its direction, as for the ranks), m = the
  number that stage kept. A visual sink: ``visual_sink_score`` (max over the recorded LLM layers,
  on the unpruned forward) >= ``sink_tau`` (default ``20 * sqrt(D / 4096)``, D the decoder's
  hidden size: the VAR threshold scaled as ``probes/sinks.py`` advises). Set when the non-evidence
  sinks make up at least ``SINK_SHARE`` (10%) of the top-ranked tokens. Methods that rank nothing
  (no stage scores) never get it.

Flags are diagnostics; a primary category other than "answer lost despite evidence kept" and
"other" is given only when the causal test (the evidence restore) confirms that the lost evidence
was the problem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import polars as pl
from scipy.stats import rankdata
from tqdm import tqdm

from workbench.models.base import ModelAdapter
from workbench.pruning.budget import Budget, resolve_budget
from workbench import pipeline
from workbench.pipeline import UNPRUNED, budget_label, plan_from_row, plan_json, prepare_sample
from workbench.pruning.method import PruningMethod
from workbench.pruning.plan import KeepPlan, Stage, boxed
from workbench.samples import Sample
from workbench.scoring import normalize_answer
from workbench.sweep import MethodSpec

# --- the taxonomy's names and thresholds -------------------------------------------------------------

NOT_A_FAILURE = "not a failure"
RUN_ON = "run-on answer"
EVIDENCE_KEPT = "answer lost despite evidence kept"
OVER_MERGING = "over-merging"
SINK_DISTRACTION = "sink distraction"
POSITIONAL_BIAS = "positional bias"
EVIDENCE_DROPPED = "evidence dropped"
OTHER = "other"
# The failure categories, in the order of the rules (``taxonomy`` lists them in this order).
CATEGORIES = (RUN_ON, EVIDENCE_KEPT, OVER_MERGING, SINK_DISTRACTION, POSITIONAL_BIAS, EVIDENCE_DROPPED, OTHER)
FLAG_OF = {RUN_ON: "flag_run_on", EVIDENCE_KEPT: "flag_evidence_kept", OVER_MERGING: "flag_over_merging",
           SINK_DISTRACTION: "flag_sink_distraction", POSITIONAL_BIAS: "flag_positional_bias",
           EVIDENCE_DROPPED: "flag_evidence_dropped"}
FLAGS = tuple(FLAG_OF.values())

POSITION_SKEW = 0.15
POSITION_GAP = 0.25
SINK_SHARE = 0.10
VAR_TAU = 20.0  # the VAR paper's threshold, set for D = 4096


def default_sink_tau(hidden_size: int) -> float:
    return VAR_TAU * math.sqrt(hidden_size / 4096)


# --- the failing samples of a sweep ----------------------------------------------------------------

def _label(budget) -> str:
    return budget if isinstance(budget, str) else budget_label(budget)


def parse_budget(budget) -> Budget:
    """A sweep budget label back to a ``Budget``: "25%" -> 0.25, "64" -> 64 (values pass through)."""
    if not isinstance(budget, str):
        return budget
    text = budget.strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    return int(text)


def failures(table: pl.DataFrame, method: str | MethodSpec, budget) -> pl.DataFrame:
    """Rows of ``method`` (its sweep label, or a ``MethodSpec``) at ``budget`` (a label such as
    "25%" / "64", or a ``Budget``) whose answer is wrong while the unpruned answer to the same
    sample is right. The sweep's columns, plus ``unpruned_answer``; sorted by ``sample_id``."""
    label = method.label if isinstance(method, MethodSpec) else method
    ok = table.filter(pl.col("status") == "ok")
    right = (ok.filter((pl.col("method") == UNPRUNED) & pl.col("correct"))
             .select("sample_id", pl.col("predicted_answer").alias("unpruned_answer")).unique("sample_id"))
    wrong = ok.filter((pl.col("method") == label) & (pl.col("budget") == _label(budget)) & ~pl.col("correct"))
    return wrong.join(right, on="sample_id", how="inner").sort("sample_id")


# --- ranks -------------------------------------------------------------------------------------------

def ranks(values, among=None, descending: bool = True) -> np.ndarray:
    """Rank [N] of every token (1 = the best) among the tokens where ``among`` is true and the
    value is finite; ties share the best rank; NaN for the others."""
    values = np.asarray(values, dtype=np.float64)
    valid = np.isfinite(values)
    if among is not None:
        valid &= np.asarray(among, dtype=bool)
    out = np.full(values.shape, np.nan)
    if valid.any():
        # "min": tied tokens all get the best rank of their group (1 + how many rank strictly better)
        out[valid] = rankdata(-values[valid] if descending else values[valid], method="min")
    return out


def removing_stage(plan: KeepPlan, token: int) -> int | None:
    """Index into ``plan.stages`` of the stage that removed ``token`` (None: it survives)."""
    for index, stage in enumerate(plan.stages):
        if token not in set(stage.kept):
            return index
    return None


def alive_before(plan: KeepPlan, index: int) -> np.ndarray:
    """Boolean [N]: the tokens entering stage ``index``."""
    alive = np.zeros(plan.n_visual, dtype=bool)
    alive[boxed(plan.stages[index - 1].kept, plan.n_visual) if index else slice(None)] = True
    return alive


def stage_direction(plan: KeepPlan, index: int) -> bool | None:
    """True if stage ``index`` favours high scores (descending), False if it keeps the low ones;
    None when it has no scores. Decided by the mean score of the kept vs the dropped tokens among
    those it scored (descending when either side has none, or on a tie)."""
    stage = plan.stages[index]
    scores = stage.score_array
    if scores is None:
        return None
    alive = alive_before(plan, index) & np.isfinite(scores)
    kept = np.zeros(plan.n_visual, dtype=bool)
    kept[boxed(stage.kept, plan.n_visual)] = True  # a [CLS] passed on has no entry here
    if not (alive & kept).any() or not (alive & ~kept).any():
        return True
    return bool(scores[alive & kept].mean() >= scores[alive & ~kept].mean())


def method_ranks(plan: KeepPlan, tokens: Iterable[int]) -> np.ndarray:
    """Per token: its rank under the scores of the stage that removed it, among the tokens that
    stage saw and scored (``ranks`` in the stage's ``stage_direction``); NaN when it survives, the
    stage has no scores, or its score is not finite."""
    out = []
    for token in tokens:
        index = removing_stage(plan, int(token))
        direction = None if index is None else stage_direction(plan, index)
        if direction is None:
            out.append(math.nan)
            continue
        out.append(float(ranks(plan.stages[index].score_array, alive_before(plan, index), direction)[int(token)]))
    return np.asarray(out, dtype=np.float64)


def top_ranked(plan: KeepPlan, index: int) -> np.ndarray:
    """The m best-ranked tokens of stage ``index`` (m = how many it kept), best first; empty
    when it has no scores."""
    direction = stage_direction(plan, index)
    if direction is None:
        return np.zeros(0, dtype=np.int64)
    stage = plan.stages[index]
    r = ranks(stage.score_array, alive_before(plan, index), direction)
    ranked = np.flatnonzero(np.isfinite(r))
    order = ranked[np.lexsort((ranked, r[ranked]))]
    return order[: len(stage.kept)]


# --- counterfactual plans ----------------------------------------------------------------------------

def restore_plan(plan: KeepPlan, tokens: Iterable[int]) -> KeepPlan:
    """``plan`` with ``tokens`` put back: every stage keeps ``kept ∪ tokens`` and every merge with
    one of them among its sources is removed (its target keeps its own state), and so is every
    appended token made with one of them (its token stays in place). Scores, position policies and
    what becomes of the separators stay as they were."""
    tokens = {int(t) for t in tokens}
    if not tokens:
        return plan
    stages = []
    for stage in plan.stages:
        merges = tuple(m for m in stage.merges if not tokens.intersection(m.sources))
        appends = tuple(a for a in stage.appends if not tokens.intersection(a.sources))
        stages.append(Stage(stage.where, tuple(sorted(set(stage.kept) | tokens)), stage.scores, merges,
                            stage.position, appends, stage.dropped, stage.separators))
    return plan.with_stages(stages)


# --- the taxonomy's rules ------------------------------------------------------------------------------

def position_metrics(n_visual: int, kept: Sequence[int], lost: Sequence[int]) -> tuple[float, float]:
    """(kept_position_skew, evidence_position_offset); see the module docstring. NaN where a set is
    empty."""
    if n_visual < 2:
        return math.nan, math.nan
    q = np.arange(n_visual) / (n_visual - 1)
    kept_mean = float(q[list(kept)].mean()) if len(kept) else math.nan
    skew = kept_mean - float(q.mean()) if len(kept) else math.nan
    offset = float(q[list(lost)].mean()) - kept_mean if len(lost) and len(kept) else math.nan
    return skew, offset


def positional_flag(skew: float, offset: float) -> bool:
    if not (math.isfinite(skew) and math.isfinite(offset)):
        return False
    return bool(abs(skew) >= POSITION_SKEW and abs(offset) >= POSITION_GAP and (offset > 0) != (skew > 0))


def sink_metrics(top: Sequence[int], sink_scores, evidence, tau: float) -> tuple[int, float]:
    """(how many of the top-ranked tokens are sinks without evidence, their share of them);
    (0, NaN) without top-ranked tokens or sink scores."""
    if sink_scores is None or not len(top):
        return 0, math.nan
    top = np.asarray(top, dtype=np.int64)
    scores = np.asarray(sink_scores, dtype=np.float64)
    evidence = np.asarray(evidence, dtype=bool)
    hits = int(((scores[top] >= tau) & ~evidence[top]).sum())
    return hits, hits / len(top)


def classify(*, pruned_correct: bool, n_evidence: int, n_lost: int, n_merged: int,
             restore_recovers: bool | None, kept_position_skew: float = math.nan,
             evidence_position_offset: float = math.nan, sink_share_top: float = math.nan,
             run_on: bool = False) -> tuple[str, dict[str, bool]]:
    """The primary category and every flag, by the rules of the module docstring."""
    recovers = bool(restore_recovers) and n_lost > 0
    share = sink_share_top if sink_share_top is not None else math.nan
    flags = {
        "flag_run_on": bool(run_on) and not pruned_correct,
        "flag_evidence_kept": n_evidence > 0 and n_lost == 0,
        "flag_evidence_dropped": recovers and n_lost - n_merged > 0,
        "flag_over_merging": recovers and n_merged > 0,
        "flag_positional_bias": n_lost > 0 and positional_flag(kept_position_skew, evidence_position_offset),
        "flag_sink_distraction": n_lost > 0 and math.isfinite(share) and share >= SINK_SHARE,
    }
    if pruned_correct:
        category = NOT_A_FAILURE
    elif flags["flag_run_on"]:
        category = RUN_ON
    elif flags["flag_evidence_kept"]:
        category = EVIDENCE_KEPT
    elif recovers and 2 * n_merged > n_lost:
        category = OVER_MERGING
    elif recovers and flags["flag_sink_distraction"]:
        category = SINK_DISTRACTION
    elif recovers and flags["flag_positional_bias"]:
        category = POSITIONAL_BIAS
    elif recovers:
        category = EVIDENCE_DROPPED
    else:
        category = OTHER
    return category, flags


# --- one sample ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Diagnosis:
    """One sample under one method and budget; ``to_row`` flattens it (``DIAGNOSIS_SCHEMA``).

    Token lists are original visual indices (layout order). ``lost_*`` lists run parallel to
    ``lost_evidence``. ``method_ranks`` / ``saliency_ranks``: NaN where undefined.
    ``sweep_answer``: the pruned answer the sweep table recorded (None outside ``diagnose``), to
    compare with the re-derived ``pruned_answer``.
    """

    sample_id: str
    question: str
    question_type: str
    gold: str | None
    method: str
    budget: str
    budget_tokens: int
    n_visual: int
    unpruned_answer: str
    unpruned_correct: bool
    pruned_answer: str
    pruned_correct: bool
    sweep_answer: str | None
    stages: str  # the executed plan's stages as JSON (the sweep's ``stages`` format)
    kept: tuple[int, ...]
    evidence: tuple[int, ...]
    lost_evidence: tuple[int, ...]
    merged_evidence: tuple[int, ...]
    lost_stage: tuple[str, ...]  # "pre_llm" or the decoder layer index, per lost evidence token
    method_ranks: tuple[float, ...]
    method_ranked: tuple[int, ...]  # how many tokens the removing stage ranked, per lost token
    saliency_ranks: tuple[float, ...]
    saliency_answer: str
    evidence_restore_answer: str | None
    evidence_restore_recovers: bool | None
    saliency_restored: tuple[int, ...]
    saliency_restore_answer: str | None
    saliency_restore_recovers: bool | None
    kept_position_skew: float
    evidence_position_offset: float
    sink_tau: float
    sinks_in_top: int
    sink_share_top: float
    category: str
    flags: dict = field(default_factory=dict)

    @property
    def n_evidence(self) -> int:
        return len(self.evidence)

    @property
    def evidence_recall(self) -> float | None:
        return None if not self.evidence else 1 - len(self.lost_evidence) / len(self.evidence)

    def to_row(self) -> dict:
        row = {}
        for name in DIAGNOSIS_SCHEMA:
            if name in FLAGS:
                row[name] = bool(self.flags.get(name, False))
            elif name in ("n_evidence", "evidence_recall"):
                row[name] = getattr(self, name)
            elif name == "n_lost_evidence":
                row[name] = len(self.lost_evidence)
            elif name == "n_merged_evidence":
                row[name] = len(self.merged_evidence)
            else:
                value = getattr(self, name)
                row[name] = list(value) if isinstance(value, tuple) else value
        return row


DIAGNOSIS_SCHEMA = {
    "sample_id": pl.String, "question": pl.String, "question_type": pl.String, "gold": pl.String,
    "method": pl.String, "budget": pl.String, "budget_tokens": pl.Int64, "n_visual": pl.Int64,
    "category": pl.String, **{f: pl.Boolean for f in FLAGS},
    "unpruned_answer": pl.String, "unpruned_correct": pl.Boolean, "pruned_answer": pl.String,
    "pruned_correct": pl.Boolean, "sweep_answer": pl.String, "stages": pl.String,
    "n_evidence": pl.Int64, "n_lost_evidence": pl.Int64, "n_merged_evidence": pl.Int64,
    "evidence_recall": pl.Float64, "kept": pl.List(pl.Int64), "evidence": pl.List(pl.Int64),
    "lost_evidence": pl.List(pl.Int64), "merged_evidence": pl.List(pl.Int64), "lost_stage": pl.List(pl.String),
    "method_ranks": pl.List(pl.Float64), "method_ranked": pl.List(pl.Int64),
    "saliency_ranks": pl.List(pl.Float64), "saliency_answer": pl.String,
    "evidence_restore_answer": pl.String, "evidence_restore_recovers": pl.Boolean,
    "saliency_restored": pl.List(pl.Int64), "saliency_restore_answer": pl.String,
    "saliency_restore_recovers": pl.Boolean,
    "kept_position_skew": pl.Float64, "evidence_position_offset": pl.Float64,
    "sink_tau": pl.Float64, "sinks_in_top": pl.Int64, "sink_share_top": pl.Float64,
}


def saliency_request():
    """What ``diagnose_sample`` records once per sample for saliency and sinks."""
    from workbench.recording import CaptureRequest

    return CaptureRequest(signals=("occlusion", "visual_sink_score"), stacks=("llm",), rows=("last",))


def _sink_scores(recording) -> np.ndarray | None:
    """Per visual token: the max ``visual_sink_score`` over the recording's LLM layers (None when
    it holds none)."""
    if recording is None or not hasattr(recording, "layers"):
        return None
    layers = recording.layers("visual_sink_score")
    if not layers:
        return None
    return np.max([recording.get("visual_sink_score", l, "tokens").double().numpy().reshape(-1)
                   for l in layers], axis=0)


def _saliency_values(saliency, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(occlusion [N], sink scores [N] or None) from a Recording or a plain [N] array."""
    if hasattr(saliency, "get") and hasattr(saliency, "layers"):
        occlusion = saliency.get("occlusion", -1, "k1").double().numpy().reshape(-1)
        sinks = _sink_scores(saliency)
    else:
        occlusion, sinks = np.asarray(saliency, dtype=np.float64).reshape(-1), None
    if len(occlusion) != n:
        raise ValueError(f"saliency has {len(occlusion)} values for {n} visual tokens")
    return occlusion, sinks


def _correct(answer: str | None, sample: Sample) -> bool:
    """Right by the data set's scorer with all its references and options (the sweep's one way of
    scoring)."""
    return sample.answer is not None and sample.score(answer or "").value == 1.0


def runs_on(answer: str | None, gold: str | None) -> bool:
    """The generation begins with the gold answer and does not stop after it (a run-on answer:
    more words follow, up to the token limit or an end the model reached later)."""
    if answer is None or gold is None:
        return False
    words, expected = normalize_answer(answer).split(), normalize_answer(gold).split()
    return bool(expected) and words[:len(expected)] == expected and len(words) > len(expected)


def _restored(adapter: ModelAdapter, ready, plan: KeepPlan, tokens, max_new_tokens: int) -> str | None:
    """The answer under ``plan`` with ``tokens`` put back (a pipeline run of the restored plan)."""
    return pipeline.run(adapter, ready, None, plan=restore_plan(plan, tokens), max_new_tokens=max_new_tokens).generation


def diagnose_sample(adapter: ModelAdapter, sample: Sample, method: PruningMethod, budget: Budget,
                    recording=None, saliency=None, *, label: str | None = None,
                    sweep_answer: str | None = None, sink_tau: float | None = None,
                    max_new_tokens: int = 8, stored: dict | None = None,
                    unpruned_answer: str | None = None) -> Diagnosis:
    """Diagnose ``method`` at ``budget`` on ``sample`` (see the module docstring).

    ``stored``: the sweep's row of this run; its lossless plan and answer are read instead of
    running the method again (``unpruned_answer``, the sweep's unpruned answer, likewise).
    Every model run left (the counterfactual restores) goes through ``workbench.pipeline``.
    ``recording``: the recording of the method's needs (made when needed and None).
    ``saliency``: a ``Recording`` holding ``occlusion`` (llm, layer -1, rows "k1") and optionally
    ``visual_sink_score``, or a plain [N] occlusion array (then no sink scores); when None it is
    recorded (``saliency_request``) on the unpruned model for the gold answer.
    ``label``: the method's name in the output (default ``method.name``).
    """
    budget = parse_budget(budget)
    replay = stored is not None and stored.get("stages") is not None
    ready = prepare_sample(adapter, sample, () if replay or recording is not None else [method])
    if recording is not None:
        ready.recording = recording
    layout = ready.prepared.layout
    n = layout.n_tokens
    method.check_applies(ready.facts)
    gold = sample.answer

    if unpruned_answer is None:
        unpruned_answer = pipeline.run(adapter, ready, None, max_new_tokens=max_new_tokens).generation
    if replay:
        plan, pruned_answer = plan_from_row(stored), stored["predicted_answer"]
    else:
        pruned = pipeline.run(adapter, ready, method, budget, max_new_tokens=max_new_tokens)
        plan, pruned_answer = pruned.plan, pruned.generation
    recording = ready.recording

    saliency_answer = gold if gold is not None else unpruned_answer
    if saliency is None:
        from workbench.recorder import record

        saliency = record(adapter, ready.prepared, saliency_request(), sample_id=sample.id,
                          question=sample.question, answer=saliency_answer)
    occlusion, sink_scores = _saliency_values(saliency, n)
    if sink_scores is None:  # a plain occlusion array: the method's own recording may hold them
        sink_scores = _sink_scores(recording)
        if sink_scores is not None and len(sink_scores) != n:
            sink_scores = None
    if sink_tau is None:
        sink_tau = default_sink_tau(int(adapter.language_model().config.hidden_size))

    mask = sample.evidence_mask()
    evidence = layout.evidence_tokens(mask) if mask is not None else np.zeros(n, dtype=bool)
    kept = boxed(plan.final_kept, n)
    kept_mask = np.zeros(n, dtype=bool)
    kept_mask[kept] = True
    lost = np.flatnonzero(evidence & ~kept_mask)
    stage_of = [removing_stage(plan, int(t)) for t in lost]
    merged = [int(t) for t, s in zip(lost, stage_of)
              if any(int(t) in m.sources for m in plan.stages[s].folds)]
    m_ranks = method_ranks(plan, lost)
    ranked = [int((alive_before(plan, s) & np.isfinite(plan.stages[s].score_array)).sum())
              if plan.stages[s].scores is not None else 0 for s in stage_of]
    s_ranks = ranks(occlusion)[lost] if len(lost) else np.zeros(0)

    evidence_answer = evidence_recovers = saliency_answer_r = saliency_recovers = None
    restored_by_saliency: list[int] = []
    if len(lost):
        evidence_answer = _restored(adapter, ready, plan, lost, max_new_tokens)
        evidence_recovers = _correct(evidence_answer, sample)
        dropped = np.flatnonzero(~kept_mask)
        key = np.where(np.isfinite(occlusion[dropped]), -occlusion[dropped], np.inf)
        restored_by_saliency = sorted(int(t) for t in dropped[np.lexsort((dropped, key))][: len(lost)])
        saliency_answer_r = _restored(adapter, ready, plan, restored_by_saliency, max_new_tokens)
        saliency_recovers = _correct(saliency_answer_r, sample)

    skew, offset = position_metrics(n, kept, lost)
    scored = [s for s in sorted(set(stage_of)) if plan.stages[s].scores is not None]
    top = top_ranked(plan, scored[0]) if scored else np.zeros(0, dtype=np.int64)
    sinks_in_top, sink_share = sink_metrics(top, sink_scores, evidence, sink_tau)
    pruned_correct = _correct(pruned_answer, sample)
    category, flags = classify(pruned_correct=pruned_correct, n_evidence=int(evidence.sum()), n_lost=len(lost),
                               n_merged=len(merged), restore_recovers=evidence_recovers,
                               kept_position_skew=skew, evidence_position_offset=offset,
                               sink_share_top=sink_share, run_on=runs_on(pruned_answer, gold))
    return Diagnosis(
        sample_id=sample.id, question=sample.question, question_type=sample.question_type or "all", gold=gold,
        method=label or method.name, budget=budget_label(budget), budget_tokens=resolve_budget(budget, n),
        n_visual=n, unpruned_answer=unpruned_answer, unpruned_correct=_correct(unpruned_answer, sample),
        pruned_answer=pruned_answer, pruned_correct=pruned_correct, sweep_answer=sweep_answer,
        stages=plan_json(plan), kept=tuple(int(t) for t in kept),
        evidence=tuple(int(t) for t in np.flatnonzero(evidence)), lost_evidence=tuple(int(t) for t in lost),
        merged_evidence=tuple(merged), lost_stage=tuple(str(plan.stages[s].where) for s in stage_of),
        method_ranks=tuple(float(r) for r in m_ranks), method_ranked=tuple(ranked),
        saliency_ranks=tuple(float(r) for r in s_ranks), saliency_answer=saliency_answer,
        evidence_restore_answer=evidence_answer, evidence_restore_recovers=evidence_recovers,
        saliency_restored=tuple(restored_by_saliency), saliency_restore_answer=saliency_answer_r,
        saliency_restore_recovers=saliency_recovers, kept_position_skew=skew, evidence_position_offset=offset,
        sink_tau=float(sink_tau), sinks_in_top=sinks_in_top, sink_share_top=sink_share,
        category=category, flags=flags,
    )


# --- many samples ----------------------------------------------------------------------------------------

def diagnosis_frame(rows: Sequence[dict]) -> pl.DataFrame:
    return pl.DataFrame([{k: r.get(k) for k in DIAGNOSIS_SCHEMA} for r in rows], schema=DIAGNOSIS_SCHEMA)


def gold_saliency(adapter: ModelAdapter, sample: Sample):
    """The saliency recording ``diagnose_sample`` would make for ``sample`` (gold answer scored);
    the same for every method, so callers diagnosing several methods record it once."""
    from workbench.recorder import record

    prepared = adapter.prepare(sample.load_image(), sample.question)
    return record(adapter, prepared, saliency_request(), sample_id=sample.id, question=sample.question,
                  answer=sample.answer)


def diagnose(adapter: ModelAdapter, samples: Sequence[Sample], table: pl.DataFrame, method_spec, budget,
             progress: bool = True, max_new_tokens: int = 8, limit: int | None = None,
             saliency_cache: dict | None = None) -> pl.DataFrame:
    """``diagnose_sample`` on every failure of ``method_spec`` at ``budget`` (a label such as "25%",
    or a ``Budget``) in ``table``; one row each (``DIAGNOSIS_SCHEMA``), in ``failures`` order.

    ``method_spec``: a ``MethodSpec``, its text form ("fastv:layer=2"), or a ``PruningMethod``
    instance (then its rows in the table are those labelled ``method.name``). Failing samples
    missing from ``samples`` are skipped. The sweep's answer is carried as ``sweep_answer``.
    """
    if isinstance(method_spec, PruningMethod):
        method, label = method_spec, method_spec.name
    else:
        spec = method_spec if isinstance(method_spec, MethodSpec) else MethodSpec.parse(str(method_spec))
        method, label = spec.create(), spec.label
    failed = failures(table, label, budget)
    if limit is not None:
        failed = failed.head(limit)
    value = parse_budget(budget)  # a Budget passes through exactly; a label is parsed ("25%" -> 0.25)
    by_id = {s.id: s for s in samples}
    rows = []
    for row in tqdm(failed.iter_rows(named=True), total=failed.height, desc=f"diagnosing {label}",
                    disable=not progress):
        sample = by_id.get(row["sample_id"])
        if sample is None:
            continue
        saliency = None
        if saliency_cache is not None and sample.answer is not None:
            if sample.id not in saliency_cache:
                saliency_cache[sample.id] = gold_saliency(adapter, sample)
            saliency = saliency_cache[sample.id]
        diagnosis = diagnose_sample(adapter, sample, method, value, saliency=saliency, label=label,
                                    sweep_answer=row["predicted_answer"], max_new_tokens=max_new_tokens,
                                    stored=row, unpruned_answer=row["unpruned_answer"])  # read, not re-run
        rows.append(diagnosis.to_row())
    return diagnosis_frame(rows)


def taxonomy(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per failure category (``CATEGORIES`` order, zero counts included): ``count`` of
    samples with it as primary category, their ``share`` of all diagnosed failures, and
    ``flagged`` / ``flagged_share``: samples whose flag for it is set whatever their primary
    category ("other" has no flag: its primary count). "not a failure" rows are left out."""
    frame = frame.filter(pl.col("category") != NOT_A_FAILURE)
    total = frame.height
    rows = []
    for category in CATEGORIES:
        count = int((frame["category"] == category).sum()) if total else 0
        flag = FLAG_OF.get(category)
        flagged = int(frame[flag].fill_null(False).sum()) if flag and total else count
        rows.append({"category": category, "count": count, "share": count / total if total else None,
                     "flagged": flagged, "flagged_share": flagged / total if total else None})
    return pl.DataFrame(rows, schema={"category": pl.String, "count": pl.Int64, "share": pl.Float64,
                                      "flagged": pl.Int64, "flagged_share": pl.Float64})
