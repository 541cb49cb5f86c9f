"""How redundant the visual tokens are, layer by layer, in the LLM and in the vision tower.

Pure functions over ``Recording`` s; every frame is tidy (long format) and carries the sample id,
so frames of several samples concatenate with ``pl.concat`` and average with ``mean_over_samples``.

Feature metrics (from ``visual_states_out`` / ``visual_states`` / ``visual_keys``, [N, D] per layer):

* pairwise cosine similarity of the visual tokens (every unordered pair i < j): mean, std and
  quantiles (``cosine_summary``), and a histogram (``cosine_histogram``);
* near-duplicate clusters: connected components of the graph with an edge where cos >= threshold;
  a cluster is a component of two or more tokens (``duplicate_clusters``);
* effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised singular values) and
  participation ratio ((sum l)^2 / sum l^2 over the covariance eigenvalues l = s^2) of the token
  features, centred over the tokens by default; both equal r for r equal singular values.

Attention metrics (``attention_concentration``, from an attention signal [R, N]): each row is
renormalised over the visual keys (its share of visual attention), then Shannon entropy (nats),
entropy / log N, and the share held by the top-k tokens, averaged over the rows of the kind.

``redundancy_by_depth`` stacks both into one per-layer table; ``depth_trend`` gives, per metric,
the Spearman correlation of layer index with the value ("grows with depth" when positive).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import polars as pl
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from scipy.stats import entropy, spearmanr
from sklearn.metrics.pairwise import cosine_similarity

from workbench.recording import Recording

FEATURE_ROWS = "tokens"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
METRIC_SCHEMA = {"sample_id": pl.String, "stack": pl.String, "layer": pl.Int64, "signal": pl.String,
                 "rows": pl.String, "metric": pl.String, "value": pl.Float64}


# --- small numeric helpers (shared with the other analyses) -----------------------------------------

def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties get average ranks); None when either side is constant
    or there are fewer than two points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    # spearmanr answers NaN with a warning where the correlation is undefined; None says so plainly
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def metric_frame(rows: Iterable[dict]) -> pl.DataFrame:
    """Rows of (sample_id, stack, layer, signal, rows, metric, value) as a typed frame."""
    return pl.DataFrame(list(rows), schema=METRIC_SCHEMA)


def layer_scores(recording: Recording, signal: str, rows: str, stack: str = "llm",
                 layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """Layer -> per-visual-token scores [N]: the entry's rows averaged (a one-row entry as is)."""
    recorded = [k.layer for k in recording.keys(signal, stack) if k.rows == rows and k.view == 0]
    wanted = sorted(set(recorded) if layers is None else set(recorded) & set(layers))
    return {layer: recording.get(signal, layer, rows, stack).double().numpy().mean(0) for layer in wanted}


def mean_over_samples(frame: pl.DataFrame, value: str = "value") -> pl.DataFrame:
    """Average a tidy frame over its ``sample_id`` column: every other non-value column is a key;
    adds ``n_samples``."""
    keys = [c for c in frame.columns if c not in ("sample_id", value)]
    return (frame.group_by(keys, maintain_order=True)
            .agg(pl.col(value).mean(), pl.col(value).is_not_null().sum().alias("n_samples")))


# --- features ---------------------------------------------------------------------------------------

def cosine_matrix(features: np.ndarray) -> np.ndarray:
    """[N, N] cosine similarity of the rows of ``features`` [N, D] (zero rows give 0), in float64
    whatever the recording's dtype."""
    return cosine_similarity(np.asarray(features, dtype=np.float64))


def pairwise_cosines(features: np.ndarray) -> np.ndarray:
    """Cosine similarity of every unordered pair of distinct rows (i < j), flat."""
    sims = cosine_matrix(features)
    i, j = np.triu_indices(len(sims), k=1)
    return sims[i, j]


def cluster_labels(features: np.ndarray, threshold: float) -> np.ndarray:
    """Connected-component label [N] of each token in the graph cos(i, j) >= threshold (i != j)."""
    adjacency = cosine_matrix(features) >= threshold
    np.fill_diagonal(adjacency, False)
    _, labels = connected_components(csr_matrix(adjacency), directed=False)
    return labels


def cluster_sizes(labels: np.ndarray) -> np.ndarray:
    """Sizes of the near-duplicate clusters (components of two or more tokens), largest first."""
    sizes = np.bincount(labels)
    return np.sort(sizes[sizes >= 2])[::-1]


def singular_values(features: np.ndarray, center: bool = True) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if center:
        x = x - x.mean(0, keepdims=True)
    return np.linalg.svd(x, compute_uv=False)


def effective_rank(features: np.ndarray, center: bool = True) -> float:
    """exp(H(p)), p = s / sum(s) over the singular values (Roy & Vetterli 2007); 0 for all-zero."""
    s = singular_values(features, center)
    return float(np.exp(entropy(s))) if s.sum() > 0 else 0.0  # entropy normalises s to p itself


def participation_ratio(features: np.ndarray, center: bool = True) -> float:
    """(sum l)^2 / sum l^2 over l = s^2 (the covariance eigenvalues up to a factor); 0 for all-zero."""
    lam = singular_values(features, center) ** 2
    return float(lam.sum() ** 2 / (lam ** 2).sum()) if lam.sum() > 0 else 0.0


def feature_metrics(features: np.ndarray, threshold: float = 0.9,
                    quantiles: Sequence[float] = QUANTILES, center: bool = True) -> dict[str, float]:
    """Every feature metric of one [N, D] matrix: cos_mean, cos_std, cos_q<pct>, n_clusters,
    largest_cluster, clustered_share, effective_rank, participation_ratio, n_tokens."""
    cos = pairwise_cosines(features)
    sizes = cluster_sizes(cluster_labels(features, threshold))
    n = len(features)
    out = {"cos_mean": float(cos.mean()) if len(cos) else None, "cos_std": float(cos.std()) if len(cos) else None}
    for q in quantiles:
        out[f"cos_q{round(q * 100):02d}"] = float(np.quantile(cos, q)) if len(cos) else None
    out |= {"n_clusters": float(len(sizes)), "largest_cluster": float(sizes[0]) if len(sizes) else 1.0,
            "clustered_share": float(sizes.sum() / n) if n else 0.0,
            "effective_rank": effective_rank(features, center),
            "participation_ratio": participation_ratio(features, center), "n_tokens": float(n)}
    return out


def _feature_layers(recording: Recording, signal: str, stacks: Sequence[str]):
    for stack in stacks:
        for layer in recording.layers(signal, stack):
            yield stack, layer, recording.get(signal, layer, FEATURE_ROWS, stack).double().numpy()


def cosine_summary(recording: Recording, signal: str = "visual_states_out", stacks: Sequence[str] = ("llm", "tower"),
                   threshold: float = 0.9, quantiles: Sequence[float] = QUANTILES,
                   center: bool = True) -> pl.DataFrame:
    """Per stack and layer, the feature metrics of ``feature_metrics`` as tidy rows.
    Columns: sample_id, stack, layer, signal, rows ("tokens"), metric, value."""
    sample = recording.identity.sample_id
    return metric_frame(
        {"sample_id": sample, "stack": stack, "layer": layer, "signal": signal, "rows": FEATURE_ROWS,
         "metric": metric, "value": value}
        for stack, layer, x in _feature_layers(recording, signal, stacks)
        for metric, value in feature_metrics(x, threshold, quantiles, center).items())


def cosine_histogram(recording: Recording, signal: str = "visual_states_out",
                     stacks: Sequence[str] = ("llm", "tower"), bins: int = 40) -> pl.DataFrame:
    """Histogram of the pairwise cosines on fixed bins over [-1, 1]. Columns: sample_id, stack,
    layer, signal, bin_lo, bin_hi, count (Int64), share (count / number of pairs)."""
    edges = np.linspace(-1.0, 1.0, bins + 1)
    out = []
    for stack, layer, x in _feature_layers(recording, signal, stacks):
        cos = np.clip(pairwise_cosines(x), -1.0, 1.0)
        counts, _ = np.histogram(cos, edges)
        total = max(len(cos), 1)
        out += [{"sample_id": recording.identity.sample_id, "stack": stack, "layer": layer, "signal": signal,
                 "bin_lo": float(edges[b]), "bin_hi": float(edges[b + 1]), "count": int(counts[b]),
                 "share": counts[b] / total} for b in range(bins)]
    return pl.DataFrame(out, schema={"sample_id": pl.String, "stack": pl.String, "layer": pl.Int64,
                                     "signal": pl.String, "bin_lo": pl.Float64, "bin_hi": pl.Float64,
                                     "count": pl.Int64, "share": pl.Float64})


def duplicate_clusters(recording: Recording, signal: str = "visual_states_out",
                       stacks: Sequence[str] = ("llm", "tower"), threshold: float = 0.9) -> pl.DataFrame:
    """Per-token cluster membership. Columns: sample_id, stack, layer, signal, token (visual
    index), cluster (component label, numbered by first token), cluster_size (1: no duplicate)."""
    out = []
    for stack, layer, x in _feature_layers(recording, signal, stacks):
        labels = cluster_labels(x, threshold)
        sizes = np.bincount(labels)
        out += [{"sample_id": recording.identity.sample_id, "stack": stack, "layer": layer, "signal": signal,
                 "token": t, "cluster": int(labels[t]), "cluster_size": int(sizes[labels[t]])}
                for t in range(len(labels))]
    return pl.DataFrame(out, schema={"sample_id": pl.String, "stack": pl.String, "layer": pl.Int64,
                                     "signal": pl.String, "token": pl.Int64, "cluster": pl.Int64,
                                     "cluster_size": pl.Int64})


# --- attention ----------------------------------------------------------------------------------------

def attention_metrics(attention: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float | None]:
    """Concentration of attention rows [R, N] over the visual keys, each row renormalised to its
    share of visual attention, averaged over rows with any visual attention: entropy (nats),
    normalized_entropy (entropy / log N), top<k>_share, and visual_mass (the raw row sum)."""
    a = np.atleast_2d(np.asarray(attention, dtype=np.float64))
    mass = a.sum(1)
    live = a[mass > 0] / mass[mass > 0, None]
    n = a.shape[1]
    out: dict[str, float | None] = {"visual_mass": float(mass.mean())}
    if not len(live):
        return out | {"entropy": None, "normalized_entropy": None} | {f"top{k}_share": None for k in ks}
    h = entropy(live, axis=1)  # nats; 0 log 0 = 0
    out["entropy"] = float(h.mean())
    out["normalized_entropy"] = float(h.mean() / np.log(n)) if n > 1 else None
    ordered = -np.sort(-live, axis=1)
    for k in ks:
        out[f"top{k}_share"] = float(ordered[:, :k].sum(1).mean())
    return out


def attention_concentration(recording: Recording, signal: str = "attention",
                            rows: Sequence[str] = ("last", "text", "mean", "cls"),
                            stacks: Sequence[str] = ("llm", "tower"), ks: Sequence[int] = (1, 5, 10)) -> pl.DataFrame:
    """``attention_metrics`` for every recorded (stack, layer, row kind) of ``signal``.
    Columns: sample_id, stack, layer, signal, rows, metric, value."""
    out = []
    for stack in stacks:
        for key in recording.keys(signal, stack):
            if key.rows not in rows or key.view != 0:
                continue
            values = recording.get(signal, key.layer, key.rows, stack).double().numpy()
            out += [{"sample_id": recording.identity.sample_id, "stack": stack, "layer": key.layer, "signal": signal,
                     "rows": key.rows, "metric": m, "value": v} for m, v in attention_metrics(values, ks).items()]
    return metric_frame(out)


# --- depth --------------------------------------------------------------------------------------------

def redundancy_by_depth(recording: Recording, feature_signal: str | None = None, attention_signal: str = "attention",
                        rows: Sequence[str] = ("last", "text", "mean", "cls"), stacks: Sequence[str] = ("llm", "tower"),
                        threshold: float = 0.9, ks: Sequence[int] = (1, 5, 10)) -> pl.DataFrame:
    """The per-layer table: ``cosine_summary`` of ``feature_signal`` (default: visual_states_out
    when recorded, else visual_states) stacked on ``attention_concentration``; either part is
    empty when its signal was not recorded. Columns as ``cosine_summary``, sorted by stack,
    signal, rows, metric, layer."""
    if feature_signal is None:
        feature_signal = "visual_states_out" if recording.keys("visual_states_out") or \
            recording.keys("visual_states_out", "tower") else "visual_states"
    parts = [cosine_summary(recording, feature_signal, stacks, threshold),
             attention_concentration(recording, attention_signal, rows, stacks, ks)]
    return pl.concat(parts).sort("stack", "signal", "rows", "metric", "layer")


def depth_trend(frame: pl.DataFrame) -> pl.DataFrame:
    """How each metric of a per-layer tidy frame changes with depth: per sample_id (when
    present), stack, signal, rows and metric: n_layers, spearman (layer index vs value; null
    when undefined), slope (least squares per layer), first and last value, grows (spearman > 0)."""
    keys = [c for c in ("sample_id", "stack", "signal", "rows", "metric") if c in frame.columns]
    out = []
    for group, part in frame.filter(pl.col("value").is_not_null() & pl.col("value").is_finite()) \
            .sort("layer").group_by(keys, maintain_order=True):
        layers, values = part["layer"].to_numpy().astype(float), part["value"].to_numpy()
        rho = spearman(layers, values)
        slope = float(np.polyfit(layers, values, 1)[0]) if len(set(layers)) > 1 else None
        out.append(dict(zip(keys, group)) | {
            "n_layers": len(part), "spearman": rho, "slope": slope, "first": float(values[0]),
            "last": float(values[-1]), "grows": None if rho is None else rho > 0})
    schema = {k: pl.String for k in keys} | {"n_layers": pl.Int64, "spearman": pl.Float64, "slope": pl.Float64,
                                               "first": pl.Float64, "last": pl.Float64, "grows": pl.Boolean}
    return pl.DataFrame(out, schema=schema)
