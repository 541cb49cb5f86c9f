"""The observations pruning papers build on, measured on the user's model, each beside the value the
paper reports for its own model.

* ``attention_by_role``: the last token's attention on image, text and system tokens per decoder
  layer, and the attention per token of each role (FastV, on LLaVA-1.5-7B: image tokens are about
  64 % of the input yet get the least attention per token after layer 2; the system prompt takes
  about 85 % of it in deep layers).
* ``fastv_rows``: where in the image FastV's kept tokens sit (K=3, R=0.75, i.e. the top 25 % by the
  last token's attention in layer K-1), scored with and without RoPE (FEATHER: with RoPE the kept
  tokens' mean row is 80.7 % of the way down the image).
* ``visual_sinks``: the sink dimensions of the residual stream and the visual sink tokens whose
  score over them exceeds VAR's threshold (VAR, on LLaVA-1.5-7B: dimensions 2533 and 1415,
  threshold 20, from layer 2 on). The threshold is scaled with sqrt(hidden size / 4096), since the
  score cannot exceed sqrt(hidden size).
* ``topk_overlap``: the Jaccard overlap of the top-k visual tokens chosen independently at each pair
  of decoder layers by the last token's attention (near zero on LLaVA-1.5-7B).
* ``zero_token_accuracy``: accuracy with every visual token removed before the LLM, and as a share
  of the unpruned accuracy, per benchmark (MMTok's image-contribution analysis, LLaVA-1.5-7B: 92 %
  of its MMMU accuracy and 91 % of its ScienceQA accuracy remain). Each sample is scored as its
  data set says (``Sample.score``: POPE, VQA soft accuracy, option letters, ...).

Every function reads recordings of the unpruned forward (``REQUEST``) or, for the last one,
executions of plans; ``claims`` lines the measured values up with the papers'; ``measure`` runs
them all on a model and samples of any stored form (``workbench findings`` and the report's
literature section both call it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl

from workbench.pruning.layers import scaled_layer
from workbench.recording import CaptureRequest, Recording

REQUEST = CaptureRequest(signals=("attention", "attention_norope", "attention_mass", "massive_activations",
                                  "visual_sink_score"), rows=("last",), stacks=("llm",))
ROLES = ("visual", "text", "system")  # the first three columns of attention_mass (KEY_CATEGORIES)
VAR_TAU, VAR_HIDDEN = 20.0, 4096
VAR_SINK_DIMS = (2533, 1415)  # VAR's sink dimensions of LLaVA-1.5-7B's residual stream
VAR_FROM_LAYER = 2


@dataclass(frozen=True)
class Claim:
    """One observation of a paper, with the model it was measured on and its value there."""

    finding: str
    paper: str
    paper_model: str
    statement: str
    paper_value: float | None


CLAIMS = (
    Claim("image_token_share", "FastV", "LLaVA-1.5-7B", "share of the input tokens that are image tokens", 0.64),
    Claim("system_attention_deep", "FastV", "LLaVA-1.5-7B",
          "last token's attention on system tokens, mean over the deeper half of the layers", 0.85),
    Claim("image_least_attended_after_2", "FastV", "LLaVA-1.5-7B",
          "share of layers from 2 on where image tokens get the least attention per token", 1.0),
    Claim("fastv_kept_row_rope", "FEATHER", "LLaVA-1.5-7B",
          "mean image row of FastV's kept tokens (K=3, R=0.75), 0 = top, 1 = bottom", 0.807),
    Claim("fastv_kept_row_norope", "FEATHER", "LLaVA-1.5-7B",
          "the same, with the attention scored without RoPE", None),
    Claim("visual_sink_share", "VAR", "LLaVA-1.5-7B",
          "share of visual tokens that are visual sinks, layers 2 on (dimensions 2533, 1415; threshold 20)", None),
    Claim("topk_overlap", "FastV / layer-wise selection", "LLaVA-1.5-7B",
          "mean Jaccard overlap of the top-25 % visual tokens chosen at two different layers", 0.0),
    Claim("zero_token_retention", "MMTok", "LLaVA-1.5-7B",
          "accuracy with zero visual tokens as a share of the unpruned accuracy (MMMU 0.92, ScienceQA 0.91)", 0.92),
)


def role_counts(recording: Recording) -> dict[str, int]:
    """Tokens of each role in the recorded sequence: text after the image, system the rest."""
    layout = recording.layout
    after = layout.sequence_length - 1 - int(layout.positions.max()) if layout.n_tokens else 0
    return {"visual": layout.n_tokens, "text": after, "system": layout.sequence_length - layout.n_tokens - after}


def attention_by_role(recordings: Sequence[Recording]) -> pl.DataFrame:
    """Per sample, layer and role: the last token's attention share, the role's share of the
    tokens, and their ratio (attention per token relative to a uniform spread)."""
    rows = []
    for rec in recordings:
        counts = role_counts(rec)
        total = sum(counts.values())
        for layer in sorted({k.layer for k in rec.keys("attention_mass", "llm")}):
            mass = rec.get("attention_mass", layer, "last", "llm")[0].double().numpy()
            for column, role in enumerate(ROLES):
                share, tokens = float(mass[column]), counts[role] / total
                rows.append({"sample_id": rec.identity.sample_id, "layer": layer, "role": role,
                             "attention": share, "token_share": tokens,
                             "per_token": share / tokens if tokens else None})
    return pl.DataFrame(rows, schema={"sample_id": pl.String, "layer": pl.Int64, "role": pl.String,
                                      "attention": pl.Float64, "token_share": pl.Float64, "per_token": pl.Float64})


def relative_rows(layout) -> np.ndarray:
    """Each visual token's row within its grid, 0 at the top and 1 at the bottom."""
    rows = np.array([layout.groups[g].rows for g in layout.group], dtype=float)
    return layout.cell[:, 0] / np.maximum(rows - 1, 1)


def fastv_rows(recordings: Sequence[Recording], decoder_layers: int, k: int = 3, ratio: float = 0.75) -> pl.DataFrame:
    """Mean relative row of the tokens FastV keeps (top ``1 - ratio`` by the last token's attention
    in layer K-1, K scaled to the decoder), with and without RoPE, per sample."""
    layer = max(scaled_layer(k, decoder_layers) - 1, 0)
    rows = []
    for rec in recordings:
        n = rec.layout.n_tokens
        keep = max(1, int(round(n * (1 - ratio))))
        where = relative_rows(rec.layout)
        for signal in ("attention", "attention_norope"):
            scores = rec.get(signal, layer, "last", "llm")[0].double().numpy()
            kept = np.argsort(-scores, kind="stable")[:keep]
            rows.append({"sample_id": rec.identity.sample_id, "layer": layer, "signal": signal,
                         "kept": keep, "mean_row": float(where[kept].mean())})
    return pl.DataFrame(rows)


def var_threshold(hidden_size: int) -> float:
    return VAR_TAU * math.sqrt(hidden_size / VAR_HIDDEN)


def visual_sinks(recordings: Sequence[Recording], hidden_size: int) -> pl.DataFrame:
    """Per sample and layer: the sink dimensions found in the residual stream and the share of
    visual tokens above VAR's (scaled) threshold over them."""
    tau = var_threshold(hidden_size)
    rows = []
    for rec in recordings:
        table = rec.tables.get("massive_activations")
        for layer in sorted({k.layer for k in rec.keys("visual_sink_score", "llm")}):
            score = rec.get("visual_sink_score", layer, "tokens", "llm")[0].double().numpy()
            dims = [] if table is None else sorted(set(table.filter(pl.col("layer") == layer)["dim"].to_list()))
            rows.append({"sample_id": rec.identity.sample_id, "layer": layer, "sink_dims": dims,
                         "threshold": tau, "visual_sinks": int((score > tau).sum()),
                         "visual_sink_share": float((score > tau).mean()) if len(score) else None})
    return pl.DataFrame(rows, schema={"sample_id": pl.String, "layer": pl.Int64, "sink_dims": pl.List(pl.Int64),
                                      "threshold": pl.Float64, "visual_sinks": pl.Int64,
                                      "visual_sink_share": pl.Float64})


def topk_overlap(recordings: Sequence[Recording], keep: float = 0.25) -> pl.DataFrame:
    """Jaccard overlap of the top ``keep`` share of visual tokens by the last token's attention,
    chosen independently at every pair of decoder layers, per sample."""
    rows = []
    for rec in recordings:
        n = rec.layout.n_tokens
        k = max(1, int(round(n * keep)))
        layers = sorted({key.layer for key in rec.keys("attention", "llm")})
        chosen = {layer: set(np.argsort(-rec.get("attention", layer, "last", "llm")[0].double().numpy(),
                                        kind="stable")[:k].tolist()) for layer in layers}
        for i, a in enumerate(layers):
            for b in layers[i + 1:]:
                rows.append({"sample_id": rec.identity.sample_id, "layer_a": a, "layer_b": b,
                             "jaccard": len(chosen[a] & chosen[b]) / len(chosen[a] | chosen[b])})
    return pl.DataFrame(rows, schema={"sample_id": pl.String, "layer_a": pl.Int64, "layer_b": pl.Int64,
                                      "jaccard": pl.Float64})


def _mean(frame: pl.DataFrame, column: str) -> float | None:
    return None if frame.is_empty() or frame[column].null_count() == frame.height else float(frame[column].mean())


def claims(by_role: pl.DataFrame, rows: pl.DataFrame, sinks: pl.DataFrame, overlap: pl.DataFrame,
           zero: pl.DataFrame | None, decoder_layers: int) -> pl.DataFrame:
    """Each claim with the paper's value and the value measured here (null where not measured)."""
    deep = by_role.filter((pl.col("layer") >= decoder_layers // 2) & (pl.col("role") == "system"))
    from_two = by_role.filter(pl.col("layer") >= min(2, decoder_layers - 1))
    least = (from_two.group_by("layer", "role").agg(pl.col("per_token").mean())
             .sort("per_token").group_by("layer").agg(pl.col("role").first()))
    visual = by_role.filter((pl.col("role") == "visual") & (pl.col("layer") == by_role["layer"].min()))
    measured = {
        "image_token_share": _mean(visual, "token_share"),
        "system_attention_deep": _mean(deep, "attention"),
        "image_least_attended_after_2": float((least["role"] == "visual").mean()) if least.height else None,
        "fastv_kept_row_rope": _mean(rows.filter(pl.col("signal") == "attention"), "mean_row"),
        "fastv_kept_row_norope": _mean(rows.filter(pl.col("signal") == "attention_norope"), "mean_row"),
        "visual_sink_share": _mean(sinks.filter(pl.col("layer") >= min(2, decoder_layers - 1)), "visual_sink_share"),
        "topk_overlap": _mean(overlap, "jaccard"),
        "zero_token_retention": None if zero is None or zero.is_empty() else zero_retention(zero),
    }
    return pl.DataFrame([{"finding": c.finding, "paper": c.paper, "paper_model": c.paper_model,
                          "statement": c.statement, "paper_value": c.paper_value, "measured": measured[c.finding]}
                         for c in CLAIMS],
                        schema={"finding": pl.String, "paper": pl.String, "paper_model": pl.String,
                                "statement": pl.String, "paper_value": pl.Float64, "measured": pl.Float64})


def zero_retention(zero: pl.DataFrame) -> float | None:
    """Accuracy with zero visual tokens over the unpruned accuracy (``zero_token_accuracy`` rows)."""
    full = zero["unpruned_score"].mean()
    return None if not full else float(zero["zero_score"].mean() / full)


def zero_token_accuracy(adapter, samples, max_new_tokens: int = 8) -> pl.DataFrame:
    """Per sample: the score of the unpruned answer and of the answer with every visual token
    removed before the LLM (what the image is worth on this data set), each scored as the sample's
    data set says."""
    from workbench.pruning.executor import execute
    from workbench.pruning.plan import KeepPlan, Stage

    rows = []
    for sample in samples:
        if sample.answer is None:
            continue
        prepared = adapter.prepare(sample.load_image(), sample.question)
        n = prepared.layout.n_tokens
        plans = {"unpruned": KeepPlan.keep_all(n, where=None, method="unpruned"),
                 "zero": KeepPlan("zero_visual_tokens", 0, n, (Stage("pre_llm", ()),))}
        answers = {name: execute(adapter, prepared, plan, max_new_tokens).answer for name, plan in plans.items()}
        rows.append({"sample_id": sample.id, "benchmark": sample.benchmark or "dataset",
                     "question_type": sample.question_type or "all",
                     "unpruned_answer": answers["unpruned"], "zero_answer": answers["zero"],
                     "unpruned_score": sample.score(answers["unpruned"]).value,
                     "zero_score": sample.score(answers["zero"]).value})
    return pl.DataFrame(rows, schema={"sample_id": pl.String, "benchmark": pl.String, "question_type": pl.String,
                                      "unpruned_answer": pl.String, "zero_answer": pl.String,
                                      "unpruned_score": pl.Float64, "zero_score": pl.Float64})


def zero_by_benchmark(zero: pl.DataFrame) -> pl.DataFrame:
    """Accuracy unpruned and with zero visual tokens, and their ratio, per benchmark."""
    return (zero.group_by("benchmark", maintain_order=True)
            .agg(n=pl.len(), unpruned=pl.col("unpruned_score").mean(), zero_tokens=pl.col("zero_score").mean())
            .with_columns(retention=pl.when(pl.col("unpruned") > 0)
                          .then(pl.col("zero_tokens") / pl.col("unpruned")).otherwise(None)))


def role_shares(by_role: pl.DataFrame) -> pl.DataFrame:
    """The last token's attention share on system, image and text tokens per layer (mean over
    samples), with each role's share of the tokens: FastV's figure, one row per layer."""
    mean = by_role.group_by("layer", "role").agg(pl.col("attention").mean(), pl.col("token_share").mean())
    wide = mean.pivot(on="role", index="layer", values="attention").sort("layer")
    tokens = {r: float(mean.filter(pl.col("role") == r)["token_share"].mean()) for r in ROLES}
    return wide.select("layer", *[pl.col(r).alias(f"{r}_attention") for r in ("system", "visual", "text")]).with_columns(
        **{f"{r}_tokens": pl.lit(tokens[r]) for r in ("system", "visual", "text")})


def sink_dimensions(sinks: pl.DataFrame, decoder_layers: int) -> pl.DataFrame:
    """The residual-stream dimensions found as sink dimensions from VAR's layer 2 on, with the
    share of (sample, layer) pairs they were found in, most frequent first; VAR's are 2533, 1415."""
    late = sinks.filter(pl.col("layer") >= min(VAR_FROM_LAYER, decoder_layers - 1))
    schema = {"dim": pl.Int64, "share": pl.Float64, "in_var": pl.Boolean}
    if late.is_empty():
        return pl.DataFrame(schema=schema)
    counts = late.select(pl.col("sink_dims").explode().alias("dim")).drop_nulls().group_by("dim").len()
    return (counts.with_columns(share=pl.col("len") / late.height, in_var=pl.col("dim").is_in(VAR_SINK_DIMS))
            .sort(["share", "dim"], descending=[True, False]).select(list(schema)).cast(schema))


def measure(adapter, samples, progress: bool = True, max_new_tokens: int = 8) -> dict[str, pl.DataFrame]:
    """Every observation on ``samples`` (recorded once each with ``REQUEST``), the claims beside
    the papers', and the summaries printed and reported."""
    from tqdm import tqdm

    from workbench.recorder import record

    recordings = [record(adapter, adapter.prepare(s.load_image(), s.question), REQUEST, sample_id=s.id,
                         question=s.question) for s in tqdm(samples, desc="recording", disable=not progress)]
    depth = len(adapter.decoder_layers())
    by_role = attention_by_role(recordings)
    tables = {
        "attention_by_role": by_role,
        "fastv_rows": fastv_rows(recordings, depth),
        "visual_sinks": visual_sinks(recordings, int(adapter.language_model().config.hidden_size)),
        "topk_overlap": topk_overlap(recordings),
        "zero_tokens": zero_token_accuracy(adapter, tqdm(samples, desc="zero visual tokens", disable=not progress),
                                           max_new_tokens),
    }
    tables["claims"] = claims(by_role, tables["fastv_rows"], tables["visual_sinks"], tables["topk_overlap"],
                              tables["zero_tokens"], depth)
    tables["role_shares"] = role_shares(by_role)
    tables["sink_dimensions"] = sink_dimensions(tables["visual_sinks"], depth)
    tables["zero_by_benchmark"] = zero_by_benchmark(tables["zero_tokens"])
    return tables
