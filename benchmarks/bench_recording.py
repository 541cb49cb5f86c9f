"""Cost of a recording next to a plain SDPA forward and an eager ``output_attentions=True`` one.

The model is LLaVA-1.5-shaped where it matters: a Llama decoder with hidden 4096, 32 heads,
intermediate 11008, fed 576 visual tokens (a 336 px CLIP grid of 14 px patches) and ~50 text
tokens, cut to 2 layers so it fits a CPU; the vision tower is a 1-layer, 64-wide CLIP (its cost is
not the question here). Weights are random: cost does not depend on them.

The recording asks for every signal one traced forward records (attention with and without
RoPE, masses, Kobayashi norms, rollout, the contribution graph, FlowCut, sinks, transitions) on
every row kind but visual->visual (opt-in: it stores [N, N] per signal and layer); a second line
adds the visual rows. Saliency is left out: the gradients need a backward pass and occlusion one
forward per batch of occluded groups, by design.

Printed, in one run:
* time(recording) / time(plain SDPA forward): medians of 5 runs after a warm-up, in this process
  (default allocator settings); the workloads take turns in each round, so a drift in the
  machine's speed reaches all of them alike. Beside it, the same ratio in CPU seconds of this
  process (the least of the rounds): on a machine shared with other work, wall time measures the
  others too, and a recording's many small kernels suffer from it far more than a forward's few
  large ones; with ``--threads 1`` CPU time is the work done, whatever else runs.
* peak memory of the recording vs the eager forward (its returned attentions kept alive): peak
  resident memory above the resident set before the run, and the part of it above the plain
  forward's own peak (what each adds to running the model).

How memory is measured (in a child process, so the timing is not disturbed): each workload runs
after ``gc`` and ``malloc_trim``; the kernel's high-water mark of resident memory is reset
(``/proc/self/clear_refs`` <- 5) and read back (``VmHWM`` in ``/proc/self/status``) after the run.
glibc's mmap threshold is pinned low (``MALLOC_MMAP_THRESHOLD_=65536``) so freed tensors go back to
the kernel and the resident set follows live memory. tracemalloc cannot be used: it sees Python's
allocations only, not torch's tensor buffers.

Run: ``nice -n 19 .venv/bin/python benchmarks/bench_recording.py [--threads N]`` (a few minutes on
2 cores; default: a thread per core).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from workbench.recorder import record
from workbench.recording import SINGLE_FORWARD_SIGNALS, CaptureRequest

from llava_shaped import build  # benchmarks/, next to this script

REQUESTS = {
    "record (all single-forward signals)": CaptureRequest(signals=SINGLE_FORWARD_SIGNALS,
                                                          rows=("last", "text", "cls", "mean")),
    "  same, plus visual->visual rows": CaptureRequest(signals=SINGLE_FORWARD_SIGNALS,
                                                       rows=("last", "text", "cls", "mean", "visual")),
}
PLAIN, EAGER = "plain SDPA forward", "eager, output_attentions=True"
ROUNDS = 5


def workloads(adapter, prepared) -> dict:
    # The first recording instruments the model's modules for good, so the plain and eager forwards
    # run on a copy made before it: the workloads can then take turns.
    model = copy.deepcopy(adapter.model)
    model.set_attn_implementation("sdpa")  # the plain kernel, without the workbench's listener

    def plain():
        with torch.no_grad():
            return model(**prepared.inputs, use_cache=False)  # as the recording runs it

    def eager():  # the same weights, switched to eager attention for this run only
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                return model(**prepared.inputs, output_attentions=True, use_cache=False)
        finally:
            model.set_attn_implementation("sdpa")

    runs = {PLAIN: plain}
    for name, request in REQUESTS.items():
        runs[name] = lambda request=request: record(adapter, prepared, request, memory_limit=None)
    runs[EAGER] = eager
    return runs


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_bytes(run) -> int:
    """Peak resident bytes above the resident set before ``run()``."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    result = run()
    peak = _status("VmHWM")
    del result
    return peak - before


def seconds(run) -> tuple[float, float]:
    """Wall and CPU seconds of ``run()`` (CPU: every thread of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu


def memory_phase() -> None:
    adapter, prepared = build()
    out = {}
    for name, run in workloads(adapter, prepared).items():
        peak_bytes(run)  # warm-up
        out[name] = max(peak_bytes(run) for _ in range(2))
    print(json.dumps(out))


def main() -> None:
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else os.cpu_count() or 1
    torch.set_num_threads(threads)
    adapter, prepared = build()
    length, visual = prepared.inputs["input_ids"].shape[1], prepared.layout.n_tokens
    print(f"{adapter.name}: {length} tokens ({visual} visual, {length - visual} text), hidden 4096, 32 heads, "
          f"2 decoder layers; {torch.get_num_threads()} threads")
    runs = workloads(adapter, prepared)
    for run in runs.values():
        seconds(run)  # warm-up
    rounds = [{name: seconds(run) for name, run in runs.items()} for _ in range(ROUNDS)]
    times = {name: statistics.median(r[name][0] for r in rounds) for name in runs}
    cpu = {name: min(r[name][1] for r in rounds) for name in runs}
    stored = {name: sum(t.numel() * t.element_size() for t in record(adapter, prepared, request).tensors.values())
              for name, request in REQUESTS.items()}
    del adapter
    gc.collect()
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    child = subprocess.run([sys.executable, __file__, "--memory"], env=env, capture_output=True, text=True, check=True)
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    eager_attentions = 2 * 32 * length * length * 4
    for name in times:
        extra = f"  stored {stored[name] / 2**20:5.1f} MiB" if name in stored else ""
        if name == EAGER:
            extra = f"  returned attentions {eager_attentions / 2**20:5.1f} MiB"
        print(f"  {name:40s} {times[name]:6.2f} s ({cpu[name]:6.2f} s CPU)   peak +{peaks[name] / 2**20:7.1f} MiB{extra}")
    for name in REQUESTS:
        over_plain = peaks[name] - peaks[PLAIN]
        print(f"{name.strip()}:")
        print(f"  time   recording / plain forward:                    {times[name] / times[PLAIN]:5.2f}x wall, "
              f"{cpu[name] / cpu[PLAIN]:5.2f}x CPU  (target <= 1.2x)")
        print(f"  memory eager / recording, peak above start:          {peaks[EAGER] / peaks[name]:5.2f}x")
        if over_plain > 2**20:
            print(f"  memory eager / recording, peak above plain forward:  "
                  f"{(peaks[EAGER] - peaks[PLAIN]) / over_plain:5.2f}x  (target >= 10x)")
        else:
            print(f"  memory above the plain forward's peak: eager +{(peaks[EAGER] - peaks[PLAIN]) / 2**20:.1f} MiB, "
                  f"recording {over_plain / 2**20:+.1f} MiB (within 1 MiB of nothing; target >= 10x less)")


if __name__ == "__main__":
    memory_phase() if "--memory" in sys.argv else main()
