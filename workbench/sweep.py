"""Accuracy-vs-budget sweeps: a data set x methods x budgets, one table row per (sample, method, budget).

The unit of work is a ``SweepTask`` (one sample, the methods and budgets still to run): plain,
JSON-serialisable data in, table rows out (``run_task``), so any engine that can ship JSON and
hold a loaded model can spread a sweep over processes, GPUs or machines. One recording of the
unpruned forward per sample serves every method.

On disk a sweep is a folder: ``sweep.json`` (model and its weights fingerprint, data set, methods, budgets),
``rows.jsonl`` (the journal: each finished sample's rows are appended and synced before the next
sample starts, so an interrupted run loses at most the sample in progress) and ``results.parquet``
(every row, rewritten atomically when a run ends or is interrupted). Re-running into the same
folder skips every (sample, method, budget) already in the journal.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import polars as pl
from tqdm import tqdm

from workbench.errors import UserError
from workbench.evaluate import normalize_answer
from workbench.models.base import ModelAdapter
from workbench.pruning.budget import Budget, resolve_budget
from workbench.pruning.executor import execute
from workbench.pruning.flops import DecoderShape, prefill_flops
from workbench.pruning.method import ModelFacts, PruningMethod, SelectionContext
from workbench.pruning.plan import KeepPlan
from workbench.pruning.registry import create_method
from workbench.pruning.run import record_needs
from workbench.samples import Sample, sample_from_row, sample_to_row, write_atomically, write_atomically_bytes

FORMAT = "workbench-sweep"
VERSION = 1
UNPRUNED = "unpruned"


class SweepError(UserError, ValueError):
    """A sweep folder or request that cannot be used as asked; the message says why."""


# --- what to run ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodSpec:
    """A registered method and the hyper-parameters that override its defaults."""

    name: str
    params: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in self.params) + ")"

    def create(self) -> PruningMethod:
        return create_method(self.name, **dict(self.params))

    @staticmethod
    def parse(text: str) -> "MethodSpec":
        """"fastv" or "fastv:rows=text,layer=3" (values parsed as JSON where they can be), or a
        ``label`` as tables show it: "fastv(rows=text,layer=3)"."""
        label = re.fullmatch(r"\s*([\w-]+)\((.*)\)\s*", text)
        if label:
            text = f"{label[1]}:{label[2]}"
        name, _, rest = text.strip().partition(":")
        params = []
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = part.partition("=")
            if not eq:
                raise SweepError(f"method parameter {part!r} in {text!r} is not key=value")
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
            params.append((key.strip(), tuple(parsed) if isinstance(parsed, list) else parsed))
        return MethodSpec(name.strip(), tuple(sorted(params)))


def budget_label(budget: Budget) -> str:
    """"33%" for a fraction, "64" for a count: the budget column of every table."""
    if isinstance(budget, float):
        return f"{budget * 100:g}%"
    return str(int(budget))


@dataclass(frozen=True)
class SweepTask:
    """One sample's work: plain data, JSON round-trip (``to_json`` / ``from_json``)."""

    sample: dict  # ``sample_to_row`` form, paths relative to ``root``
    root: str
    methods: tuple[MethodSpec, ...]
    budgets: tuple[Budget, ...]
    include_unpruned: bool = True
    max_new_tokens: int = 8

    def to_json(self) -> str:
        data = asdict(self)
        data["methods"] = [{"name": m.name, "params": [list(p) for p in m.params]} for m in self.methods]
        return json.dumps(data)

    @staticmethod
    def from_json(text: str) -> "SweepTask":
        data = json.loads(text)
        methods = tuple(MethodSpec(m["name"], tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in m["params"]))
                        for m in data["methods"])
        return SweepTask(data["sample"], data["root"], methods, tuple(data["budgets"]),
                         data["include_unpruned"], data["max_new_tokens"])


# --- one sample ------------------------------------------------------------------------------------

def _stages_json(plan: KeepPlan) -> str:
    return json.dumps([{"where": s.where, "kept": list(s.kept), "position": s.position,
                        "merges": [m.to_dict() for m in s.merges]} for s in plan.stages])


def _row(sample: Sample, method: str, params: dict, budget: str, budget_tokens: int, n_visual: int) -> dict:
    return {"sample_id": sample.id, "question_type": sample.question_type or "all", "method": method,
            "params": json.dumps(params, sort_keys=True, default=list), "budget": budget,
            "budget_tokens": budget_tokens, "n_visual": n_visual, "gold": sample.answer}


def run_task(adapter: ModelAdapter, task: SweepTask) -> list[dict]:
    """Every row of one sample: the unpruned run, then each method at each budget."""
    sample = sample_from_row(task.sample, Path(task.root), f"task {task.sample.get('id')}")
    prepared = adapter.prepare(sample.load_image(), sample.question)
    layout = prepared.layout
    facts = ModelFacts.of(adapter)
    shape = DecoderShape.of(adapter.language_model().config)
    mask = sample.evidence_mask()
    evidence = layout.evidence_tokens(mask) if mask is not None else np.zeros(layout.n_tokens, dtype=bool)
    full_flops = prefill_flops(shape, [layout.sequence_length] * facts.decoder_layers)
    methods = [(spec, spec.create()) for spec in task.methods]
    runnable = [m for _, m in methods if m.applicability(facts) is None]
    started = time.perf_counter()
    recording = record_needs(adapter, prepared, runnable)
    record_seconds = time.perf_counter() - started

    def outcome(row: dict, plan_fn, callback_fn=None) -> dict:
        started = time.perf_counter()
        plan = plan_fn()
        execution = execute(adapter, prepared, plan, task.max_new_tokens, gold_answer=sample.answer,
                            callback=callback_fn() if callback_fn else None)
        kept = np.asarray(execution.final_kept, dtype=np.int64)
        flops = prefill_flops(shape, execution.tokens_per_layer)
        # No gold answer: correctness is unknown (null), not wrong.
        correct = None if sample.answer is None else normalize_answer(execution.answer) == normalize_answer(sample.answer)
        return row | {
            "status": "ok", "message": None, "stages": _stages_json(execution.plan), "kept_count": len(kept),
            "visual_tokens_per_layer": list(execution.visual_tokens_per_layer),
            "answer": execution.answer, "correct": correct, "gold_logprob": execution.gold_logprob,
            "answer_logprob": execution.answer_logprob, "evidence_tokens": int(evidence.sum()),
            "evidence_recall": float(evidence[kept].sum() / evidence.sum()) if evidence.any() else None,
            "wall_time_s": time.perf_counter() - started, "prefill_flops": flops, "flops_ratio": flops / full_flops,
        }

    rows = []
    n = layout.n_tokens
    if task.include_unpruned:
        row = _row(sample, UNPRUNED, {}, "100%", n, n) | {"record_time_s": 0.0}
        rows.append(outcome(row, lambda: KeepPlan.keep_all(n, where=None, method=UNPRUNED)))
    for spec, method in methods:
        reason = method.applicability(facts)
        for budget in task.budgets:
            row = _row(sample, spec.label, method.params(), budget_label(budget), resolve_budget(budget, n), n)
            row["record_time_s"] = record_seconds
            if reason is not None:
                rows.append(row | {"status": "not_applicable", "message": reason})
                continue
            context = SelectionContext(layout, budget, recording, facts)
            rows.append(outcome(row, lambda: method.select(context), lambda: method.layer_callback(context)))
    return rows


# --- the folder ------------------------------------------------------------------------------------

SCHEMA = {
    "sample_id": pl.String, "question_type": pl.String, "method": pl.String, "params": pl.String,
    "budget": pl.String, "budget_tokens": pl.Int64, "n_visual": pl.Int64, "gold": pl.String,
    "record_time_s": pl.Float64, "status": pl.String, "message": pl.String, "stages": pl.String,
    "kept_count": pl.Int64, "visual_tokens_per_layer": pl.List(pl.Int64), "answer": pl.String,
    "correct": pl.Boolean, "gold_logprob": pl.Float64, "answer_logprob": pl.Float64,
    "evidence_tokens": pl.Int64, "evidence_recall": pl.Float64, "wall_time_s": pl.Float64,
    "prefill_flops": pl.Float64, "flops_ratio": pl.Float64,
}
KEY = ("sample_id", "method", "budget")


def _read_journal(path: Path) -> list[dict]:
    """Every complete row; a torn last line (a run killed mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with path.open("r+b") as f:
            f.truncate(end)
    rows = []
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise SweepError(f"{path}:{number} is not a sweep row; the journal is damaged "
                             "(move it away to start this sweep again)") from None
    return rows


def frame(rows: Sequence[dict]) -> pl.DataFrame:
    return pl.DataFrame([{k: r.get(k) for k in SCHEMA} for r in rows], schema=SCHEMA)


@dataclass(frozen=True)
class SweepResult:
    folder: Path
    table: pl.DataFrame
    new_rows: int


def recorded_weights(folder: str | Path) -> str | None:
    """The weights fingerprint a sweep folder was made with ("" for a folder from before
    fingerprints; None where there is no sweep)."""
    path = Path(folder) / "sweep.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("weights", "")
    except json.JSONDecodeError:
        return None  # _check_folder reports it


def _check_folder(folder: Path, manifest: dict) -> None:
    path = folder / "sweep.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise SweepError(f"{path} is not valid JSON; not a sweep folder") from None
        if old.get("format") != FORMAT:
            raise SweepError(f"{folder} is not a sweep folder (its sweep.json has no {FORMAT!r} format)")
        for key in ("model", "dataset"):
            if old.get(key) != manifest[key]:
                raise SweepError(f"{folder} holds a sweep of {key} {old.get(key)!r}, not {manifest[key]!r}; "
                                 "use another --out folder")
        if old.get("weights") != manifest["weights"]:
            was = f"fingerprint {old['weights']}" if old.get("weights") else "made before sweeps recorded one"
            raise SweepError(f"{folder} holds a sweep of {manifest['model']!r} with other weights ({was}; now "
                             f"{manifest['weights']}); resuming would mix answers of two models: use another "
                             "--out folder, or move this one aside")
        manifest = manifest | {"methods": sorted(set(old.get("methods", [])) | set(manifest["methods"])),
                               "budgets": sorted(set(old.get("budgets", [])) | set(manifest["budgets"]))}
    elif folder.exists() and any(folder.iterdir()):
        raise SweepError(f"{folder} exists and is not a sweep folder; use an empty or new --out folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(manifest, indent=1))


def run_sweep(adapter: ModelAdapter, samples: Sequence[Sample], dataset: str, methods: Sequence[MethodSpec],
              budgets: Sequence[Budget], folder: str | Path, max_new_tokens: int = 8,
              progress: bool = True) -> SweepResult:
    """Run (or resume) a sweep into ``folder``; returns every row the folder holds."""
    folder = Path(folder)
    for spec in methods:
        spec.create()  # unknown names and bad parameters fail before any work
    _check_folder(folder, {"format": FORMAT, "version": VERSION, "model": adapter.name, "weights": adapter.fingerprint,
                           "dataset": str(dataset),
                           "methods": [m.label for m in methods], "budgets": [budget_label(b) for b in budgets]})
    journal = folder / "rows.jsonl"
    rows = _read_journal(journal)
    done = {tuple(r[k] for k in KEY) for r in rows}
    new = 0
    root = Path(dataset).parent if Path(dataset).suffix else Path(dataset)
    try:
        with journal.open("a", encoding="utf-8") as out:
            for sample in tqdm(samples, desc="sweep", disable=not progress):
                todo = [m for m in methods if any((sample.id, m.label, budget_label(b)) not in done for b in budgets)]
                unpruned = (sample.id, UNPRUNED, "100%") not in done
                if not todo and not unpruned:
                    continue
                task = SweepTask(sample_to_row(sample, root), str(root), tuple(todo), tuple(budgets),
                                 unpruned, max_new_tokens)
                fresh = [r for r in run_task(adapter, task) if tuple(r[k] for k in KEY) not in done]
                out.write("".join(json.dumps(r) + "\n" for r in fresh))
                out.flush()
                os.fsync(out.fileno())
                rows += fresh
                new += len(fresh)
                done.update(tuple(r[k] for k in KEY) for r in fresh)
    finally:
        table = frame(rows)
        write_atomically_bytes(folder / "results.parquet", table.write_parquet)
    return SweepResult(folder, table, new)


def read_sweep(folder: str | Path) -> pl.DataFrame:
    """The rows of a sweep folder (from its journal, the source of truth)."""
    folder = Path(folder)
    if not (folder / "sweep.json").exists():
        raise SweepError(f"{folder} is not a sweep folder (no sweep.json)")
    return frame(_read_journal(folder / "rows.jsonl"))


# --- tables ----------------------------------------------------------------------------------------

def accuracy_by_budget(table: pl.DataFrame) -> pl.DataFrame:
    """Accuracy per method (rows) and budget (columns, largest first), with the unpruned accuracy
    on the same samples beside it; "n/a" methods show as nulls."""
    ok = table.filter(pl.col("status") == "ok")
    unpruned = ok.filter(pl.col("method") == UNPRUNED)
    base = unpruned["correct"].mean() if unpruned.height else None
    pruned = ok.filter(pl.col("method") != UNPRUNED)
    if not pruned.height:
        return pl.DataFrame({"method": [UNPRUNED], "unpruned": [base]})
    order = (pruned.select("budget", "budget_tokens").unique().sort("budget_tokens", descending=True)["budget"].to_list())
    acc = pruned.group_by("method", "budget").agg(pl.col("correct").mean())
    wide = acc.pivot(on="budget", index="method", values="correct").sort("method")
    return wide.select("method", *[c for c in order if c in wide.columns]).with_columns(unpruned=pl.lit(base))

