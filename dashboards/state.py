"""Cached loaders and runs behind the pages: one model per name shared by every session (inference
behind its lock), recordings and pruning runs cached per (model, input, request).

Everything here calls the workbench (``workbench.models``, ``workbench.recorder``,
``workbench.pruning``); the dashboard computes nothing of its own.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import streamlit as st
from PIL import Image

from workbench.scoring import score

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = "data/eval/samples.jsonl"
DEFAULT_MODEL = "shapes-vlm"
RESULTS_ENV = "WORKBENCH_DASHBOARD_RESULTS"
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000


class UploadError(ValueError):
    """An uploaded file that is not a usable image; the message says why."""


# --- settings ----------------------------------------------------------------------------------------

def results_root() -> Path:
    """The one folder the Compare and Failures pages may read (``--results`` or the environment)."""
    argv = sys.argv[1:]
    folder = None
    if "--results" in argv and argv.index("--results") + 1 < len(argv):
        folder = argv[argv.index("--results") + 1]
    folder = folder or os.environ.get(RESULTS_ENV) or "runs"
    path = Path(folder)
    return (path if path.is_absolute() else Path.cwd() / path).resolve()


def shown_path(path: Path) -> str:
    """``path`` as the pages show it: relative to the working folder when inside it."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return str(path)


def model_unavailable(name: str, error: Exception) -> str:
    """Why ``name`` cannot be loaded, saying what can be done here: the loader's own message names
    command-line flags, which the dashboard has none of (it loads offline)."""
    cause = str(error).split("Cause: ", 1)[-1] if "Cause: " in str(error) else ""
    if Path(name).exists() or "Cause: " not in str(error):
        return str(error).replace("--model", "the model box")
    return (f"weights for {name!r} are not available locally; the dashboard loads models offline. Type a "
            f"local checkpoint folder (config.json, the weights and the processor files) into the sidebar's "
            f"model box, or download it first, e.g. `huggingface-cli download {name}`. Cause: {cause}")


def inside_results(text: str, root: Path | None = None) -> Path:
    """``text`` (relative to the results folder, or absolute) resolved, refused with ValueError
    when it leaves the results folder (``..``, an absolute path elsewhere, a symlink out)."""
    root = (root or results_root()).resolve()
    text = (text or "").strip()
    path = Path(text)
    path = (path if path.is_absolute() else root / path).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{text!r} is outside the results folder {root}; only folders inside it can be opened")
    return path


# --- inputs ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """What the pages look at: one image and question (a data-set sample or an upload)."""

    key: str  # identifies image + question in every cache
    image: Image.Image = field(compare=False, repr=False)
    question: str
    gold: str | None = None
    sample_id: str = "upload"
    evidence: np.ndarray | None = field(default=None, compare=False, repr=False)  # boolean [H, W] mask
    scorer: str = "exact"  # the data set's scorer (``workbench.scoring``)
    references: tuple[str, ...] = ()  # all reference answers where there are several (VQA)
    options: tuple[str, ...] = ()  # multiple-choice option texts

    @staticmethod
    def of(image: Image.Image, question: str, gold=None, sample_id="upload", evidence=None,
           scorer: str = "exact", references=(), options=()) -> "Subject":
        digest = hashlib.sha256(image.tobytes() + repr(image.size).encode() + question.encode()).hexdigest()[:20]
        return Subject(digest, image, question, gold, sample_id, evidence, scorer, tuple(references), tuple(options))

    def is_correct(self, answer: str) -> bool | None:
        """Right by the data set's scorer, with all its references and options (as the sweep scores)."""
        if self.gold is None:
            return None
        return score(self.scorer, answer, self.references or (self.gold,), self.options).value == 1.0


def decode_upload(name: str, data: bytes) -> Image.Image:
    """The uploaded bytes as an RGB image; ``UploadError`` for anything else or anything too big."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"{name} is {len(data) / 2**20:.1f} MB; uploads are limited to "
                          f"{MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise UploadError(f"{name} is {width}x{height} = {width * height / 1e6:.0f} megapixels; "
                                  f"images are limited to {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels")
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except UploadError:
        raise
    except Exception as e:  # PIL raises several kinds for non-images and damaged files
        raise UploadError(f"{name} is not an image PIL can read ({type(e).__name__}: {e})") from None


@st.cache_data(show_spinner=False, max_entries=8)
def dataset(path: str) -> list:
    from workbench.samples import read_dataset

    return read_dataset(path)


def subject_of_sample(sample) -> Subject:
    return Subject.of(sample.load_image(), sample.question, sample.answer, sample.id, sample.evidence_mask(),
                      sample.scorer, sample.references, sample.options)


# --- the model -----------------------------------------------------------------------------------

@dataclass
class Loaded:
    adapter: object
    lock: threading.Lock


@st.cache_resource(show_spinner=False, max_entries=2)
def load_model(name: str) -> Loaded:
    """The model ``name`` (shipped name, hub name or local folder), loaded once for every session.
    Raises ``ModelNotAvailable`` (not cached) when it cannot be loaded."""
    from workbench.models.loading import load

    return Loaded(load(name), threading.Lock())


def prepared(model: str, subject: Subject):
    loaded = load_model(model)
    with loaded.lock:
        return loaded.adapter.prepare(subject.image, subject.question)


@st.cache_data(show_spinner=False, max_entries=64)
def layout(model: str, key: str, _subject: Subject):
    return prepared(model, _subject).layout


@st.cache_data(show_spinner=False, max_entries=64)
def answer(model: str, key: str, _subject: Subject) -> str:
    loaded = load_model(model)
    with loaded.lock:
        return loaded.adapter.answer(_subject.image, _subject.question).text


@st.cache_data(show_spinner=False, max_entries=64)
def answer_ids(model: str, key: str, _subject: Subject) -> tuple[int, ...]:
    """The token ids of the unpruned model's greedy answer."""
    loaded = load_model(model)
    with loaded.lock:
        return tuple(loaded.adapter.answer(_subject.image, _subject.question).token_ids)


@st.cache_data(show_spinner=False, max_entries=64)
def logit_lens(model: str, key: str, token_id: int, _subject: Subject):
    """``probes.logit_lens.logit_lens`` of the subject for ``token_id``."""
    from probes.logit_lens import logit_lens as lens

    loaded = load_model(model)
    with loaded.lock:
        return lens(loaded.adapter, loaded.adapter.prepare(_subject.image, _subject.question), token_id)


@st.cache_data(show_spinner=False, max_entries=32)
def recording(model: str, key: str, signals: tuple[str, ...], rows: tuple[str, ...], per_head: bool,
              layers: tuple[int, ...] | None, _subject: Subject):
    """One traced forward of the unpruned model recording ``signals`` (``workbench.recorder.record``)."""
    from workbench.recorder import record
    from workbench.recording import CaptureRequest

    loaded = load_model(model)
    stacks = ("tower", "llm") if "cls" in rows else ("llm",)
    request = CaptureRequest(signals=signals, rows=rows, per_head=per_head, layers=layers, stacks=stacks,
                             tower_layers=layers if per_head else None)
    with loaded.lock:
        prepared_input = loaded.adapter.prepare(_subject.image, _subject.question)
        return record(loaded.adapter, prepared_input, request, sample_id=_subject.sample_id,
                      question=_subject.question)


def model_facts(model: str):
    from workbench.pruning.method import ModelFacts

    return ModelFacts.of(load_model(model).adapter)


@dataclass(frozen=True)
class MethodRun:
    """One method at one budget on one subject: the plan actually executed and the answer."""

    method: str
    plan: object  # KeepPlan (every stage applied, the callback's included)
    answer: str
    correct: bool | None
    error: str | None = None
    visual_tokens_per_layer: tuple[int, ...] = ()  # visual tokens each decoder layer ran on
    flops_ratio: float | None = None  # prefill FLOPs as a fraction of the unpruned prefill's

    @property
    def effective_tokens(self) -> float | None:
        """Visual tokens averaged over the decoder's layers (the sweep's ``effective_tokens``)."""
        return float(np.mean(self.visual_tokens_per_layer)) if self.visual_tokens_per_layer else None

    @property
    def kept_count(self) -> int:
        return len(self.plan.final_kept) if self.plan is not None else 0


@st.cache_data(show_spinner=False, max_entries=256)
def method_run(model: str, key: str, method: str, budget: int, _subject: Subject) -> MethodRun:
    """``workbench.pruning.run.run_method`` for one method; a method that cannot run on this model
    comes back with ``error`` set."""
    from workbench.errors import UserError
    from workbench.pruning.registry import create_method
    from workbench.pruning.run import run_method

    loaded = load_model(model)
    try:
        with loaded.lock:
            prepared_input = loaded.adapter.prepare(_subject.image, _subject.question)
            execution = run_method(loaded.adapter, prepared_input, create_method(method), budget,
                                   gold_answer=_subject.gold)
    except (UserError, ValueError) as e:
        return MethodRun(method, None, "", None, str(e))
    from workbench.pruning.flops import DecoderShape, prefill_flops

    shape = DecoderShape.of(loaded.adapter.language_model().config)
    full = prefill_flops(shape, [prepared_input.layout.sequence_length] * len(loaded.adapter.decoder_layers()))
    return MethodRun(method, execution.plan, execution.answer, _subject.is_correct(execution.answer),
                     visual_tokens_per_layer=tuple(int(n) for n in execution.visual_tokens_per_layer),
                     flops_ratio=prefill_flops(shape, execution.tokens_per_layer) / full)


def evidence_tokens(layout, subject: Subject) -> np.ndarray | None:
    """Boolean [N]: the visual tokens over the subject's evidence pixels (None without evidence)."""
    if subject.evidence is None:
        return None
    return layout.evidence_tokens(subject.evidence)


# --- results folders -------------------------------------------------------------------------------

@st.cache_data(show_spinner=False, max_entries=16, ttl=60)
def results_table(folder: str):
    """The rows of a sweep folder (``workbench.sweep.read_sweep``), of a folder's ``results.parquet``,
    or of the ``sweep/`` inside a report folder. The caller has checked that ``folder`` is inside the
    results folder."""
    import polars as pl

    from workbench.sweep import SweepError, read_sweep

    path = sweep_folder(Path(folder))
    if (path / "sweep.json").exists():
        return read_sweep(path)
    if (path / "results.parquet").exists():
        return pl.read_parquet(path / "results.parquet")
    raise SweepError(f"{folder} holds no sweep: neither sweep.json nor results.parquet, nor a report's sweep/ "
                     "folder with them")


def sweep_folder(path: Path) -> Path:
    """The folder whose rows to read: ``path`` itself, or the ``sweep/`` a report folder holds."""
    inner = path / "sweep"
    if not (path / "sweep.json").exists() and not (path / "results.parquet").exists() and (
            (inner / "sweep.json").exists() or (inner / "results.parquet").exists()):
        return inner
    return path
