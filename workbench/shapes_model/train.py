"""Train the shipped model from scratch on CPU.

The recipe (what made a tiny LLaVA learn to pick one object among 144 visual tokens):
- a curriculum over the number of objects per scene (1, then 1-2, then 2-4);
- several questions per image in one multi-turn sequence, loss on every answer;
- a dense auxiliary loss: linear heads on the projected visual tokens predict the colour, shape and
  size of the object under each patch. It stands in for the pretraining that real LLaVA vision
  towers have; the heads are dropped when the model is saved;
- decoder ``initializer_range`` 0.05, AdamW at 1e-3 with warm-up, clipping, and a linear decay at
  the end.
The step computes only what the losses read (``losses.py``); every batch is a pure function of
(seed, step), so a run is reproducible from its config.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from workbench.errors import UserError
from workbench.scenes import COLOURS, GRID, QUESTION_TYPES, SHAPES, SIZES, Scene, ask, make_scene
from workbench.shapes_model.build import NUM_VISUAL_TOKENS, PATCH_SIZE, build_model, build_processor
from workbench.shapes_model.losses import training_losses
from workbench.shapes_model.tokenizer import ASSISTANT, USER

EVAL_SEED = 10_000  # training draws from (seed, step) streams with seed < EVAL_SEED


class TrainConfigError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5000
    batch_size: int = 16
    questions_per_image: int = 6
    lr: float = 1e-3
    warmup_steps: int = 200
    decay_start: float = 0.8  # fraction of the run after which the learning rate decays linearly to 0
    one_object_until: int = 400
    up_to_two_objects_until: int = 1200
    max_objects: int = 4
    aux_weight: float = 1.0
    aux_targets: tuple[str, ...] = ("colour", "shape", "size", "pair", "cell")
    seed: int = 0
    eval_every: int = 1000
    eval_scenes: int = 300
    threads: int = 2

    def __post_init__(self):
        positive = ("steps", "batch_size", "questions_per_image", "eval_every", "eval_scenes", "threads")
        problems = [f"{name} must be >= 1 (got {getattr(self, name)})" for name in positive if getattr(self, name) < 1]
        problems += [f"{name} must be >= 0 (got {getattr(self, name)})" for name in
                     ("warmup_steps", "one_object_until", "up_to_two_objects_until", "aux_weight")
                     if getattr(self, name) < 0]
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if not 0 <= self.decay_start <= 1:
            problems.append(f"decay_start is a fraction of the run in [0, 1] (got {self.decay_start})")
        if not 2 <= self.max_objects <= GRID * GRID:
            problems.append(f"max_objects must be in 2..{GRID * GRID}: relation questions need two objects, and "
                            f"every object has its own cell of the {GRID}x{GRID} grid (got {self.max_objects})")
        problems += unknown_aux_targets(self.aux_targets)
        if problems:
            raise TrainConfigError("invalid training config: " + "; ".join(problems))

    def object_range(self, step: int) -> tuple[int, int]:
        if step < self.one_object_until:
            return 1, 1
        if step < self.up_to_two_objects_until:
            return 1, 2
        return 2, self.max_objects

    def learning_rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        start = int(self.decay_start * self.steps)
        if step < start:
            return self.lr
        return self.lr * max(0.0, (self.steps - step) / max(1, self.steps - start))


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    patch_targets: torch.Tensor  # [B, N, T]: the config's aux_targets for each patch (0 = no object)


# What the auxiliary heads predict for the object under each patch, and how many classes each has
# (class 0 = no object). Colour, shape and size alone leave two things to the decoder that a
# pretrained tower's features carry: which colour goes with which shape ("pair", for binding) and
# where the object is ("cell").
AUX_TARGETS = {
    "colour": (len(COLOURS), lambda o: list(COLOURS).index(o.colour)),
    "shape": (len(SHAPES), lambda o: SHAPES.index(o.shape)),
    "size": (len(SIZES), lambda o: list(SIZES).index(o.size)),
    "pair": (len(COLOURS) * len(SHAPES), lambda o: list(COLOURS).index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)),
    "cell": (9, lambda o: o.cell[0] * 3 + o.cell[1]),
}


def unknown_aux_targets(names) -> list[str]:
    unknown = sorted(set(names) - set(AUX_TARGETS))
    return [f"unknown auxiliary targets {unknown}; known: {list(AUX_TARGETS)}"] if unknown else []


def patch_targets(scene: Scene, names=tuple(AUX_TARGETS), patch: int = PATCH_SIZE) -> np.ndarray:
    """[N, len(names)]: per patch, the class (1-based) of the object covering most of it
    (at least a quarter of the patch), else 0."""
    n = scene.size // patch
    labels = scene.labels.reshape(n, patch, n, patch).transpose(0, 2, 1, 3).reshape(n * n, patch * patch)
    counts = np.stack([(labels == k).sum(1) for k in range(len(scene.objects) + 1)], axis=1)
    counts[:, 0] = 0
    owner = np.where(counts.max(1) >= patch * patch // 4, counts.argmax(1), 0)
    table = np.zeros((len(scene.objects) + 1, len(names)), dtype=np.int64)
    for k, obj in enumerate(scene.objects, start=1):
        table[k] = [AUX_TARGETS[name][1](obj) + 1 for name in names]
    return table[owner]


class BatchMaker:
    def __init__(self, processor, config: TrainConfig):
        self.processor = processor
        self.config = config
        tok = processor.tokenizer
        self.tok = tok
        self.prefix = [tok.bos_token_id, tok.convert_tokens_to_ids(USER)] + [tok.convert_tokens_to_ids(tok.image_token)] * NUM_VISUAL_TOKENS
        self.user = tok.convert_tokens_to_ids(USER)
        self.assistant = tok.convert_tokens_to_ids(ASSISTANT)
        self._ids: dict[str, list[int]] = {}  # questions come from a few templates: tokenise each once

    def words(self, text: str) -> list[int]:
        if text not in self._ids:
            self._ids[text] = self.tok(text, add_special_tokens=False).input_ids
        return self._ids[text]

    def sequence(self, questions) -> tuple[list[int], list[int]]:
        ids, labels = list(self.prefix), [-100] * len(self.prefix)
        for turn, q in enumerate(questions):
            prompt = ([self.user] if turn else []) + self.words(q.question) + [self.assistant]
            answer = self.words(q.answer) + [self.tok.eos_token_id]
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
        return ids, labels

    def make(self, step: int, n_images: int, rng_seed, questions_per_image: int) -> Batch:
        rng = np.random.default_rng(rng_seed)
        lo, hi = self.config.object_range(step)
        scenes, sequences = [], []
        for _ in range(n_images):
            scene = make_scene(rng, int(rng.integers(lo, hi + 1)))
            types = rng.permutation(len(QUESTION_TYPES))
            questions = []
            for t in range(questions_per_image):
                q = ask(scene.objects, QUESTION_TYPES[int(types[t % len(types)])], rng)
                if q is not None:
                    questions.append(q)
            scenes.append(scene)
            sequences.append(self.sequence(questions))
        return self.collate(scenes, sequences)

    def collate(self, scenes, sequences) -> Batch:
        length = max(len(ids) for ids, _ in sequences)
        pad = self.tok.pad_token_id
        input_ids = torch.full((len(sequences), length), pad)
        labels = torch.full((len(sequences), length), -100)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, (ids, lab) in enumerate(sequences):  # right padding: positions match inference
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        pixels = self.processor.image_processor([s.image for s in scenes], return_tensors="pt").pixel_values
        targets = torch.from_numpy(np.stack([patch_targets(s, self.config.aux_targets) for s in scenes]))
        return Batch(input_ids, mask, labels, pixels, targets)


class AuxiliaryHeads(torch.nn.Module):
    """Linear heads on the projected visual tokens, one per auxiliary target; not saved."""

    def __init__(self, width: int, names: tuple[str, ...]):
        super().__init__()
        problems = unknown_aux_targets(names)
        if problems:
            raise TrainConfigError(problems[0])
        self.heads = torch.nn.ModuleList([torch.nn.Linear(width, AUX_TARGETS[n][0] + 1) for n in names])

    def loss(self, visual: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(h(visual).flatten(0, 1), targets[..., i].flatten()) for i, h in enumerate(self.heads))


@torch.no_grad()
def first_token_accuracy(model, batch: Batch, types: list[str]) -> dict[str, float]:
    """Teacher-forced accuracy of the first answer token (every answer here is one word)."""
    model.eval()
    logits = model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask).logits
    model.train()
    rows = torch.arange(len(types))
    first = (batch.labels != -100).float().argmax(1)  # first answer position
    correct = (logits[rows, first - 1].argmax(-1) == batch.labels[rows, first]).tolist()
    by_type: dict[str, list[bool]] = {}
    for t, c in zip(types, correct):
        by_type.setdefault(t, []).append(c)
    result = {t: float(np.mean(v)) for t, v in sorted(by_type.items())}
    result["overall"] = float(np.mean(correct))
    return result


def eval_batch(maker: BatchMaker, config: TrainConfig) -> tuple[Batch, list[str]]:
    """Held-out scenes at full difficulty, one question each, types in rotation."""
    rng = np.random.default_rng([EVAL_SEED, config.seed])
    scenes, sequences, types = [], [], []
    for i in range(config.eval_scenes):
        scene = make_scene(rng, int(rng.integers(2, config.max_objects + 1)))
        q = ask(scene.objects, QUESTION_TYPES[i % len(QUESTION_TYPES)], rng)
        if q is None:
            continue
        scenes.append(scene)
        sequences.append(maker.sequence([q]))
        types.append(q.question_type)
    return maker.collate(scenes, sequences), types


def save_atomically(model, processor, out_dir: Path, extra: dict[str, str]) -> None:
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for name, text in extra.items():
        (tmp / name).write_text(text)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def make_optimizer(model, heads: AuxiliaryHeads, config: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=config.lr, weight_decay=0.01)


def train_step(model, heads: AuxiliaryHeads, optimizer: torch.optim.Optimizer, batch: Batch,
               aux_weight: float, losses=training_losses) -> tuple[float, float]:
    """One optimiser step on ``batch``; returns (answer loss, auxiliary loss). ``losses`` is
    ``training_losses`` or its reference, ``full_forward_losses``."""
    lm, visual = losses(model, batch)
    aux = heads.loss(visual, batch.patch_targets)
    optimizer.zero_grad(set_to_none=True)
    (lm + aux_weight * aux).backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
    optimizer.step()
    return lm.item(), aux.item()


def train(config: TrainConfig, out_dir: Path, progress: bool = True) -> list[dict]:
    """Train and save to ``out_dir`` (at every evaluation, so an interrupted run leaves a model)."""
    torch.set_num_threads(config.threads)
    processor = build_processor()
    model = build_model(processor, seed=config.seed)
    heads = AuxiliaryHeads(model.config.text_config.hidden_size, config.aux_targets)
    torch.manual_seed(config.seed)
    optimizer = make_optimizer(model, heads, config)
    maker = BatchMaker(processor, config)
    held_out, held_out_types = eval_batch(maker, config)
    curve: list[dict] = []
    started = time.perf_counter()
    model.train()
    bar = tqdm(range(config.steps), desc="train-shapes", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate(step)
        batch = maker.make(step, config.batch_size, [config.seed, step], config.questions_per_image)
        lm, aux = train_step(model, heads, optimizer, batch, config.aux_weight)
        if not math.isfinite(lm + aux):
            raise RuntimeError(f"training diverged at step {step} (answer loss {lm}, auxiliary loss {aux})")
        bar.set_postfix(answer=f"{lm:.3f}", aux=f"{aux:.3f}")
        last = step == config.steps - 1
        if (step + 1) % config.eval_every == 0 or last:
            accuracy = first_token_accuracy(model, held_out, held_out_types)
            curve.append({"step": step + 1, "minutes": round((time.perf_counter() - started) / 60, 2),
                          "answer_loss": round(lm, 4), "aux_loss": round(aux, 4),
                          **{f"acc_{k}": round(v, 4) for k, v in accuracy.items()}})
            tqdm.write(json.dumps(curve[-1]))
            save_atomically(model, processor, out_dir, {
                "training_curve.json": json.dumps(curve, indent=1),
                "train_config.json": json.dumps(asdict(config), indent=1),
            })
    return curve
