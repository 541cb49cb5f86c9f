"""One pipeline: (sample, method, budget) -> ``Result``. Sweeps, failure diagnosis, the report and
the dashboard all go through it.

A ``Result`` is complete and serialisable: the plan with its scores (every stage's kept tokens,
merges and ranking scores: lossless, so diagnosis and views read it instead of re-running the
model), the raw generation, what the data set's scorer extracted from it and the score, whether
generation stopped by itself, the gold answer's log-probability, and the cost (visual tokens per
decoder layer, prefill FLOPs, the method's own selection time and the run's wall time).

``PreparedSample`` is one sample made ready once for many runs: its model inputs, the recording of
the unpruned forward that every method reads, and its ground-truth evidence tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from workbench.models.base import ModelAdapter, PreparedInput
from workbench.pruning.budget import Budget, resolve_budget
from workbench.pruning.executor import Job, UnprunedPrefill, execute_batch
from workbench.pruning.flops import DecoderShape, prefill_flops
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext
from workbench.pruning.plan import KeepPlan, Stage, boxed
from workbench.pruning.recorded_prefill import recorded_prefills
from workbench.pruning.run import capture_request
from workbench.recorder import UnstackedBatch, batch_inputs, record_together, recording_groups
from workbench.samples import Sample
from workbench.scoring import normalize_answer, score

UNPRUNED = "unpruned"


def budget_label(budget: Budget) -> str:
    """"33%" for a fraction, "64" for a count: the budget column of every table."""
    if isinstance(budget, float):
        return f"{budget * 100:g}%"
    return str(int(budget))


def plan_json(plan: KeepPlan) -> str:
    """The plan's stages, lossless (kept tokens, merges, positions and ranking scores)."""
    return json.dumps([stage.to_dict() for stage in plan.stages])


def plan_from_row(row: dict) -> KeepPlan:
    """The plan a stored row ran (``Result.row``), scores included."""
    stages = tuple(Stage.from_dict(s) for s in json.loads(row["stages"]))
    return KeepPlan(row["method"], int(row["budget_tokens"]), int(row["n_visual"]), stages)


@dataclass
class PreparedSample:
    """One sample ready for many runs (built by ``prepare_sample``)."""

    sample: Sample
    prepared: PreparedInput
    facts: ModelFacts
    shape: DecoderShape
    evidence: np.ndarray  # bool [N]: visual tokens over the ground-truth evidence
    recording: object | None = None
    record_seconds: float = 0.0
    scorer: str = "exact"
    # The unpruned run's prefill (kept by ``run``): later runs start from it where they first prune.
    unpruned_prefill: UnprunedPrefill | None = None
    # The same, as the recording's forward computed it: the unpruned run takes it over.
    recorded_prefill: UnprunedPrefill | None = None

    @property
    def n_visual(self) -> int:
        return self.prepared.layout.n_tokens

    @property
    def prefill(self) -> UnprunedPrefill | None:
        """The unpruned prefill later runs start from: the unpruned run's, or else the recorded
        forward's (the same layers, computed once either way)."""
        return self.unpruned_prefill or self.recorded_prefill

    @property
    def full_flops(self) -> float:
        return prefill_flops(self.shape, [self.prepared.layout.sequence_length] * self.facts.decoder_layers)


def prepare_sample(adapter: ModelAdapter, sample: Sample, methods: Sequence[PruningMethod] = (),
                   image=None) -> PreparedSample:
    """Inputs, evidence and the one recording every applicable method in ``methods`` reads, scored
    as the sample's data set says. ``image``: another image in place of the sample's. Raises
    ``ImageError`` when the sample's image cannot be decoded."""
    prepared = adapter.prepare(sample.load_image() if image is None else image, sample.question)
    return prepare_inputs(adapter, [(sample, prepared)], methods)[0]


def on_image(adapter: ModelAdapter, ready: PreparedSample, other: PreparedInput) -> PreparedSample:
    """``ready``'s question on ``other``'s image, of the same size (the blank-image control), with no
    recording: the layout is the sample's (it depends on the size alone), so are its evidence
    tokens, which are not read again (``ModelAdapter.with_image_of``)."""
    return PreparedSample(ready.sample, adapter.with_image_of(ready.prepared, other), ready.facts, ready.shape,
                          ready.evidence, scorer=ready.scorer)


def prepare_inputs(adapter: ModelAdapter, items: Sequence[tuple[Sample, PreparedInput]],
                   methods: Sequence[PruningMethod] = ()) -> list[PreparedSample]:
    """``prepare_sample`` of samples whose model inputs are made: the samples whose inputs stack
    share their recording's forward (``recorder.recording_groups``), each recording and unpruned
    prefill equal to the sample's own up to float rounding."""
    facts = ModelFacts.of(adapter)
    shape = DecoderShape.of(adapter.language_model().config)
    request = capture_request(need for m in methods if m.applicability(facts) is None for need in m.needs(facts))
    prepared = [p for _, p in items]
    recordings, prefills, seconds = [None] * len(items), [None] * len(items), [0.0] * len(items)
    groups = [] if request is None else recording_groups(adapter, prepared, request)
    while groups:
        group = groups.pop(0)
        members = [prepared[i] for i in group]
        inputs = batch_inputs(adapter, members)
        started = time.perf_counter()
        # The recorded forward runs the vision tower and the first decoder layers: the samples' plans
        # take their decoder inputs from it, and their unpruned runs go on from it.
        try:
            with recorded_prefills(adapter, members, inputs) as begun:
                made = record_together(adapter, members, inputs, request)
        except UnstackedBatch:  # a model that ran them otherwise: one at a time, from scratch
            for member in members:
                member._decoder_inputs.clear()
            groups[:0] = [[i] for i in group]
            continue
        share = (time.perf_counter() - started) / len(group)
        for i, recording, prefill in zip(group, made, begun):
            recordings[i], prefills[i], seconds[i] = recording, prefill.prefill, share
    out = []
    for (sample, item), recording, prefill, spent in zip(items, recordings, prefills, seconds):
        mask = sample.evidence_mask()
        evidence = item.layout.evidence_tokens(mask) if mask is not None else np.zeros(item.layout.n_tokens, dtype=bool)
        out.append(PreparedSample(sample, item, facts, shape, evidence, recording, spent, sample.scorer,
                                  recorded_prefill=prefill))
    return out


@dataclass(frozen=True)
class Result:
    """One run; ``row()`` is its table row (the sweep's schema)."""

    sample_id: str
    method: str  # the label: "fastv" or "fastv(layer=3)"
    params: dict
    budget: str
    budget_tokens: int | None
    n_visual: int | None
    status: str  # "ok", "not_applicable" or "error"
    message: str | None = None
    plan: KeepPlan | None = None
    generation: str | None = None  # the decoded answer, as generated
    extracted: str | None = None  # what the scorer read from it
    score: float | None = None
    stopped: bool | None = None  # generation ended by itself before the token limit
    answer_logprob: float | None = None
    gold_logprob: float | None = None
    visual_tokens_per_layer: tuple[int, ...] = ()
    prefill_flops: float | None = None
    flops_ratio: float | None = None
    select_time_s: float | None = None
    prefill_time_s: float | None = None
    wall_time_s: float | None = None
    evidence_tokens: int | None = None
    evidence_recall: float | None = None
    extra: dict = field(default_factory=dict)  # per-table additions (record_time_s, loyal, ...)

    @property
    def kept_count(self) -> int | None:
        return None if self.plan is None else len(self.plan.final_kept)

    def row(self) -> dict:
        effective = (float(np.mean(self.visual_tokens_per_layer)) if self.visual_tokens_per_layer else None)
        gap = (self.kept_count - self.budget_tokens
               if self.kept_count is not None and self.budget_tokens is not None else None)
        return {
            "sample_id": self.sample_id, "method": self.method,
            "params": json.dumps(self.params, sort_keys=True, default=list), "budget": self.budget,
            "budget_tokens": self.budget_tokens, "n_visual": self.n_visual, "status": self.status,
            "message": self.message, "stages": None if self.plan is None else plan_json(self.plan),
            "kept_count": self.kept_count, "budget_gap": gap, "visual_tokens_per_layer": list(self.visual_tokens_per_layer),
            "effective_tokens": effective, "predicted_answer": self.generation, "extracted_answer": self.extracted,
            "score": self.score, "correct": None if self.score is None else self.score == 1.0,
            "stopped": self.stopped, "answer_logprob": self.answer_logprob, "gold_logprob": self.gold_logprob,
            "evidence_tokens": self.evidence_tokens, "evidence_recall": self.evidence_recall,
            "select_time_s": self.select_time_s, "prefill_time_s": self.prefill_time_s,
            "wall_time_s": self.wall_time_s, "prefill_flops": self.prefill_flops, "flops_ratio": self.flops_ratio,
        } | self.extra


def run(adapter: ModelAdapter, ready: PreparedSample, method: PruningMethod | None, budget: Budget | None = None,
        *, label: str | None = None, plan: KeepPlan | None = None, max_new_tokens: int = 8) -> Result:
    """``method`` at ``budget`` on a prepared sample; ``method=None`` runs the unpruned model, or
    ``plan`` when one is given (a counterfactual: a stored plan with tokens restored)."""
    return run_batch(adapter, [ready], method, budget, label=label, plans=None if plan is None else [plan],
                     max_new_tokens=max_new_tokens)[0]


def run_batch(adapter: ModelAdapter, readies: Sequence[PreparedSample], method: PruningMethod | None,
              budget: Budget | None = None, *, label: str | None = None, plans: Sequence[KeepPlan] | None = None,
              max_new_tokens: int = 8, keep_prefill: bool = True) -> list[Result]:
    """``run`` on several prepared samples as one batch (each with its own plan, padding and
    masks): the same answers as one at a time. The unpruned run keeps each sample's prefill
    (``PreparedSample.unpruned_prefill``; not with ``keep_prefill`` False, for a sample no run
    will start from, such as a control's); later runs on the sample start from it at the first
    layer they prune before, so no decoder layer is computed twice. In a batch, the prefill and
    wall times of a result are the batch's divided by its size."""
    results: list[Result | None] = [None] * len(readies)
    todo = []  # (index, plan, callback, tower callback, selection seconds, budget text, tokens)
    for i, ready in enumerate(readies):
        sample, n = ready.sample, ready.n_visual
        plan = None if plans is None else plans[i]
        name = label or (method.name if method is not None else (plan.method if plan is not None else UNPRUNED))
        params = method.params() if method is not None else {}
        if method is None:
            tokens, budget_text = (n, "100%") if plan is None else (plan.budget, budget_label(plan.budget))
        else:
            budget_text = budget_label(budget)
            try:
                tokens = resolve_budget(budget, n)
            except ValueError as e:  # a count above this sample's visual tokens (they vary with AnyRes)
                results[i] = Result(sample.id, name, params, budget_text, None, n, "error", str(e))
                continue
            reason = method.applicability(ready.facts)
            if reason is not None:
                results[i] = Result(sample.id, name, params, budget_text, tokens, n, "not_applicable", reason)
                continue
        started = time.perf_counter()
        callback = tower_callback = None
        if method is not None:
            context = SelectionContext(ready.prepared.layout, budget, ready.recording, ready.facts)
            plan, callback = method.select(context), method.layer_callback(context)
            tower_callback = method.tower_callback(context)
        elif plan is None:
            plan = KeepPlan.keep_all(n, where=None, method=UNPRUNED)
        todo.append((i, name, params, plan, callback, tower_callback, time.perf_counter() - started, budget_text, tokens))
    if not todo:
        return results
    # The unpruned run (no method, no plan) keeps the prefill the others start from.
    capture = keep_prefill and method is None and plans is None and \
        any(readies[i].unpruned_prefill is None for i, *_ in todo)
    hooks = method is not None and method.hooks_layers
    jobs = [Job(readies[i].prepared, plan, callback, readies[i].sample.answer,
                readies[i].recorded_prefill if capture else None if hooks else readies[i].prefill, tower_callback)
            for i, _, _, plan, callback, tower_callback, *_ in todo]
    started = time.perf_counter()
    # A method hooking the layers' modules would read every sample's measurements off one batched
    # module call: its samples run one at a time.
    batches = [[job] for job in jobs] if hooks else [jobs]
    executions = [e for batch in batches for e in execute_batch(adapter, batch, max_new_tokens, capture=capture)]
    share = (time.perf_counter() - started) / len(jobs)
    for (i, name, params, _, _, _, select_s, budget_text, tokens), execution in zip(todo, executions):
        ready = readies[i]
        if capture:
            ready.unpruned_prefill, ready.recorded_prefill = execution.prefill, None
        results[i] = _result(ready, name, params, budget_text, tokens, execution, select_s, share, max_new_tokens)
    return results


def _result(ready: PreparedSample, name: str, params: dict, budget_text: str, tokens: int, execution,
            select_s: float, run_s: float, max_new_tokens: int) -> Result:
    sample, evidence = ready.sample, ready.evidence
    kept = boxed(execution.final_kept, ready.n_visual)  # evidence has no [CLS] entry
    flops = prefill_flops(ready.shape, execution.tokens_per_layer)
    scored = score(ready.scorer, execution.answer, sample.golds, sample.options)
    return Result(
        sample.id, name, params, budget_text, tokens, ready.n_visual, "ok", plan=execution.plan,
        generation=execution.answer, extracted=scored.extracted, score=scored.value,
        stopped=len(execution.answer_ids) < max_new_tokens, answer_logprob=execution.answer_logprob,
        gold_logprob=execution.gold_logprob, visual_tokens_per_layer=tuple(execution.visual_tokens_per_layer),
        prefill_flops=flops, flops_ratio=flops / ready.full_flops, select_time_s=select_s,
        prefill_time_s=execution.prefill_seconds, wall_time_s=select_s + run_s,
        evidence_tokens=int(evidence.sum()),
        evidence_recall=float(evidence[kept].sum() / evidence.sum()) if evidence.any() else None,
    )


def loyal(result: Result, unpruned: Result) -> bool | None:
    """Whether a pruned run gives the unpruned model's answer on the same sample (EffiVLM-Bench's
    loyalty), both as the scorer read them."""
    if result.status != "ok" or unpruned.status != "ok":
        return None
    return normalize_answer(result.extracted) == normalize_answer(unpruned.extracted)
