"""Everything a report shows, computed once: the sweep, the recordings, the analyses' tables."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl
from tqdm import tqdm

from analyses import comparison, failures, misalignment, redundancy
from reports.config import ReportConfig
from workbench.models.base import ModelAdapter
from workbench.recording import CaptureRequest
from workbench.samples import Sample
from workbench.sweep import (CONTROLS, MethodSpec, all_methods, budget_label, identity_mismatch, recorded_weights,
                             run_sweep)

# What the redundancy and misalignment analyses read, recorded once per analysed sample.
ANALYSIS_REQUEST = CaptureRequest(
    signals=("attention", "attention_norope", "attention_mass", "visual_states_out", "sink_share",
             "visual_sink_score", "massive_activations", "occlusion"),
    rows=("last", "text", "cls", "mean"),
)


def method_specs(names) -> list[MethodSpec]:
    if tuple(names) == ("all",):
        return all_methods()
    return [MethodSpec.parse(name) for name in names]


def set_aside_stale_sweep(adapter: ModelAdapter, folder: Path, dataset: str | None = None,
                          specs: list[MethodSpec] = ()) -> Path | None:
    """The report's sweep is its own cache: one made with other weights (a retrained model under
    the same name), or, given ``dataset`` and ``specs``, of other data-set content or other
    versions of a method, is moved aside, never deleted and never resumed. Returns where it went."""
    sweep = folder / "sweep"
    old = recorded_weights(sweep)
    if old is None:
        return None
    if old == adapter.fingerprint and (dataset is None or identity_mismatch(sweep, dataset, specs) is None):
        return None
    aside, n = folder / f"sweep-{old or 'unfingerprinted'}", 1
    while aside.exists():
        aside, n = folder / f"sweep-{old or 'unfingerprinted'}-{n}", n + 1
    sweep.rename(aside)
    return aside


def sweep_tables(adapter: ModelAdapter, samples: list[Sample], config: ReportConfig, folder: Path,
                 progress: bool) -> dict[str, pl.DataFrame]:
    specs = method_specs(config.methods)
    aside = set_aside_stale_sweep(adapter, folder, config.dataset, specs)
    if aside is not None:
        tqdm.write(f"{folder / 'sweep'} was not swept with these weights of {adapter.name} (fingerprint "
                   f"{adapter.fingerprint}), this data set's content or these method versions; moved to {aside}")
    sweep = run_sweep(adapter, samples, config.dataset, specs, config.budgets, folder / "sweep",
                      progress=progress, batch_size=config.batch_size).table
    ids = {s.id for s in samples}
    sweep = sweep.filter(pl.col("sample_id").is_in(ids) & pl.col("budget").is_in(
        [budget_label(b) for b in config.budgets] + ["100%", "0"]))
    controls = sweep.filter(pl.col("method").is_in(CONTROLS))
    seeds = [s.label for s in specs if s.name == "random" and s.params]  # the random baseline's other seeds
    random_seeds = sweep.filter(pl.col("method").is_in(["random"] + seeds))
    # The figures and analyses show each method once: the controls and the extra seeds are summarised apart.
    sweep = sweep.filter(pl.col("method").is_in([s.label for s in specs if s.label not in seeds] + ["unpruned"]))
    layouts = {s.id: adapter.prepare(s.load_image(), s.question).layout for s in samples}
    return {
        "sweep": sweep,
        "accuracy": comparison.accuracy_curves(sweep),
        "controls": comparison.accuracy_curves(controls, include_unpruned=False, include_controls=True),
        "random_seeds": comparison.accuracy_curves(random_seeds, include_unpruned=False),
        "accuracy_vs_cost": comparison.accuracy_vs_cost(sweep),
        "kept_overlap": comparison.kept_overlap(sweep),
        "evidence_recall": comparison.evidence_recall_by_budget(sweep),
        "spatial_coverage": comparison.spatial_coverage(sweep, layouts=layouts),
        "kept_position": comparison.kept_position(sweep, layouts=layouts),
    }


def recording_tables(adapter: ModelAdapter, samples: list[Sample], config: ReportConfig,
                     progress: bool) -> dict[str, pl.DataFrame]:
    from workbench.recorder import record

    wanted = set(config.analyses)
    parts: dict[str, list[pl.DataFrame]] = defaultdict(list)
    for sample in tqdm(samples, desc="recording", disable=not progress):
        prepared = adapter.prepare(sample.load_image(), sample.question)
        rec = record(adapter, prepared, ANALYSIS_REQUEST, sample_id=sample.id, question=sample.question,
                     answer=sample.answer)
        if "redundancy" in wanted:
            parts["redundancy"].append(redundancy.cosine_summary(rec, center=False))
            parts["attention_concentration"].append(redundancy.attention_concentration(rec))
        if "misalignment" in wanted:
            mask = sample.evidence_mask()
            parts["positional_bias"].append(misalignment.positional_bias(rec))
            parts["positional_profile"].append(pl.concat([
                misalignment.positional_profile(rec, signal) for signal in ("attention", "attention_norope")]))
            if mask is not None:
                evidence = prepared.layout.evidence_tokens(mask)
                parts["evidence_alignment"].append(pl.concat([
                    misalignment.evidence_alignment(rec, evidence, rows=rows) for rows in ("text", "last")]
                    + [misalignment.evidence_alignment(rec, evidence, signal="occlusion", rows="k1")]))
            parts["saliency_agreement"].append(misalignment.saliency_agreement(rec))
            parts["sink_capture"].append(misalignment.sink_capture(rec))
            parts["modality_dominance"].append(misalignment.modality_dominance(rec))
    tables = {name: pl.concat(frames, how="diagonal_relaxed") for name, frames in parts.items() if frames}
    for name in ("redundancy", "attention_concentration", "positional_bias", "evidence_alignment",
                 "saliency_agreement", "sink_capture", "modality_dominance"):
        if name in tables:
            tables[f"{name}_mean"] = redundancy.mean_over_samples(tables[name])
    if "redundancy_mean" in tables:
        tables["redundancy_trend"] = redundancy.depth_trend(tables["redundancy_mean"])
    return tables


def failure_tables(adapter: ModelAdapter, samples: list[Sample], sweep: pl.DataFrame, config: ReportConfig,
                   progress: bool) -> dict[str, pl.DataFrame]:
    saliency: dict = {}
    frames, taxonomies = [], []
    label = budget_label(config.diagnose_budget)
    for spec in tqdm(method_specs(config.methods), desc="diagnosing failures", disable=not progress):
        frame = failures.diagnose(adapter, samples, sweep, spec, config.diagnose_budget, progress=False,
                                  limit=config.diagnose_per_method, saliency_cache=saliency)
        n_failures = failures.failures(sweep, spec.label, config.diagnose_budget).height
        frames.append(frame)
        taxonomies.append(failures.taxonomy(frame).with_columns(
            method=pl.lit(spec.label), budget=pl.lit(label), failures=pl.lit(n_failures),
            diagnosed=pl.lit(frame.height)))
    diagnoses = pl.concat(frames, how="diagonal_relaxed") if frames else failures.diagnosis_frame([])
    return {"diagnoses": diagnoses, "failure_taxonomy": pl.concat(taxonomies) if taxonomies else pl.DataFrame()}
