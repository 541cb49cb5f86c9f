"""What pruning saves: pruned prefill time over full prefill time, beside the FLOP ratio.

On the LLaVA-1.5-shaped model (``llava_shaped.py``: hidden 4096, 32 heads, MLP 11008, 576 visual
tokens + the prompt's text), the decoder prefill is timed under the executor with every visual
token (a plan with no stage) and with 64 of 576 kept before the LLM (the uniform-grid baseline:
which tokens survive does not change the cost). Only the decoder stack's forward is timed (forward
hooks on it), so the vision tower and the embedding merge, the same in both runs, stay out.
Printed: median seconds of each (5 runs after a warm-up, interleaved), their ratio, the FLOP
ratio from ``workbench.pruning.flops`` and the time ratio over the FLOP ratio (target <= 1.2);
beside it the same in CPU seconds of this process (the least of the runs), the measure to read on
a machine shared with other work with ``--threads 1`` (printed on the CPU only: on an accelerator
they count the host's waiting). Every clock is read after synchronising the device. Nearly all of a pruned prefill is the
decoder's matrix products (``torch.profiler``: ``aten::mm`` 97-98 % of it); what it costs beyond
the FLOP ratio is their lower efficiency at ~110 rows (each product still reads and packs every
weight), not work of the executor's.

Run: ``nice -n 19 .venv/bin/python benchmarks/bench_prefill.py [--threads N]`` (about a minute on
2 cores; default 2 threads). On a GPU, for absolute times: ``--device cuda --dtype bfloat16``
(``--device`` default cpu; ``--dtype`` float32 default, bfloat16 or float16).
"""

from __future__ import annotations

import statistics
import sys

import torch

from workbench.pruning.baselines import UniformGrid
from workbench.pruning.executor import execute
from workbench.pruning.flops import DecoderShape, prefill_flops
from workbench.pruning.method import SelectionContext
from workbench.pruning.plan import KeepPlan

from llava_shaped import build, clocks, parse_target, run_main  # benchmarks/, next to this script

KEPT = 64
RUNS = 5


def timed_prefill(adapter, prepared, plan) -> tuple[tuple[float, float], tuple[int, ...]]:
    """Wall and CPU seconds the decoder stack's prefill took, and the tokens each layer processed."""
    stack, starts, ends, device = adapter.language_model(), [], [], adapter.device
    handles = [stack.register_forward_pre_hook(lambda *_: starts.append(clocks(device))),
               stack.register_forward_hook(lambda *_: ends.append(clocks(device)))]
    try:
        execution = execute(adapter, prepared, plan, max_new_tokens=1)
    finally:
        for handle in handles:
            handle.remove()
    # The first completed call is the prefill (reading the decoder's inputs enters the stack too,
    # but stops before running it, so it never completes).
    prefill_end = ends[0]
    start = max((t for t in starts if t[0] < prefill_end[0]), key=lambda t: t[0])
    return (prefill_end[0] - start[0], prefill_end[1] - start[1]), execution.tokens_per_layer


def main() -> None:
    target = parse_target(sys.argv)
    torch.set_num_threads(int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2)
    adapter, prepared = build(layers=2, target=target)
    n = prepared.layout.n_tokens
    plans = {"full": KeepPlan.keep_all(n, where=None),
             "pruned": UniformGrid().select(SelectionContext(prepared.layout, KEPT))}
    shape = DecoderShape.of(adapter.language_model().config)
    times = {name: [] for name in plans}
    tokens = {}
    with torch.no_grad():
        for name, plan in plans.items():
            timed_prefill(adapter, prepared, plan)  # warm-up
        for _ in range(RUNS):
            for name, plan in plans.items():
                seconds, tokens[name] = timed_prefill(adapter, prepared, plan)
                times[name].append(seconds)
    full, pruned = (statistics.median(t for t, _ in times[k]) for k in ("full", "pruned"))
    full_cpu, pruned_cpu = (min(c for _, c in times[k]) for k in ("full", "pruned"))
    flop_ratio = prefill_flops(shape, tokens["pruned"]) / prefill_flops(shape, tokens["full"])
    time_ratio = pruned / full
    print(f"{adapter.name}: {n} visual tokens, sequence {tokens['full'][0]} -> {tokens['pruned'][0]} tokens "
          f"({KEPT} visual kept); {target.describe()}")
    if not target.on_cpu:
        print(f"full prefill   {full * 1000:8.2f} ms (median of {RUNS})")
        print(f"pruned prefill {pruned * 1000:8.2f} ms")
        print(f"time ratio {time_ratio:.3f}  FLOP ratio {flop_ratio:.3f}  "
              f"time/FLOP ratio {time_ratio / flop_ratio:.2f}x wall (target <= 1.2x)")
        return
    print(f"full prefill   {full * 1000:8.1f} ms (median of {RUNS}; {full_cpu * 1000:8.1f} ms CPU, least)")
    print(f"pruned prefill {pruned * 1000:8.1f} ms{'':16}({pruned_cpu * 1000:8.1f} ms CPU)")
    cpu_ratio = pruned_cpu / full_cpu
    print(f"time ratio {time_ratio:.3f}  FLOP ratio {flop_ratio:.3f}  time/FLOP ratio {time_ratio / flop_ratio:.2f}x wall, "
          f"{cpu_ratio / flop_ratio:.2f}x CPU (target <= 1.2x; {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    run_main(main)
