"""Where attention to the image goes when it is not where the answer is.

Pure functions over one ``Recording`` (plus, for the semantic part, the sample's evidence tokens:
``layout.evidence_tokens(sample.evidence_mask())``). Every frame is tidy and carries the sample id.
Rows of a row kind with several query rows (e.g. "text") are averaged into one score per visual
token before any statistic (``redundancy.layer_scores``).

* Spatial / positional (``positional_profile``, ``positional_bias``): attention share per image
  row and column of each token grid (``layout.grid``), and Spearman correlations of a token's
  attention with its sequence position, its grid row and its grid column; plus the
  attention-weighted mean row / column (0 = top / left, 1 = bottom / right). Run on
  ``attention`` and ``attention_norope`` (FEATHER: with RoPE, the last query favours the image's
  bottom rows, which sit closest to it in the sequence; ``rope_difference`` subtracts the two).
* Semantic (``evidence_alignment``, ``saliency_agreement``): ROC AUC of the scores as a detector
  of the evidence tokens (Mann-Whitney, ties counted one half), recall@k = |top-k ∩ E| / |E|
  (k = |E| too, as "recall@E"), and the Spearman correlation with a saliency signal
  (``occlusion`` / ``grad_x_input`` / ``attention_x_gradient``).
* Sink capture (``sink_capture``): of the attention the rows give the visual tokens, the share
  taken by visual sink tokens (VAR's ``visual_sink_score`` > tau; tokens holding a massive
  activation in the ``massive_activations`` table), and the layer's ``attention_mass`` on its sink
  tokens (which may include non-visual ones such as BOS).
* Modality dominance (``modality_dominance``), "When Language Overrules" (Wu et al. 2025,
  arXiv:2508.10552), from the ``attention_mass`` of the query rows (text columns T, visual V):
  ``MDI = (A_T / |T|) / (A_V / |V|)`` (per-token attention on text over per-token attention on
  the image; > 1: text dominates), ``AEI_m = P_m / Q_m`` with ``P_m = A_m / (A_T + A_V)`` (the
  modality's share of the attention that goes to T or V) and ``Q_m = |m| / (|T| + |V|)`` (its
  share of those tokens). The paper measures attention from the generated tokens; here the query
  rows are a recorded row kind ("last": the token predicting the answer). ``|T|`` counts the
  text keys each query row can see (causal mask), |V| the visual tokens. Formulas as in the
  public re-implementation github.com/Song-haJo/LangOverrule (src/metrics/mdi.py, aei.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score

from analyses.redundancy import layer_scores, metric_frame, spearman
from probes.capture import KEY_CATEGORIES
from workbench.recording import Recording

CATEGORY = {name: i for i, name in enumerate(KEY_CATEGORIES)}


def _row(recording: Recording, stack: str, layer: int, signal: str, rows: str, metric: str, value) -> dict:
    return {"sample_id": recording.identity.sample_id, "stack": stack, "layer": layer, "signal": signal,
            "rows": rows, "metric": metric, "value": None if value is None else float(value)}


# --- spatial / positional -----------------------------------------------------------------------------

def positional_profile(recording: Recording, signal: str = "attention", rows: str = "last",
                       stack: str = "llm", layers: Sequence[int] | None = None) -> pl.DataFrame:
    """Attention per grid row and column. Columns: sample_id, stack, layer, signal, rows, group
    (token grid), axis ("row" / "col"), index, mass (summed attention), share (mass / the
    group's total; null when the group got none)."""
    layout, out = recording.layout, []
    for layer, scores in layer_scores(recording, signal, rows, stack, layers).items():
        for g in range(len(layout.groups)):
            grid = layout.grid(scores, g)
            total = np.nansum(grid)
            for axis, mass in (("row", np.nansum(grid, 1)), ("col", np.nansum(grid, 0))):
                out += [{"sample_id": recording.identity.sample_id, "stack": stack, "layer": layer, "signal": signal,
                         "rows": rows, "group": g, "axis": axis, "index": i, "mass": float(m),
                         "share": float(m / total) if total > 0 else None} for i, m in enumerate(mass)]
    return pl.DataFrame(out, schema={"sample_id": pl.String, "stack": pl.String, "layer": pl.Int64,
                                     "signal": pl.String, "rows": pl.String, "group": pl.Int64, "axis": pl.String,
                                     "index": pl.Int64, "mass": pl.Float64, "share": pl.Float64})


def positional_metrics(scores: np.ndarray, positions: np.ndarray, cells: np.ndarray,
                       shape: np.ndarray) -> dict[str, float | None]:
    """seq_spearman / row_spearman / col_spearman (score vs sequence position / grid row / grid
    column over the tokens) and row_centroid / col_centroid (attention-weighted mean of row /
    (rows-1) and col / (cols-1); ``shape`` [N, 2] is each token's grid (rows, cols))."""
    scores = np.asarray(scores, dtype=float)
    total = scores.sum()
    span = np.maximum(shape - 1, 1)
    rel = cells / span
    return {"seq_spearman": spearman(positions, scores), "row_spearman": spearman(cells[:, 0], scores),
            "col_spearman": spearman(cells[:, 1], scores),
            "row_centroid": float((scores * rel[:, 0]).sum() / total) if total > 0 else None,
            "col_centroid": float((scores * rel[:, 1]).sum() / total) if total > 0 else None}


def positional_bias(recording: Recording, signals: Sequence[str] = ("attention", "attention_norope"),
                    rows: str = "last", stack: str = "llm", layers: Sequence[int] | None = None) -> pl.DataFrame:
    """``positional_metrics`` per layer for each recorded signal. Columns: sample_id, stack,
    layer, signal, rows, metric, value. Positive row_spearman / seq_spearman: attention grows
    towards the bottom of the image / the end of the image span."""
    layout = recording.layout
    shape = np.array([[layout.groups[g].rows, layout.groups[g].cols] for g in layout.group]).reshape(-1, 2)
    positions = layout.positions if stack == "llm" else np.arange(layout.n_tokens)
    out = []
    for signal in signals:
        for layer, scores in layer_scores(recording, signal, rows, stack, layers).items():
            out += [_row(recording, stack, layer, signal, rows, m, v)
                    for m, v in positional_metrics(scores, positions, layout.cell, shape).items()]
    return metric_frame(out)


def rope_difference(bias: pl.DataFrame, with_rope: str = "attention", without: str = "attention_norope") -> pl.DataFrame:
    """From a ``positional_bias`` frame: per sample_id, stack, layer, rows and metric, the value
    with RoPE minus without (columns ..., metric, with_rope, without_rope, difference)."""
    keys = ["sample_id", "stack", "layer", "rows", "metric"]
    a = bias.filter(pl.col("signal") == with_rope).select(*keys, pl.col("value").alias("with_rope"))
    b = bias.filter(pl.col("signal") == without).select(*keys, pl.col("value").alias("without_rope"))
    return a.join(b, on=keys, how="inner").with_columns(
        difference=pl.col("with_rope") - pl.col("without_rope")).sort(keys)


# --- semantic -------------------------------------------------------------------------------------------

def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Probability that a random positive outscores a random negative (ties count 1/2); None
    when either class is empty or a score is not finite (roc_auc_score refuses both)."""
    positive, scores = np.asarray(positive, dtype=bool), np.asarray(scores, dtype=float)
    if positive.all() or not positive.any() or not np.isfinite(scores).all():
        return None
    return float(roc_auc_score(positive, scores))


def recall_at_k(scores: np.ndarray, positive: np.ndarray, k: int) -> float | None:
    """|top-k ∩ positives| / |positives| (top-k by score, stable order on ties); None without positives."""
    positive = np.asarray(positive, dtype=bool)
    if not positive.any():
        return None
    top = np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]
    return float(positive[top].sum() / positive.sum())


def evidence_alignment(recording: Recording, evidence: np.ndarray, signal: str = "attention", rows: str = "text",
                       stack: str = "llm", ks: Sequence[int] = (5, 10, 20),
                       layers: Sequence[int] | None = None) -> pl.DataFrame:
    """Per layer, how well ``signal``'s scores find the evidence tokens (boolean [N]): metrics
    auc, recall@E (k = number of evidence tokens), recall@<k>, evidence_mass (share of the
    scores' positive mass on the evidence: a signed saliency's negative scores mark tokens whose
    removal helps the answer, not part of its support; null when no score is positive),
    n_evidence. Works for saliency signals too (layer -1, rows "answer" / "k1"). Columns:
    sample_id, stack, layer, signal, rows, metric, value."""
    evidence = np.asarray(evidence, dtype=bool)
    n_evidence = int(evidence.sum())
    out = []
    for layer, scores in layer_scores(recording, signal, rows, stack, layers).items():
        support = np.clip(scores, 0, None)
        total = support.sum()
        metrics = {"auc": roc_auc(scores, evidence),
                   "recall@E": recall_at_k(scores, evidence, n_evidence) if n_evidence else None}
        metrics |= {f"recall@{k}": recall_at_k(scores, evidence, k) for k in ks}
        metrics |= {"evidence_mass": support[evidence].sum() / total if total > 0 else None,
                    "n_evidence": n_evidence}
        out += [_row(recording, stack, layer, signal, rows, m, v) for m, v in metrics.items()]
    return metric_frame(out)


def saliency_agreement(recording: Recording, saliency: str = "occlusion", saliency_rows: str = "k1",
                       saliency_layer: int | None = -1, signal: str = "attention", rows: str = "text",
                       stack: str = "llm", absolute: bool = False, k: int = 10,
                       layers: Sequence[int] | None = None) -> pl.DataFrame:
    """Per layer, agreement of ``signal`` with a saliency signal over the visual tokens:
    spearman (rank correlation) and top<k>_jaccard (overlap of the two top-k sets).
    ``saliency_layer``: the saliency entry's layer (-1 for occlusion / grad_x_input); None pairs
    each layer with the saliency of the same layer (attention_x_gradient). ``absolute``: rank
    saliency by magnitude. Columns: sample_id, stack, layer, signal, rows, metric, value."""
    sal_by_layer = layer_scores(recording, saliency, saliency_rows, "llm")
    out = []
    for layer, scores in layer_scores(recording, signal, rows, stack, layers).items():
        sal = sal_by_layer.get(layer if saliency_layer is None else saliency_layer)
        if sal is None:
            continue
        sal = np.abs(sal) if absolute else sal
        top_a = set(np.argsort(-scores, kind="stable")[:k].tolist())
        top_b = set(np.argsort(-sal, kind="stable")[:k].tolist())
        out += [_row(recording, stack, layer, f"{signal}~{saliency}", rows, "spearman", spearman(scores, sal)),
                _row(recording, stack, layer, f"{signal}~{saliency}", rows, f"top{k}_jaccard",
                     len(top_a & top_b) / len(top_a | top_b) if top_a | top_b else None)]
    return metric_frame(out)


# --- sink capture ----------------------------------------------------------------------------------------

def massive_visual_tokens(recording: Recording, stack: str, layer: int) -> np.ndarray:
    """Boolean [N]: visual tokens holding a massive activation at ``layer`` (``massive_activations``
    table; positions are sequence positions in the LLM, tower sequence indices in the tower)."""
    n = recording.layout.n_tokens
    found = np.zeros(n, dtype=bool)
    if "massive_activations" not in recording.tables:
        return found
    table = recording.table("massive_activations").filter(
        (pl.col("stack") == stack) & (pl.col("layer") == layer) & (pl.col("view") == 0) & (pl.col("role") == "visual"))
    positions = np.unique(table["position"].to_numpy())
    if stack == "llm":
        found[np.isin(recording.layout.positions, positions)] = True
    else:  # tower: patches follow the [CLS] when there is one (known when "cls" rows were recorded)
        offset = 1 if "tower/cls/0" in recording.row_positions else 0
        idx = positions - offset
        found[idx[(idx >= 0) & (idx < n)]] = True
    return found


def sink_capture(recording: Recording, rows: str = "text", stack: str = "llm", signal: str = "attention",
                 var_tau: float | None = None, layers: Sequence[int] | None = None) -> pl.DataFrame:
    """Per layer, what sink tokens take of the attention the query rows give the image.
    Metrics (each only when its signals were recorded):
    var_sinks (visual tokens with ``visual_sink_score`` > tau; tau defaults to the recording's
    ``var_tau``), var_token_share (var_sinks / N), var_attention_share (their share of the rows'
    visual attention); massive_sinks, massive_token_share, massive_attention_share (the same for
    visual tokens holding a massive activation); sink_mass, visual_mass (``attention_mass``
    columns: mass on the layer's sink tokens of any role, and on the visual tokens); sink_share
    (the ``sink_share`` signal: sink mass averaged over every query row).
    Columns: sample_id, stack, layer, signal, rows, metric, value."""
    tau = recording.request.var_tau if var_tau is None else var_tau
    n = recording.layout.n_tokens
    scores = layer_scores(recording, signal, rows, stack, layers)
    sink_scores = layer_scores(recording, "visual_sink_score", "tokens", stack, layers)
    masses = layer_scores(recording, "attention_mass", rows, stack, layers)
    shares = layer_scores(recording, "sink_share", "tokens", stack, layers)
    has_table = "massive_activations" in recording.tables
    out = []
    for layer in sorted(set(scores) | set(masses) | set(sink_scores)):
        metrics: dict[str, float | None] = {}
        attention = scores.get(layer)
        total = None if attention is None else attention.sum()
        sets = []
        if layer in sink_scores:
            sets.append(("var", sink_scores[layer] > tau))
        if has_table:
            sets.append(("massive", massive_visual_tokens(recording, stack, layer)))
        for name, sinks in sets:
            metrics[f"{name}_sinks"] = int(sinks.sum())
            metrics[f"{name}_token_share"] = sinks.sum() / n if n else None
            if attention is not None:
                metrics[f"{name}_attention_share"] = attention[sinks].sum() / total if total > 0 else None
        if layer in masses:
            metrics["sink_mass"] = masses[layer][CATEGORY["sink"]]
            metrics["visual_mass"] = masses[layer][CATEGORY["visual"]]
        if layer in shares:
            metrics["sink_share"] = shares[layer][0]
        out += [_row(recording, stack, layer, signal, rows, m, v) for m, v in metrics.items()]
    return metric_frame(out)


# --- modality dominance ------------------------------------------------------------------------------------

def text_key_counts(recording: Recording, rows: str, n_rows: int, include_system: bool = False) -> np.ndarray:
    """Number of text keys each query row of ``rows`` can see [n_rows] (the text after the image
    is causal; with ``include_system`` the tokens before it, always visible, count too). Rows
    without recorded positions ("mean", hand-built recordings) count every text key."""
    layout = recording.layout
    last_visual = int(layout.positions.max())
    n_text = layout.sequence_length - last_visual - 1
    n_system = layout.sequence_length - layout.n_tokens - n_text
    key = f"llm/{rows}/0"
    if key in recording.row_positions and len(recording.row_positions[key]) == n_rows:
        positions = recording.row_positions[key].numpy()
        counts = np.clip(positions - last_visual, 0, n_text).astype(float)
    else:
        counts = np.full(n_rows, float(n_text))
    return counts + (n_system if include_system else 0)


def dominance_metrics(text_mass: np.ndarray, visual_mass: np.ndarray, n_text: np.ndarray,
                      n_visual: int) -> dict[str, float | None]:
    """MDI and AEI of query rows ([R] masses and visible text counts), averaged over the rows:
    mdi = mean(A_T / |T|) / mean(A_V / |V|); aei_text / aei_visual = mean over rows of P_m / Q_m."""
    a_t, a_v, n_t = (np.asarray(x, dtype=float) for x in (text_mass, visual_mass, n_text))
    ok = (n_t > 0) & (a_t + a_v > 0)
    if not ok.any() or n_visual <= 0:
        return {"mdi": None, "aei_text": None, "aei_visual": None}
    a_t, a_v, n_t = a_t[ok], a_v[ok], n_t[ok]
    per_text, per_visual = (a_t / n_t).mean(), (a_v / n_visual).mean()
    p_t, p_v = a_t / (a_t + a_v), a_v / (a_t + a_v)
    q_t, q_v = n_t / (n_t + n_visual), n_visual / (n_t + n_visual)
    return {"mdi": per_text / per_visual if per_visual > 0 else None,
            "aei_text": float((p_t / q_t).mean()), "aei_visual": float((p_v / q_v).mean())}


def modality_dominance(recording: Recording, rows: str = "last", include_system: bool = False,
                       layers: Sequence[int] | None = None) -> pl.DataFrame:
    """MDI and AEI per decoder layer from ``attention_mass`` (see the module docstring).
    Metrics: mdi, aei_text, aei_visual, text_mass, visual_mass (row means), n_text (mean visible
    text keys), n_visual. Columns: sample_id, stack ("llm"), layer, signal ("attention_mass"),
    rows, metric, value."""
    n_visual = recording.layout.n_tokens
    out = []
    for key in recording.keys("attention_mass", "llm"):
        if key.rows != rows or key.view != 0 or (layers is not None and key.layer not in layers):
            continue
        mass = recording.get("attention_mass", key.layer, rows, "llm").double().numpy()
        text = mass[:, CATEGORY["text"]] + (mass[:, CATEGORY["system"]] if include_system else 0.0)
        visual = mass[:, CATEGORY["visual"]]
        counts = text_key_counts(recording, rows, len(mass), include_system)
        metrics = dominance_metrics(text, visual, counts, n_visual) | {
            "text_mass": text.mean(), "visual_mass": visual.mean(), "n_text": counts.mean(), "n_visual": n_visual}
        out += [_row(recording, "llm", key.layer, "attention_mass", rows, m, v) for m, v in metrics.items()]
    return metric_frame(out)
