"""What one training step of the shipped model costs, beside cheaper variants of the recipe.

``workbench train-shapes`` must finish within its time budget on 2 cores, and a shared 2-core
virtual machine's speed can drift by 30 % within an hour, so a variant is judged by its ratio to the shipped
recipe measured side by side: every variant runs ``STEPS`` optimiser steps per round, the variants
take turns over ``ROUNDS`` rounds, and the median seconds per step of each is printed with its
ratio to the shipped one and the wall time its run length would take at the speed just measured.
Batches come from the full-difficulty part of the curriculum (2-4 objects), where most steps are.

A variant's step cost says nothing about how far it learns; the model card lists the ones that
were trained and how they fared.

Run: ``nice -n 19 .venv/bin/python benchmarks/bench_train_step.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workbench.shapes_model.build import MLP_WIDTH, build_model, build_processor
from workbench.shapes_model.losses import full_forward_losses, training_losses
from workbench.shapes_model.train import AuxiliaryHeads, BatchMaker, TrainConfig, make_optimizer, train_step

STEPS = 8
ROUNDS = 3


@dataclass(frozen=True)
class Variant:
    name: str
    config: TrainConfig = field(default_factory=TrainConfig)
    mlp_width: int = MLP_WIDTH  # the tower's and the decoder's MLPs
    attention: str = "sdpa"
    losses: Callable = training_losses


VARIANTS = (
    Variant("shipped recipe"),
    Variant("full forward (every position, all layers)", losses=full_forward_losses),
    Variant("8 images x 12 questions, 7000 steps", TrainConfig(steps=7000, batch_size=8, questions_per_image=12)),
    Variant("MLPs 256 wide (tower and decoder)", mlp_width=256),
    Variant("eager attention (the last layer's stays SDPA)", attention="eager"),
)


class Trainer:
    """A fresh model, its optimiser and a fixed list of batches for one variant."""

    def __init__(self, variant: Variant, processor):
        self.variant = variant
        self.model = build_model(processor, attention=variant.attention, mlp_width=variant.mlp_width).train()
        self.heads = AuxiliaryHeads(self.model.config.text_config.hidden_size, variant.config.aux_targets)
        self.optimizer = make_optimizer(self.model, self.heads, variant.config)
        maker = BatchMaker(processor, variant.config)
        start = variant.config.up_to_two_objects_until
        started = time.perf_counter()
        self.batches = [maker.make(start + i, variant.config.batch_size, [0, start + i],
                                   variant.config.questions_per_image) for i in range(STEPS)]
        self.seconds_per_batch = (time.perf_counter() - started) / STEPS  # made on the fly in a real run

    def seconds_per_step(self) -> float:
        started = time.perf_counter()
        for batch in self.batches:
            train_step(self.model, self.heads, self.optimizer, batch, self.variant.config.aux_weight,
                       self.variant.losses)
        return (time.perf_counter() - started) / len(self.batches)


def main() -> None:
    torch.set_num_threads(TrainConfig().threads)
    processor = build_processor()
    trainers = [Trainer(v, processor) for v in VARIANTS]
    for trainer in trainers:  # warm-up: allocator and kernel selection
        trainer.seconds_per_step()
    times: dict[str, list[float]] = {t.variant.name: [] for t in trainers}
    for _ in range(ROUNDS):
        for trainer in trainers:
            times[trainer.variant.name].append(trainer.seconds_per_step())
    shipped = statistics.median(times[VARIANTS[0].name])
    print(f"{torch.get_num_threads()} threads; median of {ROUNDS} rounds of {STEPS} steps each, taken in turns")
    print("s/step: one optimiser step; run: its steps plus making their batches (evaluations left out)")
    print(f"{'variant':<44} {'s/step':>7} {'ratio':>6} {'run':>9}")
    for trainer in trainers:
        per_step = statistics.median(times[trainer.variant.name])
        minutes = (per_step + trainer.seconds_per_batch) * trainer.variant.config.steps / 60
        print(f"{trainer.variant.name:<44} {per_step:7.3f} {per_step / shipped:6.2f} {minutes:6.1f} min")


if __name__ == "__main__":
    main()
