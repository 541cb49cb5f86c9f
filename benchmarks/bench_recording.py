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
* time(recording) / time(plain SDPA forward): medians of 5 runs after a warm-up, in this process,
  each timed between device synchronisations
  (default allocator settings); the workloads take turns in each round, so a drift in the
  machine's speed reaches all of them alike. Beside it, the same ratio in CPU seconds of this
  process (the least of the rounds): on a machine shared with other work, wall time measures the
  others too, and a recording's many small kernels suffer from it far more than a forward's few
  large ones; with ``--threads 1`` CPU time is the work done, whatever else runs. CPU seconds are
  printed on the CPU only (on an accelerator they count the host's waiting); there, absolute
  milliseconds instead.
* peak memory of the recording vs the eager forward (its returned attentions kept alive): peak
  resident memory above the resident set before the run, and the part of it above the plain
  forward's own peak (what each adds to running the model).

How memory is measured (in a child process, so the timing is not disturbed): each workload runs
after ``gc`` and ``malloc_trim``; the kernel's high-water mark of resident memory is reset
(``/proc/self/clear_refs`` <- 5) and read back (``VmHWM`` in ``/proc/self/status``) after the run.
glibc's mmap threshold is pinned low (``MALLOC_MMAP_THRESHOLD_=65536``) so freed tensors go back to
the kernel and the resident set follows live memory. tracemalloc cannot be used: it sees Python's
allocations only, not torch's tensor buffers. On a CUDA device the peak is the allocator's
(``torch.cuda.max_memory_allocated``) above what was allocated before the run.

Run: ``nice -n 19 .venv/bin/python benchmarks/bench_recording.py [--threads N]`` (a few minutes on
2 cores; default: a thread per core). On a GPU, for absolute times: ``--device cuda --dtype bfloat16``
(``--device`` default cpu; ``--dtype`` float32 default, bfloat16 or float16).
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

import torch

from workbench.recorder import record
from workbench.recording import SINGLE_FORWARD_SIGNALS, CaptureRequest

from llava_shaped import build, clocks, parse_target, run_main, synchronize  # benchmarks/, next to this script

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


def cuda_peak_bytes(run, device) -> int:
    """Peak bytes the CUDA allocator held during ``run()`` above what it held before."""
    gc.collect()
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = run()
    synchronize(device)
    del result
    return torch.cuda.max_memory_allocated(device) - before


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


def seconds(run, device) -> tuple[float, float]:
    """Wall and CPU seconds of ``run()`` (CPU: every thread of this process), ``device`` synchronised."""
    start, cpu = clocks(device)
    run()
    end, cpu_end = clocks(device)
    return end - start, cpu_end - cpu


def memory_phase() -> None:
    target = parse_target(sys.argv)
    adapter, prepared = build(target=target)
    peak = ((lambda run: cuda_peak_bytes(run, target.device)) if target.device.type == "cuda" else peak_bytes)
    out = {}
    for name, run in workloads(adapter, prepared).items():
        peak(run)  # warm-up
        out[name] = max(peak(run) for _ in range(2))
    print(json.dumps(out))


def main() -> None:
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else os.cpu_count() or 1
    target = parse_target(sys.argv)
    torch.set_num_threads(threads)
    adapter, prepared = build(target=target)
    length, visual = prepared.inputs["input_ids"].shape[1], prepared.layout.n_tokens
    print(f"{adapter.name}: {length} tokens ({visual} visual, {length - visual} text), hidden 4096, 32 heads, "
          f"2 decoder layers; {target.describe()}; {torch.get_num_threads()} threads")
    runs = workloads(adapter, prepared)
    for run in runs.values():
        seconds(run, target.device)  # warm-up
    rounds = [{name: seconds(run, target.device) for name, run in runs.items()} for _ in range(ROUNDS)]
    times = {name: statistics.median(r[name][0] for r in rounds) for name in runs}
    cpu = {name: min(r[name][1] for r in rounds) for name in runs}
    stored = {name: sum(t.numel() * t.element_size() for t in record(adapter, prepared, request).tensors.values())
              for name, request in REQUESTS.items()}
    del adapter, runs
    gc.collect()
    if target.device.type == "cuda":
        torch.cuda.empty_cache()  # the child measures on the same device
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    child = subprocess.run([sys.executable, __file__, "--memory", *sys.argv[1:]], env=env, capture_output=True,
                           text=True, check=True)
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    eager_attentions = 2 * 32 * length * length * target.dtype.itemsize
    for name in times:
        extra = f"  stored {stored[name] / 2**20:5.1f} MiB" if name in stored else ""
        if name == EAGER:
            extra = f"  returned attentions {eager_attentions / 2**20:5.1f} MiB"
        took = f"{times[name]:6.2f} s ({cpu[name]:6.2f} s CPU)" if target.on_cpu else f"{times[name] * 1000:8.2f} ms"
        print(f"  {name:40s} {took}   peak +{peaks[name] / 2**20:7.1f} MiB{extra}")
    for name in REQUESTS:
        over_plain = peaks[name] - peaks[PLAIN]
        cpu_ratio = f", {cpu[name] / cpu[PLAIN]:5.2f}x CPU" if target.on_cpu else ""
        print(f"{name.strip()}:")
        print(f"  time   recording / plain forward:                    {times[name] / times[PLAIN]:5.2f}x wall"
              f"{cpu_ratio}  (target <= 1.2x)")
        print(f"  memory eager / recording, peak above start:          {peaks[EAGER] / peaks[name]:5.2f}x")
        if over_plain > 2**20:
            print(f"  memory eager / recording, peak above plain forward:  "
                  f"{(peaks[EAGER] - peaks[PLAIN]) / over_plain:5.2f}x  (target >= 10x)")
        else:
            print(f"  memory above the plain forward's peak: eager +{(peaks[EAGER] - peaks[PLAIN]) / 2**20:.1f} MiB, "
                  f"recording {over_plain / 2**20:+.1f} MiB (within 1 MiB of nothing; target >= 10x less)")


if __name__ == "__main__":
    run_main(memory_phase if "--memory" in sys.argv else main)
