"""A sweep's cost per sample in units of one unpruned forward: reusing the unpruned prefill's
layers (each run starts at the first layer it prunes before) against running every (method,
budget) as its own full evaluation, as other toolkits do.

On the shipped model, for each of 4 evaluation samples and M methods x 3 budgets:
* reuse (the workbench's sweep): the sample is prepared once (image, vision tower, one recording
  of the signals every method reads, whose forward is the unpruned prefill), the unpruned run
  takes that prefill over, then each method at each budget runs on it, starting at its first
  pruned layer.
* separate evaluations: each (method, budget) prepares the sample itself (its own vision tower
  pass and recording, so its own unpruned forward) and runs on that; the unpruned reference is one
  more. This is the least any toolkit that runs each (method, budget) as its own evaluation pays:
  one forward each, up to the first pruned layer at least.
Two measures, both per sample, in units of one unpruned forward:
* decoder work: rows the decoder layers processed in prefills (a layer on S rows counts S), over
  the unpruned prefill's rows x layers; re-running a layer up to its attention to read it (a
  method's ``LayerState``) and decode steps are left out. Exact, machine-independent.
* wall time: over the time of one unpruned pipeline run (prefill and answer) on the same sample,
  measured just before (median over the samples).
Twice: for in-LLM methods only (where reuse applies) and with pre-LLM methods added (which prune
before layer 0 and gain nothing). The two ways take turns per sample.

Run: ``nice -n 19 .venv/bin/python benchmarks/bench_sweep_cost.py`` (a few minutes on 2 CPU cores).
On a GPU: add ``--device cuda``.
"""

from __future__ import annotations

import statistics

import sys

import torch

from workbench import pipeline
from workbench.models.loading import load
from workbench.pruning.layer_state import hooks_suspended
from workbench.pruning.registry import create_method
from workbench.samples import read_dataset

from llava_shaped import clocks, parse_target, run_main  # benchmarks/, next to this script

SAMPLES = 4
BUDGETS = (0.33, 0.22, 0.11)
IN_LLM = ("fastv", "pyramiddrop", "sparsevlm", "dart")
PRE_LLM = ("divprune", "uniform_grid")


class RowCounter:
    """Rows processed by every decoder layer's prefill calls."""

    def __init__(self, adapter):
        self.rows = 0
        for layer in adapter.decoder_layers():
            layer.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] > 1 and not hooks_suspended.get():
            self.rows += hidden.shape[0] * hidden.shape[1]


def reuse(adapter, sample, methods):
    ready = pipeline.prepare_sample(adapter, sample, methods)
    pipeline.run(adapter, ready, None)
    for method in methods:
        for budget in BUDGETS:
            pipeline.run(adapter, ready, method, budget)


def separate(adapter, sample, methods):
    pipeline.run(adapter, pipeline.prepare_sample(adapter, sample), None)
    for method in methods:
        for budget in BUDGETS:
            pipeline.run(adapter, pipeline.prepare_sample(adapter, sample, [method]), method, budget)


def measure(adapter, counter, fn, *args) -> tuple[float, int]:
    counter.rows = 0
    started, _ = clocks(adapter.device)
    fn(adapter, *args)
    return clocks(adapter.device)[0] - started, counter.rows


def main() -> None:
    target = parse_target(sys.argv[1:])
    if target.on_cpu:
        torch.set_num_threads(2)
    adapter = load(device=str(target.device), dtype=target.dtype)
    counter = RowCounter(adapter)
    samples = read_dataset("data/eval/samples.jsonl", limit=SAMPLES)
    depth = len(adapter.decoder_layers())
    with torch.no_grad():
        unit_rows = depth * pipeline.prepare_sample(adapter, samples[0]).prepared.layout.sequence_length
        print(f"{adapter.name} on {target.device}: {SAMPLES} samples x {len(BUDGETS)} budgets; one unpruned forward: "
              f"{depth} layers x {unit_rows // depth} rows")
        for title, names in (("in-LLM methods", IN_LLM), ("in-LLM and pre-LLM methods", IN_LLM + PRE_LLM)):
            methods = [create_method(name) for name in names]
            units = {"reuse": ([], []), "separate": ([], [])}  # per sample: (decoder work, wall time)
            reuse(adapter, samples[0], methods)  # warm-up
            for sample in samples:
                # The unit, measured beside the two ways on the same sample.
                ready = pipeline.prepare_sample(adapter, sample)
                unit_time, unit_row = measure(adapter, counter, lambda a, r: pipeline.run(a, r, None), ready)
                for name, fn in (("reuse", reuse), ("separate", separate)):
                    seconds, rows = measure(adapter, counter, fn, sample, methods)
                    units[name][0].append(rows / unit_row)
                    units[name][1].append(seconds / unit_time)
            runs = 1 + len(methods) * len(BUDGETS)
            print(f"{title} ({', '.join(names)}): {runs} runs per sample (unpruned + {len(methods)} x {len(BUDGETS)})")
            means = {name: (statistics.mean(work), statistics.median(wall)) for name, (work, wall) in units.items()}
            for name, (work, wall) in means.items():
                print(f"  {name:9s} decoder work {work:6.2f}  wall time {wall:6.2f}  (unpruned forwards per sample)")
            print(f"  separate / reuse: decoder work {means['separate'][0] / means['reuse'][0]:.2f}x, "
                  f"wall time {means['separate'][1] / means['reuse'][1]:.2f}x")

if __name__ == "__main__":
    run_main(main)
