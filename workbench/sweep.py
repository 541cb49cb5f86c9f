"""Accuracy-vs-budget sweeps: a data set x methods x budgets, one table row per (sample, method, budget).

The unit of work is a ``SweepTask`` (one sample, the methods and budgets still to run): plain,
JSON-serialisable data in, table rows out (``run_task``), so any engine that can ship JSON and
hold a loaded model can spread a sweep over processes, GPUs or machines. One recording of the
unpruned forward per sample serves every method.

On disk a sweep is a folder: ``sweep.json`` (model and its weights fingerprint, data set and its
content hash, methods with their parameters and code versions, budgets; ``workbench.sweep_identity``),
``rows.jsonl`` (the journal: each finished sample's rows are appended and synced before the next
sample starts, so an interrupted run loses at most the sample in progress) and ``results.parquet``
(every row, rewritten atomically when a run ends or is interrupted). Re-running into the same
folder skips every (sample, method, budget) already in the journal; a resume whose model, data
set or methods differ from the folder's is refused. One process writes a folder at a time
(``workbench.folder_lock``); readers (``read_sweep``) never write.

A sample whose image cannot be decoded gets one "error" row per (method, budget) naming the file,
and the sweep goes on.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import polars as pl
from tqdm import tqdm

from workbench.errors import UserError
from workbench.files import check_output, write_atomically, write_atomically_bytes
from workbench.folder_lock import exclusive
from workbench import pipeline
from workbench.images import ImageError, blank_image
from workbench.models.base import ModelAdapter, PreparedInput
from workbench.pruning.budget import Budget, check_budget, resolve_budget
from workbench.pruning.method import PruningMethod
from workbench.pruning.plan import PRE_LLM, KeepPlan, Stage
from workbench.pruning.registry import create_method
from workbench.fitting import Fitting
from workbench.pipeline import UNPRUNED, budget_label
from workbench.samples import Sample, sample_from_row, sample_to_row
from workbench.sweep_identity import (SweepIdentityError, check_dataset, check_methods, dataset_fingerprint,
                                     method_version)

FORMAT = "workbench-sweep"
VERSION = 2  # 2: rows hold the lossless plan (scores), the scorer's reading, loyalty and cost


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
        label = re.fullmatch(r"\s*([\w+-]+)\((.*)\)\s*", text)
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
            if any(key.strip() == k for k, _ in params):
                raise SweepError(f"method parameter {key.strip()!r} is given twice in {text!r}")
            params.append((key.strip(), tuple(parsed) if isinstance(parsed, list) else parsed))
        return MethodSpec(name.strip(), tuple(sorted(params, key=lambda p: p[0])))


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


RANDOM_SEEDS = 5  # the random baseline runs this many seeds in the default method list, for its spread


def all_methods() -> list[MethodSpec]:
    """Every registered method with its defaults, and the random baseline over ``RANDOM_SEEDS``
    seeds (seed 0 is its default)."""
    from workbench.pruning.registry import available_methods

    specs = [MethodSpec(name) for name in available_methods()]
    return specs + [MethodSpec("random", (("seed", seed),)) for seed in range(1, RANDOM_SEEDS)]


# --- one sample ------------------------------------------------------------------------------------

def _row(sample: Sample, method: str, params: dict, budget: str, budget_tokens: int, n_visual: int) -> dict:
    return {"sample_id": sample.id, "question_type": sample.question_type or "all", "method": method,
            "params": json.dumps(params, sort_keys=True, default=list), "budget": budget,
            "budget_tokens": budget_tokens, "n_visual": n_visual, "gold_answer": sample.answer}


CONTROLS = ("control:zero_tokens", "control:blank_image")
# The rows every sample gets besides its methods': (label, budget column).
REFERENCE_ROWS = ((UNPRUNED, "100%"), (CONTROLS[0], "0"), (CONTROLS[1], "100%"))


def run_task(adapter: ModelAdapter, task: SweepTask) -> list[dict]:
    """Every row of one sample, each a ``pipeline.run``: the unpruned run and the controls (every
    visual token removed before the LLM: what the image is worth; the unpruned model on a blank
    image of the same size), then each method at each budget, with its loyalty to the unpruned
    answer; one "error" row per (method, budget) when the sample's image cannot be decoded."""
    return run_tasks(adapter, [task])[0]


def run_tasks(adapter: ModelAdapter, tasks: Sequence[SweepTask]) -> list[list[dict]]:
    """``run_task`` of several samples at once: each run (the unpruned one, each control, each
    method at each budget) executes the samples as one batch (``pipeline.run_batch``). The rows
    are those of one sample at a time, timings and float rounding aside."""
    rows: list[list[dict] | None] = [None] * len(tasks)
    created: dict[str, PruningMethod] = {}
    made: dict[tuple[str, ...], list[tuple[int, Sample, PreparedInput]]] = {}  # by the methods to record for
    for i, task in enumerate(tasks):
        sample = sample_from_row(task.sample, Path(task.root), f"task {task.sample.get('id')}")
        for spec in task.methods:
            created.setdefault(spec.label, spec.create())
        try:
            prepared = adapter.prepare(sample.load_image(), sample.question)
        except ImageError as e:
            rows[i] = _error_rows(sample, task, str(e))
            continue
        made.setdefault(tuple(spec.label for spec in task.methods), []).append((i, sample, prepared))
    readies = {}
    for labels, members in made.items():
        prepared = pipeline.prepare_inputs(adapter, [(sample, item) for _, sample, item in members],
                                           [created[label] for label in labels])
        readies.update((i, ready) for (i, *_), ready in zip(members, prepared))
    readies = dict(sorted(readies.items()))
    # The samples no recording ran the tower for get their decoder inputs from one tower pass on all.
    adapter.decoder_inputs_batch([ready.prepared for ready in readies.values()])
    # One batch per (what runs, max_new_tokens): the unpruned run first (the others start from its
    # prefill), then the controls, then each method at each budget, in the tasks' order.
    results: dict[int, list] = {i: [] for i in readies}
    unpruned = {}
    for tokens, members in _groups(readies, tasks, lambda task: True):
        for i, result in zip(members, pipeline.run_batch(adapter, [readies[i] for i in members], None,
                                                         max_new_tokens=tokens)):
            unpruned[i] = result
    for tokens, members in _groups(readies, tasks, lambda task: task.include_unpruned):
        controls = _controls(adapter, [readies[i] for i in members], tokens)
        for i, *mine in zip(members, *controls):
            results[i] += [unpruned[i], *mine]
    keys = list(dict.fromkeys(key for task in tasks for key in _units(task)))
    for label, budget in keys:
        for tokens, members in _groups(readies, tasks, lambda task: (label, budget) in _units(task)):
            batch = pipeline.run_batch(adapter, [readies[i] for i in members], created[label], budget, label=label,
                                       max_new_tokens=tokens)
            for i, result in zip(members, batch):
                results[i].append(result)
    for i, ready in readies.items():
        sample = ready.sample
        context = {"question_type": sample.question_type or "all", "gold_answer": sample.answer}
        rows[i] = [result.row() | context | {"record_time_s": 0.0 if result is unpruned[i] else ready.record_seconds,
                                             "loyal": pipeline.loyal(result, unpruned[i])} for result in results[i]]
    return rows


def _units(task: SweepTask) -> list[tuple[str, Budget]]:
    return [(spec.label, budget) for spec in task.methods for budget in task.budgets]


def _groups(readies: dict, tasks: Sequence[SweepTask], wanted: Callable[[SweepTask], bool]) -> list[tuple[int, list[int]]]:
    """The prepared tasks that ``wanted``, grouped by ``max_new_tokens``."""
    groups: dict[int, list[int]] = {}
    for i in readies:
        if wanted(tasks[i]):
            groups.setdefault(tasks[i].max_new_tokens, []).append(i)
    return list(groups.items())


def _controls(adapter: ModelAdapter, readies: list, max_new_tokens: int) -> tuple[list, list]:
    """The zero-token and blank-image controls of each prepared sample, each run as one batch."""
    zero = [KeepPlan(CONTROLS[0], 0, ready.n_visual, (Stage(PRE_LLM, ()),)) for ready in readies]
    blanks: dict[tuple[int, int], PreparedInput] = {}  # one processed blank image per size, for all its samples
    for ready in readies:
        size = ready.prepared.image_size
        if size not in blanks:
            blanks[size] = adapter.prepare(blank_image(size), ready.sample.question)
    blank = [pipeline.on_image(adapter, ready, blanks[ready.prepared.image_size]) for ready in readies]
    adapter.decoder_inputs_batch([ready.prepared for ready in blank])  # one tower pass, on the distinct blank images
    return (pipeline.run_batch(adapter, readies, None, plans=zero, label=CONTROLS[0], max_new_tokens=max_new_tokens),
            pipeline.run_batch(adapter, blank, None, label=CONTROLS[1], max_new_tokens=max_new_tokens,
                               keep_prefill=False))


def _error_rows(sample: Sample, task: SweepTask, message: str) -> list[dict]:
    """The rows of a sample that could not be run: same keys as its rows would have had."""
    references = [(label, budget, {}) for label, budget in REFERENCE_ROWS]
    labels = (references if task.include_unpruned else []) + \
        [(spec.label, budget_label(b), spec.create().params()) for spec in task.methods for b in task.budgets]
    return [_row(sample, label, params, budget, None, None) | {"status": "error", "message": message}
            for label, budget, params in labels]


# --- the folder ------------------------------------------------------------------------------------

SCHEMA = {
    "sample_id": pl.String, "question_type": pl.String, "method": pl.String, "params": pl.String,
    "budget": pl.String, "budget_tokens": pl.Int64, "n_visual": pl.Int64, "gold_answer": pl.String,
    "record_time_s": pl.Float64, "status": pl.String, "message": pl.String, "stages": pl.String,
    "kept_count": pl.Int64, "budget_gap": pl.Int64, "visual_tokens_per_layer": pl.List(pl.Int64),
    "effective_tokens": pl.Float64, "predicted_answer": pl.String, "extracted_answer": pl.String,
    "score": pl.Float64, "correct": pl.Boolean, "stopped": pl.Boolean, "loyal": pl.Boolean,
    "gold_logprob": pl.Float64, "answer_logprob": pl.Float64, "evidence_tokens": pl.Int64,
    "evidence_recall": pl.Float64, "select_time_s": pl.Float64, "prefill_time_s": pl.Float64,
    "wall_time_s": pl.Float64, "prefill_flops": pl.Float64, "flops_ratio": pl.Float64,
}
KEY = ("sample_id", "method", "budget")
# Journals written before the answer columns were named unambiguously.
RENAMED = {"gold": "gold_answer", "answer": "predicted_answer"}


JOURNAL_CHUNK = 1000  # rows made into a table at a time: a journal is never held whole as dicts


def _journal_rows(path: Path) -> Iterator[dict]:
    """Every complete row, streamed; a torn last line (a run killed mid-write, or a writer
    mid-append) is left out, not repaired: readers never write (the next writer repairs it,
    ``_repair_journal``)."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                row = None
            if not isinstance(row, dict) or any(k not in row for k in KEY):
                raise SweepError(f"{path}:{number} is not a sweep row; the journal is damaged "
                                 "(move the folder aside to start this sweep again)")
            yield {RENAMED.get(k, k): v for k, v in row.items()}


def _journal_frame(path: Path) -> pl.DataFrame:
    """The journal as the sweep table, ``JOURNAL_CHUNK`` rows at a time."""
    rows = _journal_rows(path)
    frames = [frame(list(itertools.islice(rows, JOURNAL_CHUNK)))]
    while frames[-1].height == JOURNAL_CHUNK:
        frames.append(frame(list(itertools.islice(rows, JOURNAL_CHUNK))))
    return pl.concat(frames)


def _repair_journal(path: Path) -> None:
    """Cut a torn last line off the journal, so that appended rows start on a line of their own.
    Only the writer, holding the folder's lock, calls this."""
    if path.exists():
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with path.open("r+b") as f:
                f.truncate(end)


def frame(rows: Sequence[dict]) -> pl.DataFrame:
    try:
        return pl.DataFrame([{k: r.get(k) for k in SCHEMA} for r in rows], schema=SCHEMA)
    except (TypeError, ValueError, pl.exceptions.PolarsError) as e:  # a row edited by hand, or of another schema
        raise SweepError(f"a sweep row does not fit the sweep table ({type(e).__name__}: {e}); "
                         "the journal is damaged (move the folder aside to start this sweep again)") from None


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
        return None  # _read_manifest reports it


def _read_manifest(folder: Path) -> dict | None:
    """The folder's sweep.json; None when there is none. Refuses a folder that holds anything else
    (never ours to write into): only our own lock file may be there without a sweep.json."""
    path = folder / "sweep.json"
    if not path.exists():
        if folder.exists() and any(p.name != ".lock" for p in folder.iterdir()):
            raise SweepError(f"{folder} exists and is not a sweep folder; use an empty or new --out folder")
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SweepError(f"{path} is not valid JSON; not a sweep folder (move it aside to start fresh)") from None
    if not isinstance(old, dict) or old.get("format") != FORMAT:
        raise SweepError(f"{folder} is not a sweep folder (its sweep.json has no {FORMAT!r} format)")
    return old


def check_sweep_folder(folder: str | Path) -> None:
    """What can be checked before the model loads: ``folder`` can be written, and is new, empty
    or a sweep folder. Writes nothing."""
    folder = check_output(folder)
    _read_manifest(folder)


def _merged_manifest(folder: Path, manifest: dict) -> dict:
    """The manifest to write: this run's, merged with the folder's after checking that this run
    would add rows of the same experiment (model, weights, data set, method versions)."""
    old = _read_manifest(folder)
    if old is None:
        return manifest
    if old.get("version") != VERSION:
        raise SweepError(_older_format(folder, old))
    for key in ("model", "dataset"):
        if old.get(key) != manifest[key]:
            raise SweepError(f"{folder} holds a sweep of {key} {old.get(key)!r}, not {manifest[key]!r}; "
                             "use another --out folder")
    if old.get("weights") != manifest["weights"]:
        was = f"fingerprint {old['weights']}" if old.get("weights") else "made before sweeps recorded one"
        raise SweepError(f"{folder} holds a sweep of {manifest['model']!r} with other weights ({was}; now "
                         f"{manifest['weights']}); resuming would mix answers of two models: use another "
                         "--out folder, or move this one aside")
    check_dataset(folder, old, manifest["dataset_sha256"])
    check_methods(folder, old, manifest["method_versions"])
    return manifest | {"methods": sorted(set(old.get("methods", [])) | set(manifest["methods"])),
                       "budgets": sorted(set(old.get("budgets", [])) | set(manifest["budgets"])),
                       "method_versions": old.get("method_versions", {}) | manifest["method_versions"]}


def _older_format(folder: Path, old: dict) -> str:
    return (f"{folder} holds a sweep of format version {old.get('version')}, this workbench writes version "
            f"{VERSION} (rows with the lossless plan, the scorer's reading, loyalty and cost); resuming would "
            "mix the two: use another --out folder, or move this one aside")


def identity_mismatch(folder: str | Path, dataset: str, methods: Sequence[MethodSpec]) -> str | None:
    """Why the sweep in ``folder`` is of another data set content or other method versions than
    ``dataset`` and ``methods`` (the message a resume would refuse with), or None. Writes nothing."""
    folder = Path(folder)
    old = _read_manifest(folder)
    if old is None:
        return None
    if old.get("version") != VERSION:
        return _older_format(folder, old)
    try:
        check_dataset(folder, old, dataset_fingerprint(dataset))
        check_methods(folder, old, {spec.label: method_version(spec.create()) for spec in methods})
    except SweepIdentityError as e:
        return str(e)
    return None


def _check_budget_counts(runner: "Runner", samples: Sequence[Sample], budgets: Sequence[Budget]) -> None:
    """Budgets that cannot apply to this model, before the folder is touched: counts are checked
    against the visual tokens of the first sample whose image decodes."""
    for budget in budgets:
        try:
            check_budget(budget)
        except ValueError as e:
            raise SweepError(str(e)) from None
    for sample in samples:
        n = runner.visual_tokens(sample)
        if n is None:
            continue  # the image does not decode: becomes that sample's error rows
        for budget in budgets:
            try:
                resolve_budget(budget, n)
            except ValueError as e:
                raise SweepError(f"{e} of {runner.model}") from None
        return


@dataclass(frozen=True)
class Runner:
    """How a sweep reaches its model: which model it is (name and weights fingerprint, for the
    folder's manifest), how many visual tokens a sample gets (None when its image does not decode;
    for the budget checks), and ``run``: each task's rows, in the order the tasks finish. In this
    process (``local_runner``) or on workers (``workbench.distributed``); either way the process
    that calls ``sweep_with`` is the folder's one writer."""

    model: str
    fingerprint: str
    visual_tokens: Callable[[Sample], int | None]
    run: Callable[[Sequence[SweepTask]], Iterator[list[dict]]]


def local_runner(adapter: ModelAdapter, batch_size: int = 1) -> Runner:
    """Every task in this process on ``adapter``, ``batch_size`` samples at a time (``run_tasks``)."""

    def visual_tokens(sample: Sample) -> int | None:
        try:
            return adapter.prepare(sample.load_image(), sample.question).layout.n_tokens
        except ImageError:
            return None

    fitting = task_fitting(batch_size)
    return Runner(adapter.name, adapter.fingerprint, visual_tokens,
                  lambda tasks: (rows for chunk in fitting.run(functools.partial(run_tasks, adapter), tasks)
                                 for rows in chunk))


def task_fitting(batch_size: int | None) -> Fitting:
    """Sweep tasks run ``batch_size`` at a time, fewer for good once a batch runs out of device memory."""
    return Fitting(batch_size, "sweep", lambda task: f"sample {task.sample.get('id')}")


def run_sweep(adapter: ModelAdapter, samples: Sequence[Sample], dataset: str, methods: Sequence[MethodSpec],
              budgets: Sequence[Budget], folder: str | Path, max_new_tokens: int = 8,
              progress: bool = True, batch_size: int = 1) -> SweepResult:
    """Run (or resume) a sweep into ``folder`` in this process, ``batch_size`` samples per batch;
    returns every row the folder holds."""
    return sweep_with(local_runner(adapter, batch_size), samples, dataset, methods, budgets, folder,
                      max_new_tokens, progress)


def sweep_with(runner: Runner, samples: Sequence[Sample], dataset: str, methods: Sequence[MethodSpec],
               budgets: Sequence[Budget], folder: str | Path, max_new_tokens: int = 8,
               progress: bool = True) -> SweepResult:
    """Run (or resume) a sweep into ``folder`` with ``runner``; returns every row the folder holds.
    Everything is checked before the folder is created or changed; ``FolderLocked`` if another
    process writes it."""
    folder = Path(folder)
    created = {spec.label: spec.create() for spec in methods}  # unknown names and bad parameters
    check_sweep_folder(folder)
    _check_budget_counts(runner, samples, budgets)
    manifest = {"format": FORMAT, "version": VERSION, "model": runner.model, "weights": runner.fingerprint,
                "dataset": str(dataset), "dataset_sha256": dataset_fingerprint(dataset),
                "methods": [m.label for m in methods], "budgets": [budget_label(b) for b in budgets],
                "method_versions": {label: method_version(m) for label, m in created.items()}}
    _merged_manifest(folder, manifest)  # refuse a mismatch before creating anything
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder, "sweep folder"):
        # Checked again under the lock: another writer may have changed the folder meanwhile.
        write_atomically(folder / "sweep.json", json.dumps(_merged_manifest(folder, manifest), indent=1))
        return _run_locked(runner, samples, dataset, methods, budgets, folder, max_new_tokens, progress)


def _run_locked(runner: Runner, samples, dataset, methods, budgets, folder: Path, max_new_tokens,
                progress) -> SweepResult:
    journal = folder / "rows.jsonl"
    _repair_journal(journal)
    # Only the keys of the rows done are held while the sweep runs; the rows themselves are in the
    # journal, and the table is read back from it at the end, so memory does not grow with rows.
    # "error" rows count as done: a fixed image changes the data set's content hash, which makes
    # it another sweep (refused on resume), so retrying them here could only fail again.
    done = {tuple(r[k] for k in KEY) for r in _journal_rows(journal)}
    new = 0
    root = Path(dataset).parent if Path(dataset).suffix else Path(dataset)
    tasks = []
    for sample in samples:
        todo = [m for m in methods if any((sample.id, m.label, budget_label(b)) not in done for b in budgets)]
        # A journal cut after the unpruned row still lacks a control: the references run again
        # (their rows already journalled are not written twice).
        unpruned = any((sample.id, label, budget) not in done for label, budget in REFERENCE_ROWS)
        if todo or unpruned:
            tasks.append(SweepTask(sample_to_row(sample, root), str(root), tuple(todo), tuple(budgets),
                                   unpruned, max_new_tokens))
    try:
        with journal.open("a", encoding="utf-8") as out:
            # Rows are journalled as each task finishes (in any order when tasks run in parallel),
            # and only here: the one writer. A key already journalled is never written twice.
            for task_rows in tqdm(runner.run(tasks), desc="sweep", total=len(tasks), disable=not progress):
                fresh = [r for r in task_rows if tuple(r[k] for k in KEY) not in done]
                out.write("".join(json.dumps(r) + "\n" for r in fresh))
                out.flush()
                os.fsync(out.fileno())
                new += len(fresh)
                done.update(tuple(r[k] for k in KEY) for r in fresh)
    finally:
        table = _journal_frame(journal)
        write_atomically_bytes(folder / "results.parquet", table.write_parquet)
    return SweepResult(folder, table, new)


def read_sweep(folder: str | Path) -> pl.DataFrame:
    """The rows of a sweep folder (from its journal, the source of truth)."""
    folder = Path(folder)
    if not (folder / "sweep.json").exists():
        raise SweepError(f"{folder} is not a sweep folder (no sweep.json)")
    return _journal_frame(folder / "rows.jsonl")


# --- tables ----------------------------------------------------------------------------------------

def accuracy_by_budget(table: pl.DataFrame) -> pl.DataFrame:
    """Accuracy per method (rows) and budget (columns, largest first), with the unpruned accuracy
    on the same samples beside it and the controls' (zero visual tokens, blank image) after it;
    "n/a" methods show as nulls."""
    ok = table.filter(pl.col("status") == "ok")
    unpruned = ok.filter(pl.col("method") == UNPRUNED)
    base = unpruned["correct"].mean() if unpruned.height else None
    controls = {name: ok.filter(pl.col("method") == name)["correct"].mean() for name in CONTROLS
                if ok.filter(pl.col("method") == name).height}
    pruned = ok.filter(~pl.col("method").is_in([UNPRUNED, *CONTROLS]))
    if not pruned.height:
        return pl.DataFrame({"method": [UNPRUNED], "unpruned": [base]})
    order = (pruned.select("budget", "budget_tokens").unique().sort("budget_tokens", descending=True)["budget"].to_list())
    acc = pruned.group_by("method", "budget").agg(pl.col("correct").mean())
    wide = acc.pivot(on="budget", index="method", values="correct").sort("method")
    return wide.select("method", *[c for c in order if c in wide.columns]).with_columns(
        unpruned=pl.lit(base), **{name.removeprefix("control:"): pl.lit(value) for name, value in controls.items()})

