"""Answer a data set with a model and score it: accuracy per question type, the blank-image
control, and how strongly the answer position attends to the ground-truth evidence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl
from PIL import Image
from tqdm import tqdm

from workbench.fitting import Fitting
from workbench.images import blank_image
from workbench.models.base import ModelAdapter
from workbench.samples import Sample
from workbench.scoring import normalize_answer


def blank_like(image: Image.Image) -> Image.Image:
    return blank_image(image.size)


def answer_dataset(adapter: ModelAdapter, samples: list[Sample], batch_size: int = 32, blank: bool = False,
                   progress: bool = True, max_new_tokens: int = 8) -> pl.DataFrame:
    """One row per sample: ``gold_answer``, ``predicted_answer`` (the names the sweep's table uses
    too), whether they match, the prediction's log-prob."""
    rows = []
    desc = "answering (blank images)" if blank else "answering"

    def answer(chunk: Sequence[Sample]) -> list[tuple[Sample, object]]:
        images = [s.load_image() for s in chunk]
        if blank:
            images = [blank_like(im) for im in images]
        return list(zip(chunk, adapter.answer_batch(images, [s.question for s in chunk], max_new_tokens)))

    fitting = Fitting(batch_size, desc, lambda s: f"sample {s.id}")
    with tqdm(total=len(samples), desc=desc, disable=not progress) as bar:
        for answered in fitting.run(answer, samples):
            for s, a in answered:
                rows.append({"id": s.id, "question_type": s.question_type or "all", "gold_answer": s.answer,
                             "predicted_answer": a.text, "logprob": a.logprob,
                             "correct": s.answer is not None and s.score(a.text).value == 1.0})
            bar.update(len(answered))
    return pl.DataFrame(rows)


def accuracy_table(answers: pl.DataFrame) -> pl.DataFrame:
    """Accuracy per question type, with an "overall" row last."""
    per_type = (answers.group_by("question_type").agg(n=pl.len(), accuracy=pl.col("correct").mean())
                .sort("question_type"))
    overall = pl.DataFrame({"question_type": ["overall"], "n": [answers.height],
                            "accuracy": [answers["correct"].mean()]}).cast(per_type.schema)
    return pl.concat([per_type, overall])


def majority_prior(samples: list[Sample]) -> pl.DataFrame:
    """Accuracy of always giving each question type's most frequent answer: what a model that
    ignores the image can reach at best by answer frequency alone."""
    frame = pl.DataFrame({"question_type": [s.question_type or "all" for s in samples],
                          "answer": [normalize_answer(s.answer) for s in samples]})
    counts = frame.group_by("question_type", "answer").len()
    top = counts.group_by("question_type").agg(top=pl.col("len").max(), n=pl.col("len").sum())
    per_type = top.select("question_type", prior=pl.col("top") / pl.col("n")).sort("question_type")
    overall = pl.DataFrame({"question_type": ["overall"], "prior": [float(top["top"].sum() / top["n"].sum())]})
    return pl.concat([per_type, overall.cast(per_type.schema)])


@dataclass(frozen=True)
class EvidenceAttention:
    """Head-mean attention of the last prompt token, per decoder layer, split by evidence."""

    layer: int
    evidence_share_of_visual_attention: float  # attention on evidence tokens / attention on all visual tokens
    evidence_share_of_tokens: float  # evidence tokens / visual tokens
    ratio: float  # the first over the second: 1 = no preference for the evidence


def evidence_attention(adapter: ModelAdapter, samples: list[Sample], progress: bool = True) -> pl.DataFrame:
    """Per decoder layer, how much more the answer position attends to evidence than chance.

    The last row's head-mean attention over the visual keys comes from the probes (one traced
    SDPA forward), so this runs on large models too.
    """
    from workbench.recorder import record
    from workbench.recording import CaptureRequest

    request = CaptureRequest(signals=("attention",), rows=("last",), stacks=("llm",))
    n_layers = len(adapter.decoder_layers())
    per_layer: dict[int, list[tuple[float, float]]] = {}
    for s in tqdm(samples, desc="evidence attention", disable=not progress):
        mask = s.evidence_mask()
        if mask is None:
            continue
        prepared = adapter.prepare(s.load_image(), s.question)
        evidence = prepared.layout.evidence_tokens(mask)
        if not evidence.any():
            continue
        recording = record(adapter, prepared, request, sample_id=s.id, question=s.question)
        for layer in range(n_layers):
            row = recording.get("attention", layer, "last", "llm")[0].float().numpy()
            share = row[evidence].sum() / max(row.sum(), 1e-12)
            per_layer.setdefault(layer, []).append((share, evidence.mean()))
    rows = []
    for layer, values in sorted(per_layer.items()):
        shares, base = np.array(values).T
        rows.append(EvidenceAttention(layer, float(shares.mean()), float(base.mean()),
                                      float(shares.mean() / base.mean())).__dict__)
    return pl.DataFrame(rows)
