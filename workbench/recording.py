"""What a capture records, and how it is saved: ``CaptureRequest`` in, ``Recording`` out.

A ``Recording`` holds only what its request asked for, indexed by ``EntryKey`` (signal, stack,
layer, query-row kind, view): dense tensors of shape [rows, keys] (or [heads, rows, keys] when
per-head values were asked for), tidy tables for sparse findings (massive activations), the query
positions behind every row kind, the sample's ``VisualLayout`` and its identity.

On disk a recording is a folder: ``tensors.safetensors`` (every tensor and the layout arrays),
``tables/*.parquet`` (polars) and ``manifest.json`` (schema version, identity, request, the entry
index, and each file's size and SHA-256). It is written to a temporary sibling folder and renamed
into place, and read back without pickle; any folder that is not a complete recording of this
schema raises ``RecordingError`` with a plain message.

The layout's tower map (``VisualLayout.tower_owner``) is stored as ``layout/tower_owner/<view>``
arrays, their count as the manifest's ``layout.tower_views``. It was added without a schema bump:
recordings written before it (no ``tower_views``) still load, with an empty (unknown) map.
Likewise the identity's ``weights`` (the model's weights fingerprint, so a recording says which
weights its signals came from): older recordings load with "".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Mapping

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file

from probes.capture import ROW_KINDS, STACKS
from probes.registry import ProbeOptions, available_signals, signal_spec
from workbench.errors import UserError
from workbench.layout import TokenGroup, VisualLayout

FORMAT = "workbench-recording"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"

# Everything one traced forward records (the saliency signals need extra passes: ask for them).
SINGLE_FORWARD_SIGNALS = (
    "attention", "attention_mass", "attention_norope", "attention_norope_visual", "kobayashi", "rollout",
    "contribution", "contribution_residual", "flowcut", "massive_activations", "sink_share", "visual_sink_score",
    "hidden_norm", "transition_magnitude", "transition_direction",
)
SALIENCY_SIGNALS = ("grad_x_input", "attention_x_gradient", "occlusion")


class RecordingError(UserError, ValueError):
    """A folder that is not a complete recording of this schema; the message says why."""


# --- the request --------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptureRequest:
    """What to record.

    ``layers`` / ``tower_layers``: decoder / vision-tower layer indices (negative ones count from
    the end); None records every layer. ``rows``: query row kinds (``probes.capture.ROW_KINDS``);
    each applies to the stacks it makes sense in. ``graph_rows``: the rows of the contribution
    graph. ``per_head``: keep a head axis instead of the signal's head reduction.
    ``stacks``: "tower" and/or "llm". The rest are the probes' thresholds and batch sizes.
    """

    signals: tuple[str, ...] = SINGLE_FORWARD_SIGNALS
    layers: tuple[int, ...] | None = None
    tower_layers: tuple[int, ...] | None = None
    rows: tuple[str, ...] = ("last", "cls", "mean")
    per_head: bool = False
    stacks: tuple[str, ...] = STACKS
    graph_rows: tuple[str, ...] = ("last", "cls")
    occlusion_groups: tuple[int, ...] = (1,)
    sink_ratio: float = 100.0
    sink_floor: float = 20.0
    var_tau: float = 20.0
    batch_size: int = 16
    max_answer_tokens: int = 8

    def __post_init__(self):
        known = set(available_signals())
        for name, values, valid in (("signal", self.signals, known), ("row kind", self.rows, set(ROW_KINDS)),
                                    ("row kind", self.graph_rows, set(ROW_KINDS)), ("stack", self.stacks, set(STACKS))):
            unknown = [v for v in values if v not in valid]
            if unknown:
                raise ValueError(f"unknown {name} {unknown[0]!r}; available: {', '.join(sorted(valid))}")
        if not self.signals:
            raise ValueError("no signals requested")
        if any(k < 1 for k in self.occlusion_groups) or self.batch_size < 1:
            raise ValueError("occlusion group sizes and the batch size must be positive")

    def probe_options(self) -> ProbeOptions:
        return ProbeOptions(per_head=self.per_head, graph_rows=self.graph_rows, sink_ratio=self.sink_ratio,
                            sink_floor=self.sink_floor, var_tau=self.var_tau,
                            occlusion_groups=self.occlusion_groups, batch_size=self.batch_size)

    def layers_of(self, stack: str) -> tuple[int, ...] | None:
        return self.tower_layers if stack == "tower" else self.layers

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(data: Mapping) -> "CaptureRequest":
        names = {f.name for f in fields(CaptureRequest)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names}
        return CaptureRequest(**values)


# --- the recording ------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class EntryKey:
    signal: str
    stack: str
    layer: int  # -1: the stack's input (saliency on the decoder's input embeddings)
    rows: str  # a row kind, "tokens" (one value per token), "answer", or "k<k>" (occlusion)
    view: int = 0  # which sequence of the stack's batch (a tower's tiles); 0 for the LLM

    def name(self) -> str:
        return f"{self.signal}/{self.stack}/{self.layer}/{self.rows}/{self.view}"

    @staticmethod
    def parse(name: str) -> "EntryKey":
        signal, stack, layer, rows, view = name.split("/")
        return EntryKey(signal, stack, int(layer), rows, int(view))


@dataclass(frozen=True)
class Identity:
    model: str
    sample_id: str
    question: str
    prompt: str
    answer: str | None = None
    weights: str = ""  # the model's weights_fingerprint; "" in recordings made before it was kept


@dataclass(frozen=True)
class Recording:
    """Signals of one sample. ``tensors``: [R, K], or [H, R, K] for the keys in ``per_head``.
    ``row_positions``: "stack/kind/view" -> the sequence positions of that row kind's rows."""

    identity: Identity
    request: CaptureRequest
    layout: VisualLayout
    tensors: Mapping[EntryKey, torch.Tensor]
    per_head: frozenset[EntryKey] = frozenset()
    tables: Mapping[str, pl.DataFrame] = field(default_factory=dict)
    row_positions: Mapping[str, torch.Tensor] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def keys(self, signal: str | None = None, stack: str | None = None) -> list[EntryKey]:
        return sorted(k for k in self.tensors
                      if (signal is None or k.signal == signal) and (stack is None or k.stack == stack))

    def layers(self, signal: str, stack: str = "llm") -> list[int]:
        return sorted({k.layer for k in self.keys(signal, stack)})

    def get(self, signal: str, layer: int, rows: str = "last", stack: str = "llm",
            head: int | None = None, view: int = 0) -> torch.Tensor:
        """Values [R, K] of one entry: head ``head`` if given (per-head recordings only), else
        the signal's head reduction."""
        key = EntryKey(signal, stack, layer, rows, view)
        if key not in self.tensors:
            recorded = ", ".join(k.name() for k in self.keys(signal, stack)[:8]) or "none"
            raise KeyError(f"{key.name()} was not recorded; recorded for this signal: {recorded}")
        value = self.tensors[key]
        if key not in self.per_head:
            if head is not None:
                raise KeyError(f"{key.name()} was recorded without per-head values")
            return value
        if head is not None:
            return value[head]
        return value.sum(0) if signal_spec(signal).heads == "sum" else value.mean(0)

    def table(self, name: str) -> pl.DataFrame:
        if name not in self.tables:
            raise KeyError(f"no table {name!r}; recorded tables: {', '.join(sorted(self.tables)) or 'none'}")
        return self.tables[name]

    def rows_of(self, kind: str, stack: str = "llm", view: int = 0) -> torch.Tensor:
        return self.row_positions[f"{stack}/{kind}/{view}"]

    # --- disk -----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        """Write the recording to ``folder`` atomically (a complete folder or the old one). An
        existing ``folder`` is replaced only when it is a recording (``check_target``)."""
        folder = check_target(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            self._write(tmp)
            _replace_folder(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def _write(self, folder: Path) -> None:
        arrays = {f"entry/{k.name()}": v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        arrays |= {f"rows/{name}": v.detach().cpu().contiguous() for name, v in self.row_positions.items()}
        layout = self.layout
        for name in ("positions", "group", "cell", "boxes", "separators"):
            arrays[f"layout/{name}"] = torch.from_numpy(np.ascontiguousarray(getattr(layout, name)))
        for view, owner in enumerate(layout.tower_owner):
            arrays[f"layout/tower_owner/{view}"] = torch.from_numpy(np.ascontiguousarray(owner, dtype=np.int64))
        save_file(arrays, folder / TENSORS)
        (folder / "tables").mkdir()
        for name, frame in self.tables.items():
            frame.write_parquet(folder / "tables" / f"{name}.parquet")
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION,
            "identity": asdict(self.identity), "request": self.request.to_json(),
            "entries": [{"key": k.name(), "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                         "per_head": k in self.per_head} for k, v in sorted(self.tensors.items())],
            "tables": sorted(self.tables), "row_positions": sorted(self.row_positions),
            "layout": {"groups": [asdict(g) for g in layout.groups],
                       "image_sizes": [list(s) for s in layout.image_sizes], "sequence_length": layout.sequence_length,
                       "tower_views": len(layout.tower_owner)},
            "notes": list(self.notes), "files": files,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")

    @staticmethod
    def load(folder: str | Path) -> "Recording":
        """Read a recording written by ``save``; ``RecordingError`` if it is not one, or is damaged."""
        folder = Path(folder)
        manifest = _read_manifest(folder)
        for name, info in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                raise RecordingError(f"{folder}: {name} is missing; the recording is incomplete")
            if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
                raise RecordingError(f"{folder}: {name} is truncated or was changed after it was written")
        try:
            arrays = load_file(folder / TENSORS)
            tables = {name: pl.read_parquet(folder / "tables" / f"{name}.parquet") for name in manifest["tables"]}
            layout_info = manifest["layout"]
            layout = VisualLayout(
                positions=arrays["layout/positions"].numpy(), group=arrays["layout/group"].numpy(),
                cell=arrays["layout/cell"].numpy(), boxes=arrays["layout/boxes"].numpy(),
                groups=tuple(TokenGroup(**g) for g in layout_info["groups"]),
                image_sizes=tuple(tuple(s) for s in layout_info["image_sizes"]),
                sequence_length=layout_info["sequence_length"], separators=arrays["layout/separators"].numpy(),
                tower_owner=tuple(arrays[f"layout/tower_owner/{v}"].numpy()
                                  for v in range(layout_info.get("tower_views", 0))),
            )
            entries = {EntryKey.parse(e["key"]): e["per_head"] for e in manifest["entries"]}
            tensors = {key: arrays[f"entry/{key.name()}"] for key in entries}
            rows = {name: arrays[f"rows/{name}"] for name in manifest["row_positions"]}
            return Recording(
                identity=Identity(**manifest["identity"]), request=CaptureRequest.from_json(manifest["request"]),
                layout=layout, tensors=tensors, per_head=frozenset(k for k, ph in entries.items() if ph),
                tables=tables, row_positions=rows, notes=tuple(manifest["notes"]),
            )
        except RecordingError:
            raise
        except Exception as e:  # a file that passed the checksum but does not hold what the manifest says
            raise RecordingError(f"{folder}: not a readable recording ({type(e).__name__}: {e})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise RecordingError(f"{folder}: no such recording folder")
    if not path.is_file():
        raise RecordingError(f"{folder}: no {MANIFEST}; this is not a workbench recording")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RecordingError(f"{folder}: {MANIFEST} is not valid JSON (truncated?)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RecordingError(f"{folder}: {MANIFEST} is not a workbench recording manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RecordingError(f"{folder}: recording schema version {manifest.get('schema_version')!r}; "
                             f"this workbench reads version {SCHEMA_VERSION}")
    return manifest


def check_target(folder: str | Path) -> Path:
    """``folder`` if a recording may be written there: it does not exist, or holds a recording
    (which the new one replaces). Anything else is the user's and is refused, never moved or
    deleted."""
    from workbench.files import check_output

    folder = check_output(folder)
    if folder.exists() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
        raise RecordingError(f"{folder} exists and is not a workbench recording; refusing to replace it "
                             "(give a new or empty folder)")
    if (folder / MANIFEST).is_file():
        _read_manifest(folder)  # a manifest of something else is not ours to replace either
    return folder


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` (a recording or an empty folder, see
    ``check_target``) is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
