"""What a report runs, read from a TOML file whose top-level keys are ``ReportConfig``'s fields."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from workbench.errors import UserError

ANALYSES = ("comparison", "redundancy", "misalignment", "failures", "literature")


class ReportConfigError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class ReportConfig:
    model: str = "shapes-vlm"
    dataset: str = "data/eval/samples.jsonl"
    benchmark: str | None = None  # how to read a stored benchmark (workbench.benchmarks); None: inferred
    samples: int = 64  # the first N samples of the data set are swept
    batch_size: int = 8  # samples swept together (the same rows as one at a time, float rounding aside)
    analysis_samples: int = 16  # of those, the first N are recorded for redundancy / misalignment
    methods: tuple[str, ...] = ("all",)  # method names, "name:key=value,..." or "all"
    budgets: tuple[float | int, ...] = (0.33, 0.22, 0.11)
    diagnose_budget: float | int = 0.11
    diagnose_per_method: int = 5  # failures diagnosed (with counterfactual restores) per method
    analyses: tuple[str, ...] = ANALYSES
    out: str = "runs/report"
    device: str = "cpu"

    def __post_init__(self):
        for name in ("methods", "budgets", "analyses"):
            value = getattr(self, name)
            object.__setattr__(self, name, tuple(value) if isinstance(value, (list, tuple)) else (value,))
        unknown = [a for a in self.analyses if a not in ANALYSES]
        if unknown:
            raise ReportConfigError(f"unknown analyses {unknown}; available: {', '.join(ANALYSES)}")
        for name in ("samples", "batch_size", "analysis_samples", "diagnose_per_method"):
            value, positive = getattr(self, name), name in ("samples", "batch_size")
            if isinstance(value, bool) or not isinstance(value, int) or value < int(positive):
                raise ReportConfigError(f"{name} must be a {'positive' if positive else 'non-negative'} "
                                        f"integer, got {value!r}")
        if self.diagnose_budget not in self.budgets and "failures" in self.analyses:
            raise ReportConfigError(f"diagnose_budget {self.diagnose_budget} is not one of the budgets {list(self.budgets)}")


def load_config(path: str | Path | None, **overrides) -> ReportConfig:
    """The defaults, updated by the TOML file at ``path`` (if any), then by ``overrides`` (not None)."""
    values: dict = {}
    if path is not None:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        path = Path(path)
        if not path.is_file():
            raise ReportConfigError(f"report config not found: {path}")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ReportConfigError(f"{path}: not valid TOML ({e})") from None
        known = {f.name for f in fields(ReportConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ReportConfigError(f"{path}: unknown keys {unknown}; known: {', '.join(sorted(known))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ReportConfig(**values)
    except TypeError as e:
        raise ReportConfigError(str(e)) from None
