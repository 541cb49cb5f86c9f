"""Methods side by side, from a sweep table (``workbench.sweep`` schema, e.g. ``read_sweep``).

Only rows with ``status == "ok"`` count. A row's kept set is its plan's final stage's ``kept``
list (every index is into the sample's original visual tokens; a plan with no stages keeps all
``n_visual``). Budgets are grouped by their label (``budget``: "25%", "64"); ``budget_tokens`` in
the outputs is the mean resolved count over the samples (it varies with n_visual for fractions).

* ``kept_overlap``: Jaccard |A ∩ B| / |A ∪ B| of two methods' kept sets on the same sample and
  budget, averaged over the samples both ran on; every ordered pair including (m, m), so a pivot
  gives the full matrix.
* ``evidence_recall_by_budget``: mean / std / standard error of the ``evidence_recall`` column.
* ``spatial_coverage``: two shares per row, averaged per method and budget:
  ``region_coverage``: the image grid of each token group is cut into ``regions`` (3 x 3 by
  default; region of cell (r, c) = (floor(r * R / rows), floor(c * C / cols))), and this is the
  share of (group, region) pairs holding at least one kept token;
  ``cell_coverage@d``: share of all visual tokens within Chebyshev distance d (in grid cells, same
  group) of a kept token (d = 0: the kept share itself).
  Token cells come from ``layouts`` (sample_id -> VisualLayout) or, for one row-major grid of
  shape ``grid`` (rows, cols) with rows * cols = n_visual, from the grid.
* ``accuracy_curves``: accuracy per method and budget with the Wilson score interval for the
  sample count (z = 1.96: 95%).
"""

from __future__ import annotations

import json
from itertools import product
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from workbench.layout import VisualLayout, grid_cells

UNPRUNED = "unpruned"


CONTROL_PREFIX = "control:"  # the sweep's controls (zero visual tokens, blank image): not methods


def ok_rows(table: pl.DataFrame, include_unpruned: bool = True, include_controls: bool = False) -> pl.DataFrame:
    ok = table.filter(pl.col("status") == "ok")
    if not include_controls:
        ok = ok.filter(~pl.col("method").str.starts_with(CONTROL_PREFIX))
    return ok if include_unpruned else ok.filter(pl.col("method") != UNPRUNED)


def final_kept(stages: str | None, n_visual: int) -> np.ndarray:
    """The final stage's kept image tokens from a ``stages`` JSON cell (all tokens when no stage); a
    tower [CLS] passed to the LLM (index >= ``n_visual``) has no place on the image and is left out."""
    parsed = json.loads(stages) if stages else []
    kept = parsed[-1]["kept"] if parsed else range(n_visual)
    return np.asarray(sorted(int(i) for i in kept if int(i) < n_visual), dtype=np.int64)


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    """|A ∩ B| / |A ∪ B|; 1.0 for two empty sets."""
    a, b = set(int(i) for i in a), set(int(i) for i in b)
    return len(a & b) / len(a | b) if a | b else 1.0


def kept_sets(table: pl.DataFrame, include_unpruned: bool = False) -> pl.DataFrame:
    """One row per ok (sample, method, budget): sample_id, method, budget, budget_tokens,
    n_visual, kept (List[Int64], sorted)."""
    ok = ok_rows(table, include_unpruned)
    kept = [final_kept(s, n).tolist() for s, n in zip(ok["stages"].to_list(), ok["n_visual"].to_list())]
    return ok.select("sample_id", "method", "budget", "budget_tokens", "n_visual").with_columns(
        kept=pl.Series(kept, dtype=pl.List(pl.Int64)))


def _budget_tokens(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.group_by("budget").agg(pl.col("budget_tokens").cast(pl.Float64).mean())


def kept_overlap(table: pl.DataFrame, include_unpruned: bool = False) -> pl.DataFrame:
    """Mean Jaccard of kept sets for every ordered pair of methods at each budget. Columns:
    budget, budget_tokens, method_a, method_b, jaccard (mean), jaccard_std, n_samples."""
    sets = kept_sets(table, include_unpruned)
    pairs = []
    for (budget,), part in sets.group_by(["budget"], maintain_order=True):
        by_sample: dict[str, dict[str, list]] = {}
        for sample, method, kept in part.select("sample_id", "method", "kept").iter_rows():
            by_sample.setdefault(sample, {})[method] = kept
        methods = sorted(part["method"].unique().to_list())
        for a, b in product(methods, methods):
            values = [jaccard(k[a], k[b]) for k in by_sample.values() if a in k and b in k]
            pairs.append({"budget": budget, "method_a": a, "method_b": b,
                          "jaccard": float(np.mean(values)) if values else None,
                          "jaccard_std": float(np.std(values)) if values else None, "n_samples": len(values)})
    schema = {"budget": pl.String, "method_a": pl.String, "method_b": pl.String, "jaccard": pl.Float64,
              "jaccard_std": pl.Float64, "n_samples": pl.Int64}
    frame = pl.DataFrame(pairs, schema=schema)
    return frame.join(_budget_tokens(sets), on="budget", how="left").select(
        "budget", "budget_tokens", *[c for c in schema if c != "budget"]).sort("budget_tokens", "method_a", "method_b",
                                                                               descending=[True, False, False])


def evidence_recall_by_budget(table: pl.DataFrame, include_unpruned: bool = True) -> pl.DataFrame:
    """Evidence recall per method and budget over the rows that have one. Columns: method,
    budget, budget_tokens, recall (mean), recall_std, recall_sem, n_samples."""
    ok = ok_rows(table, include_unpruned).filter(pl.col("evidence_recall").is_not_null())
    return (ok.group_by("method", "budget")
            .agg(pl.col("budget_tokens").cast(pl.Float64).mean(), pl.col("evidence_recall").mean().alias("recall"),
                 pl.col("evidence_recall").std(ddof=0).alias("recall_std"), pl.len().cast(pl.Int64).alias("n_samples"))
            .with_columns(recall_sem=pl.col("recall_std") / pl.col("n_samples").cast(pl.Float64).sqrt())
            .select("method", "budget", "budget_tokens", "recall", "recall_std", "recall_sem", "n_samples")
            .sort("method", "budget_tokens", descending=[False, True]))


# --- spatial coverage ---------------------------------------------------------------------------------

def coverage(kept: Sequence[int], cells: np.ndarray, groups: np.ndarray, shapes: Sequence[tuple[int, int]],
             regions: tuple[int, int] = (3, 3), distances: Sequence[int] = (0, 1, 2)) -> dict[str, float]:
    """region_coverage and cell_coverage@<d> of one kept set (see the module docstring).
    ``cells`` [N, 2] (row, col), ``groups`` [N] grid index, ``shapes[g]`` = (rows, cols)."""
    kept = np.asarray(kept, dtype=np.int64)
    cells, groups = np.asarray(cells), np.asarray(groups)
    n = len(cells)
    out = {}
    big_r, big_c = regions
    covered, total = set(), 0
    for rows, cols in shapes:
        total += min(big_r, rows) * min(big_c, cols)
    for i in kept:
        rows, cols = shapes[groups[i]]
        r, c = cells[i]
        covered.add((int(groups[i]), int(r * min(big_r, rows) // rows), int(c * min(big_c, cols) // cols)))
    out["region_coverage"] = len(covered) / total if total else 0.0
    for d in distances:
        if not len(kept):
            out[f"cell_coverage@{d}"] = 0.0
            continue
        dist = np.abs(cells[:, None, :] - cells[None, kept, :]).max(-1)  # [N, K] Chebyshev
        same = groups[:, None] == groups[None, kept]
        out[f"cell_coverage@{d}"] = float(((dist <= d) & same).any(1).sum() / n) if n else 0.0
    return out


def _cells_of(sample_id: str, n_visual: int, layouts: Mapping[str, VisualLayout] | None,
              grid: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    if layouts is not None and sample_id in layouts:
        layout = layouts[sample_id]
        if layout.n_tokens != n_visual:
            raise ValueError(f"sample {sample_id}: layout has {layout.n_tokens} tokens, the sweep row {n_visual}")
        return layout.cell, layout.group, [(g.rows, g.cols) for g in layout.groups]
    if grid is None:
        raise ValueError(f"sample {sample_id}: no layout given and no grid shape")
    if grid[0] * grid[1] != n_visual:
        raise ValueError(f"sample {sample_id}: grid {grid} does not hold its {n_visual} visual tokens")
    return grid_cells(*grid), np.zeros(n_visual, dtype=np.int64), [tuple(grid)]


def spatial_coverage_per_sample(table: pl.DataFrame, grid: tuple[int, int] | None = None,
                                layouts: Mapping[str, VisualLayout] | None = None, regions: tuple[int, int] = (3, 3),
                                distances: Sequence[int] = (0, 1, 2), include_unpruned: bool = False) -> pl.DataFrame:
    """``coverage`` of every ok row. Columns: sample_id, method, budget, budget_tokens, metric, value."""
    out = []
    for sample, method, budget, tokens, n, kept in kept_sets(table, include_unpruned).iter_rows():
        cells, groups, shapes = _cells_of(sample, n, layouts, grid)
        out += [{"sample_id": sample, "method": method, "budget": budget, "budget_tokens": tokens, "metric": m,
                 "value": v} for m, v in coverage(kept, cells, groups, shapes, regions, distances).items()]
    return pl.DataFrame(out, schema={"sample_id": pl.String, "method": pl.String, "budget": pl.String,
                                     "budget_tokens": pl.Int64, "metric": pl.String, "value": pl.Float64})


def spatial_coverage(table: pl.DataFrame, grid: tuple[int, int] | None = None,
                     layouts: Mapping[str, VisualLayout] | None = None, regions: tuple[int, int] = (3, 3),
                     distances: Sequence[int] = (0, 1, 2), include_unpruned: bool = False) -> pl.DataFrame:
    """Mean coverage per method and budget. Columns: method, budget, budget_tokens, metric,
    value (mean), value_std, n_samples."""
    per = spatial_coverage_per_sample(table, grid, layouts, regions, distances, include_unpruned)
    return (per.group_by("method", "budget", "metric", maintain_order=True)
            .agg(pl.col("budget_tokens").cast(pl.Float64).mean(), pl.col("value").mean(),
                 pl.col("value").std(ddof=0).alias("value_std"), pl.len().cast(pl.Int64).alias("n_samples"))
            .select("method", "budget", "budget_tokens", "metric", "value", "value_std", "n_samples")
            .sort("method", "metric", "budget_tokens", descending=[False, False, True]))


# --- accuracy -------------------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float | None, float | None]:
    """Wilson score interval for a binomial proportion; (None, None) for n = 0."""
    if n <= 0:
        return None, None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def accuracy_curves(table: pl.DataFrame, z: float = 1.96, include_unpruned: bool = True,
                    include_controls: bool = False) -> pl.DataFrame:
    """Accuracy per method and budget. Columns: method, budget, budget_tokens, n (samples),
    correct (count), accuracy, ci_low, ci_high (Wilson, z)."""
    ok = ok_rows(table, include_unpruned, include_controls).filter(pl.col("correct").is_not_null())
    agg = (ok.group_by("method", "budget")
           .agg(pl.col("budget_tokens").cast(pl.Float64).mean(), pl.len().cast(pl.Int64).alias("n"),
                pl.col("correct").cast(pl.Int64).sum().alias("correct"))
           .sort("method", "budget_tokens", descending=[False, True]))
    bounds = [wilson_interval(k, n, z) for k, n in zip(agg["correct"].to_list(), agg["n"].to_list())]
    return agg.with_columns(
        accuracy=pl.col("correct") / pl.col("n"),
        ci_low=pl.Series([b[0] for b in bounds], dtype=pl.Float64),
        ci_high=pl.Series([b[1] for b in bounds], dtype=pl.Float64),
    ).select("method", "budget", "budget_tokens", "n", "correct", "accuracy", "ci_low", "ci_high")


def pareto_front(cost, accuracy) -> np.ndarray:
    """bool [P]: the points no other point beats on both axes (lower cost, higher accuracy; a tie
    on one axis and a win on the other beats)."""
    cost, accuracy = np.asarray(cost, dtype=float), np.asarray(accuracy, dtype=float)
    beaten = ((cost[None, :] <= cost[:, None]) & (accuracy[None, :] >= accuracy[:, None])
              & ((cost[None, :] < cost[:, None]) | (accuracy[None, :] > accuracy[:, None])))
    return ~beaten.any(axis=1)


def accuracy_vs_cost(table: pl.DataFrame) -> pl.DataFrame:
    """One point per method and budget: accuracy beside its mean cost, prefill FLOPs and measured
    prefill time as fractions of the unpruned model's, and the effective visual tokens (averaged
    over the decoder's layers); ``pareto_flops`` / ``pareto_time`` mark the points on each front.
    Columns: method, budget, accuracy, flops_ratio, time_ratio, effective_tokens, kept, n,
    pareto_flops, pareto_time."""
    ok = ok_rows(table, True).filter(pl.col("correct").is_not_null())
    if "prefill_time_s" not in ok.columns:  # sweeps from before the prefill was timed
        ok = ok.with_columns(prefill_time_s=pl.lit(None, dtype=pl.Float64))
    base = ok.filter(pl.col("method") == UNPRUNED)["prefill_time_s"].mean()
    points = (ok.group_by("method", "budget")
              .agg(accuracy=pl.col("correct").cast(pl.Float64).mean(), flops_ratio=pl.col("flops_ratio").mean(),
                   prefill_time_s=pl.col("prefill_time_s").mean(), kept=pl.col("kept_count").cast(pl.Float64).mean(),
                   effective_tokens=pl.col("visual_tokens_per_layer").list.mean().mean(), n=pl.len())
              .with_columns(time_ratio=pl.col("prefill_time_s") / base if base else pl.lit(None, dtype=pl.Float64))
              .sort("method", "budget"))
    front_time = (pareto_front(points["time_ratio"].fill_null(np.inf), points["accuracy"])
                  if points["time_ratio"].null_count() < points.height else np.zeros(points.height, dtype=bool))
    return points.with_columns(pareto_flops=pl.Series(pareto_front(points["flops_ratio"], points["accuracy"])),
                               pareto_time=pl.Series(front_time)).select(
        "method", "budget", "accuracy", "flops_ratio", "time_ratio", "effective_tokens", "kept", "n",
        "pareto_flops", "pareto_time")


# --- where the kept tokens sit ----------------------------------------------------------------------

def kept_position(table: pl.DataFrame, grid: tuple[int, int] | None = None,
                  layouts: Mapping[str, VisualLayout] | None = None, include_unpruned: bool = False) -> pl.DataFrame:
    """Mean image position of each method's kept tokens: ``row_centroid`` / ``col_centroid`` in
    [0, 1] (0 = top / left, 1 = bottom / right of the token's group grid; a spatially uniform
    choice gives 0.5), averaged over samples. In a raster-ordered grid, row is also sequence
    order, so a method drawn to late positions (FastV-style RoPE decay) shows a row centroid
    above 0.5. Columns: method, budget, budget_tokens, row_centroid, col_centroid, n_samples."""
    out = []
    for sample, method, budget, tokens, n, kept in kept_sets(table, include_unpruned).iter_rows():
        cells, groups, shapes = _cells_of(sample, n, layouts, grid)
        kept = np.asarray(kept, dtype=np.int64)
        if not len(kept):
            continue
        rows = np.array([max(shapes[g][0] - 1, 1) for g in groups[kept]], dtype=np.float64)
        cols = np.array([max(shapes[g][1] - 1, 1) for g in groups[kept]], dtype=np.float64)
        out.append({"method": method, "budget": budget, "budget_tokens": float(tokens),
                    "row": float(np.mean(cells[kept, 0] / rows)), "col": float(np.mean(cells[kept, 1] / cols))})
    frame = pl.DataFrame(out, schema={"method": pl.String, "budget": pl.String, "budget_tokens": pl.Float64,
                                      "row": pl.Float64, "col": pl.Float64})
    return (frame.group_by("method", "budget", maintain_order=True)
            .agg(pl.col("budget_tokens").mean(), pl.col("row").mean().alias("row_centroid"),
                 pl.col("col").mean().alias("col_centroid"), pl.len().cast(pl.Int64).alias("n_samples"))
            .sort("method", "budget_tokens", descending=[False, True]))
