"""Sweep throughput with ``--batch-size 16`` against one sample at a time, on the shipped model.

Sixteen evaluation samples (three scenes: six questions each), their questions made of different
lengths (so every batch is padded), go through the sweep's unit of work
(``workbench.sweep.run_tasks``: recording, the unpruned run, the two controls, then each method at
each budget) with a pre-LLM, an in-LLM and a callback
method (uniform_grid, fastv, pyramiddrop) at two budgets: once as 16 batches of one sample, once
as one batch of 16. Both take turns in each round (after a warm-up on two samples), so a drift in
the machine's speed reaches both alike. Printed: the least seconds per sample of each over the
rounds (a slower round measures whatever else the machine did) and their ratio
(the goal is >= 3x at batch 16), and the same ratio for the executor alone (the 16 pruned runs of
one method at one budget as one ``execute_batch`` against 16 ``execute`` calls), which leaves out
the sample's preparation: reading the image and the recording (one forward for the batch's
samples, which also makes their decoder inputs and is their unpruned prefill), and the vision
tower on the blank-image controls, one pass for the batch. Last, the ceiling of batching on the
device: the model's own forward on the 16 inputs, one at a time against stacked.

Run: ``nice -n 19 .venv/bin/python benchmarks/bench_batching.py`` (under a minute on 2 idle CPU cores).
On a GPU: ``.venv/bin/python benchmarks/bench_batching.py --device cuda`` (absolute times are
printed too; the ratio is the number to read).
"""

from __future__ import annotations

import dataclasses
import gc
import tempfile
from pathlib import Path

import sys

import torch

from workbench.models.loading import load
from workbench.pipeline import prepare_sample
from workbench.pruning.executor import Job, execute, execute_batch
from workbench.pruning.method import SelectionContext
from workbench.pruning.registry import create_method
from workbench.recorder import batch_inputs
from workbench.samples import read_dataset, sample_to_row
from workbench.sweep import MethodSpec, SweepTask, run_tasks

from llava_shaped import clocks, parse_target, run_main  # benchmarks/, next to this script

SAMPLES, BATCH, ROUNDS = 16, 16, 5
METHODS = ("uniform_grid", "fastv", "pyramiddrop")
BUDGETS = (0.33, 0.11)


def tasks(root: Path) -> list[SweepTask]:
    samples = [dataclasses.replace(s, question=s.question + " ?" * (i % 5))
               for i, s in enumerate(read_dataset("data/eval/samples.jsonl", limit=SAMPLES))]
    specs = tuple(MethodSpec(name) for name in METHODS)
    return [SweepTask(sample_to_row(s, root), str(root), specs, BUDGETS) for s in samples]


def timed(fn, device) -> tuple[float, float]:
    """Wall and CPU seconds of ``fn()``."""
    wall, cpu = clocks(device)
    fn()
    after_wall, after_cpu = clocks(device)
    return after_wall - wall, after_cpu - cpu


def main() -> None:
    target = parse_target(sys.argv[1:])
    if target.on_cpu:
        torch.set_num_threads(2)
    adapter = load(device=str(target.device), dtype=target.dtype)
    work = tasks(Path(tempfile.gettempdir()))
    # The executor alone: one in-LLM method's plans on the 16 prepared samples.
    method = create_method("fastv")
    readies = [prepare_sample(adapter, s, [method]) for s in read_dataset("data/eval/samples.jsonl", limit=SAMPLES)]
    jobs = []
    for ready in readies:
        context = SelectionContext(ready.prepared.layout, 0.22, ready.recording, ready.facts)
        jobs.append(Job(ready.prepared, method.select(context), method.layer_callback(context), ready.sample.answer))
    # The ceiling a batch can reach on this device: the model's own forward on the same inputs.
    prepared = [ready.prepared for ready in readies]
    stacked = batch_inputs(adapter, prepared)
    workloads = {
        "sweep, batch 1": lambda: [run_tasks(adapter, [task]) for task in work],
        f"sweep, batch {BATCH}": lambda: [run_tasks(adapter, work[i: i + BATCH]) for i in range(0, len(work), BATCH)],
        "executor, batch 1": lambda: [execute(adapter, j.prepared, j.plan, 8, j.gold_answer, j.callback) for j in jobs],
        f"executor, batch {BATCH}": lambda: execute_batch(adapter, jobs, 8),
        "model forward, batch 1": lambda: [adapter.model(**p.inputs, use_cache=False, logits_to_keep=1) for p in prepared],
        f"model forward, batch {BATCH}": lambda: adapter.model(**stacked, use_cache=False, logits_to_keep=1),
    }
    with torch.no_grad():
        run_tasks(adapter, work[:2])  # warm-up
        execute_batch(adapter, jobs[:2], 8)
        # A full collection walks every object of the imported libraries (0.3 s; a sweep meets one
        # every ~100 samples): frozen, it cannot land in one workload's few timed seconds.
        gc.collect()
        gc.freeze()
        times = {name: [] for name in workloads}
        for _ in range(ROUNDS):
            for name, fn in workloads.items():
                times[name].append(timed(fn, target.device))
    per_sample = {name: min(w for w, _ in t) / SAMPLES for name, t in times.items()}
    cpu = {name: min(c for _, c in t) / SAMPLES for name, t in times.items()}
    runs = 3 + len(METHODS) * len(BUDGETS)
    print(f"{adapter.name} on {target.device}: {SAMPLES} samples, {runs} runs each "
          f"(unpruned, 2 controls, {len(METHODS)} methods x {len(BUDGETS)} budgets); least of {ROUNDS} rounds")
    for name, seconds in per_sample.items():
        print(f"  {name:20s} {seconds * 1000:8.1f} ms per sample ({cpu[name] * 1000:.1f} ms CPU time, all threads)")
    for what in ("sweep", "executor", "model forward"):
        ratio = per_sample[f"{what}, batch 1"] / per_sample[f"{what}, batch {BATCH}"]
        print(f"{what}: batch {BATCH} is {ratio:.2f}x the throughput of batch 1 (goal >= 3x for the sweep)")


if __name__ == "__main__":
    run_main(main)
