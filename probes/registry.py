"""Probes and the signals they record, discoverable by name.

A probe is a small class that sees each captured layer (``LayerCapture``) in model order and returns
``Observation`` s (dense [rows, keys] or [heads, rows, keys] tensors) and ``TableRows`` (tidy
rows for sparse findings). Each signal it writes is described by a ``SignalSpec`` so the recorder,
the memory estimate and the saved manifest all read one definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

import torch

from probes.capture import LayerCapture


@dataclass(frozen=True)
class SignalSpec:
    """What one signal is.

    ``rows``: "query" (one row per requested query row of each row kind), "graph" (the rows of
    ``ProbeOptions.graph_rows``), "token" (one row: a value per key token), "answer" (saliency),
    "feature" / "text_feature" (one row per visual / text token).
    ``keys``: what the last axis indexes: "visual" (visual tokens in layout order; a tower's patch
    tokens), "category" (``KEY_CATEGORIES``), "one" (a single value), "hidden" / "keys" (the
    dimensions of the residual stream / of the heads' keys side by side), "llm_hidden" (the
    decoder's residual stream, whatever the stack: a tower's features through the projector).
    ``heads``: how the head axis is reduced when per-head values are not asked for: "mean",
    "sum" (parts that add up, like contributions), or "none" (no head axis exists).
    ``extra_pass``: needs passes beyond the one traced forward (a backward, occluded forwards).
    """

    name: str
    stacks: tuple[str, ...]
    rows: str
    keys: str
    heads: str
    description: str
    extra_pass: bool = False


@dataclass(frozen=True)
class ProbeOptions:
    per_head: bool = False
    graph_rows: tuple[str, ...] = ("last", "cls")
    sink_ratio: float = 100.0  # massive: |h| > sink_ratio x median |h| of the layer ...
    sink_floor: float = 20.0  # ... and |h| > sink_floor
    var_tau: float = 20.0  # VAR visual-sink threshold on max |h_d| / rms(h) over sink dimensions
    occlusion_groups: tuple[int, ...] = (1,)  # k of the k x k occlusion groups
    batch_size: int = 16  # occluded forwards per batch


@dataclass(frozen=True)
class Observation:
    signal: str
    rows: str  # row kind, or "tokens" / "answer"
    value: torch.Tensor  # [R, K], or [H, R, K] when per_head
    per_head: bool = False


@dataclass(frozen=True)
class TableRows:
    """Rows for a tidy table; the recorder adds stack, layer and view columns."""

    table: str
    columns: dict[str, list]
    schema: dict[str, type] | None = None  # polars dtypes, so empty tables keep their types


class Probe:
    """Base class. ``needs``: which captures it reads ("call", "norope", "hidden_in",
    "hidden_out", "out_proj"). ``all_layers``: it carries state from layer to layer, so every
    layer up to the last recorded one must be visited."""

    signals: ClassVar[tuple[SignalSpec, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()
    all_layers: ClassVar[bool] = False

    def __init__(self, wanted: frozenset[str], options: ProbeOptions):
        self.wanted = wanted
        self.options = options

    def captures(self) -> frozenset[str]:
        """The captures this probe reads, given the signals asked of it."""
        return self.needs

    def observe(self, state: LayerCapture) -> Iterable[Observation | TableRows]:
        return ()

    def reduce_heads(self, signal: str, value: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """[H, R, K] -> itself when per-head values are asked for, else the signal's reduction."""
        if self.options.per_head:
            return value, True
        how = SIGNALS[signal].heads
        return (value.sum(0) if how == "sum" else value.mean(0)), False


PROBES: dict[str, type[Probe]] = {}
SIGNALS: dict[str, SignalSpec] = {}
SIGNAL_PROBE: dict[str, str] = {}


def register_probe(name: str) -> Callable[[type[Probe]], type[Probe]]:
    def wrap(cls: type[Probe]) -> type[Probe]:
        PROBES[name] = cls
        for spec in cls.signals:
            SIGNALS[spec.name] = spec
            SIGNAL_PROBE[spec.name] = name
        return cls
    return wrap


def _import_probes() -> None:
    # Importing a probe module registers it.
    import probes.attention  # noqa: F401
    import probes.features  # noqa: F401
    import probes.flow  # noqa: F401
    import probes.keywords  # noqa: F401
    import probes.projected  # noqa: F401
    import probes.saliency  # noqa: F401
    import probes.sinks  # noqa: F401
    import probes.transitions  # noqa: F401


def available_signals() -> list[str]:
    _import_probes()
    return sorted(SIGNALS)


def signal_spec(name: str) -> SignalSpec:
    _import_probes()
    if name not in SIGNALS:
        raise KeyError(f"unknown signal {name!r}; available: {', '.join(sorted(SIGNALS))}")
    return SIGNALS[name]


def probes_for(signals: Iterable[str]) -> dict[str, frozenset[str]]:
    """Probe name -> the signals asked of it (single-forward signals only)."""
    _import_probes()
    wanted: dict[str, set[str]] = {}
    for name in signals:
        spec = signal_spec(name)
        if not spec.extra_pass:
            wanted.setdefault(SIGNAL_PROBE[name], set()).add(name)
    return {probe: frozenset(names) for probe, names in wanted.items()}
