"""Write grounded scene data sets to disk in the plain format of ``workbench.samples``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from workbench.samples import Sample, write_dataset
from workbench.scenes import QUESTION_TYPES, ask, make_scene

DEFAULT_EVAL_SEED = 20_000  # disjoint from the training streams (seeds 0..) and their held-out set


def make_dataset(out_dir: str | Path, n_samples: int = 1200, seed: int = DEFAULT_EVAL_SEED,
                 min_objects: int = 2, max_objects: int = 4, image_size: int = 96,
                 progress: bool = True) -> list[Sample]:
    """Scenes with one question of each type per scene until every type has its share.

    Each scene's image and label mask (value k = k-th object) are written once and shared by its
    questions; each sample's mask values select the objects its answer depends on.
    """
    if n_samples < len(QUESTION_TYPES):
        raise ValueError(f"n_samples must be at least {len(QUESTION_TYPES)} (one per question type)")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    quota = {t: n_samples // len(QUESTION_TYPES) + (i < n_samples % len(QUESTION_TYPES))
             for i, t in enumerate(QUESTION_TYPES)}
    samples: list[Sample] = []
    bar = tqdm(total=n_samples, desc="scenes", disable=not progress)
    scene_index = 0
    while len(samples) < n_samples:
        scene = make_scene(rng, int(rng.integers(min_objects, max_objects + 1)), image_size)
        name = f"scene-{scene_index:05d}"
        image_path, mask_path = out_dir / "images" / f"{name}.png", out_dir / "masks" / f"{name}.png"
        wrote = False
        for qtype in QUESTION_TYPES:
            if quota[qtype] == 0:
                continue
            q = ask(scene.objects, qtype, rng)
            if q is None:
                continue
            if not wrote:
                scene.image.save(image_path)
                Image.fromarray(scene.labels.astype(np.uint8)).save(mask_path)
                wrote = True
            quota[qtype] -= 1
            samples.append(Sample(
                id=f"{name}-{qtype}", image_path=image_path, question=q.question, answer=q.answer,
                question_type=qtype, evidence_boxes=tuple(tuple(map(float, scene.objects[i].box)) for i in q.evidence),
                mask_path=mask_path, mask_values=tuple(i + 1 for i in q.evidence),
                extra={"objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "cell": list(o.cell),
                                    "box": list(o.box)} for o in scene.objects]},
            ))
            bar.update(1)
        scene_index += 1
    bar.close()
    write_dataset(samples, out_dir / "samples.jsonl")
    return samples
