"""The report's picture of what each method keeps: one sample, every method's final kept set at the
diagnosed budget, drawn over the image (``workbench.overlay``) from the sweep's stored plans.

The sample is the first swept one with ground-truth evidence on which the methods disagree most
(the most distinct kept sets), so the picture shows the methods apart; nothing is re-run.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
from PIL import Image

from analyses.method_style import ordered, styles
from workbench import overlay
from workbench.pruning.plan import Stage

PER_ROW = 6
WIDTH = 200  # px per method


def _pick_sample(rows: pl.DataFrame, with_evidence: set[str]) -> str | None:
    best, best_count = None, -1
    for (sample,), part in rows.group_by("sample_id", maintain_order=True):
        if sample not in with_evidence:
            continue
        distinct = len({json.dumps(json.loads(s)[-1]["kept"] if s and json.loads(s) else None)
                        for s in part["stages"].to_list()})
        if distinct > best_count:
            best, best_count = sample, distinct
    return best


def kept_tokens_image(adapter, samples, sweep: pl.DataFrame, budget: str) -> tuple[Image.Image, str] | None:
    """(the contact sheet, a caption) or None when no row at ``budget`` has a sample with evidence."""
    rows = sweep.filter((pl.col("budget") == budget) & (pl.col("status") == "ok")).sort("sample_id", "method")
    by_id = {s.id: s for s in samples}
    with_evidence = {s.id for s in samples if s.evidence_mask() is not None}
    sample_id = _pick_sample(rows, with_evidence)
    if sample_id is None:
        return None
    sample = by_id[sample_id]
    image = sample.load_image()
    layout = adapter.prepare(image, sample.question).layout
    evidence = layout.evidence_tokens(sample.evidence_mask())
    part = rows.filter(pl.col("sample_id") == sample_id)
    methods = ordered(part["method"].to_list())
    style = styles(methods)
    scale = overlay.display_scale(image.size, WIDTH)
    tiles = [overlay.captioned(overlay.scaled(image, scale), "original image")]
    for method in methods:
        row = part.filter(pl.col("method") == method).row(0, named=True)
        stages = [Stage.from_dict(s) for s in json.loads(row["stages"] or "[]")]
        kept = np.asarray(stages[-1].kept if stages else range(layout.n_tokens), dtype=np.int64)
        merges = [m for s in stages for m in s.folds]
        drawn = overlay.draw_panels(lambda groups: overlay.kept_overlay(image, layout, kept, scale, merges, evidence,
                                                                        groups=groups), layout)
        mark = "right" if row["correct"] else "wrong"
        colour = tuple(int(style[method].colour[i:i + 2], 16) for i in (1, 3, 5))
        tiles.append(overlay.captioned(drawn, f"{method}: {len(kept)} kept, {mark}", bar=colour))
    sheet = overlay.grid(tiles, PER_ROW)
    sheet = overlay.stacked([sheet, overlay.kept_key(sheet.width)])
    caption = (f"What each method keeps at {budget} on {sample_id} ({sample.question!r}, gold "
               f"{sample.answer!r}): dropped tokens dimmed, evidence outlined green where kept and red where "
               "dropped, merges outlined in a colour per group; methods grouped by what scores their tokens.")
    return sheet, caption
