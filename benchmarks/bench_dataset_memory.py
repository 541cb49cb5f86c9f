"""Peak memory of a real ``workbench sweep`` over a stored POPE split: 9,000 synthetic rows against
100, side by side in one run.

Each size is written as parquet shards in lmms-eval's stored form of POPE (lmms-lab/POPE's columns,
PNG bytes in an Image column, 1,000 rows a shard; 96 px noise images) and swept by the
``workbench sweep`` command, one cheap method at one budget (``random`` at 0.33) and
``--batch-size 16``, each in a fresh interpreter, so that a peak is that sweep's alone. The child
reports its own peaks:

- peak own (anonymous) memory: ``RssAnon`` of ``/proc/self/status``, sampled every 20 ms by a
  thread and once more at exit: the memory the process holds, without the pages of the
  memory-mapped table it has read;
- peak resident set: ``VmHWM`` of ``/proc/self/status`` at exit, the kernel's high-water mark of
  that process alone. It also counts the table's file pages that were read (up to the whole split;
  the system can reclaim them). The child's rusage would not do: ``ru_maxrss`` from ``os.wait4``
  is the largest of the child and every descendant it waited for (the parquet converter
  ``workbench.dataset_formats`` runs apart included), and ``RUSAGE_CHILDREN`` keeps the largest
  over every child so far, so the second sweep could only report the larger of the two.

Before its sweep, each split is converted into the ``datasets`` cache by another process
(``read_dataset``), so both sweeps read the same memory-mapped form (a first sweep over a split
converts it itself; above 64 MiB of parquet in a child process). Printed per size: parquet size,
the size of all its images decoded, both peaks, rows/s of the whole command (model load included),
and the samples and rows of the sweep's table (every sample must be there with all its rows, each
"ok"); then the ratios.

The model is by default the shipped one (``--model tiny-llava`` sweeps a tiny random LLaVA,
``tests/tiny_models.py``, saved for the run; ``--model PATH`` a saved model): every sample runs
four generations of up to 8 tokens (the unpruned model, the zero-token and blank-image controls,
the method).

    nice -n 19 .venv/bin/python benchmarks/bench_dataset_memory.py [--rows 9000] [--small 100]
        [--model shipped|tiny-llava|PATH] [--method random] [--budget 0.33] [--batch-size 16]
        [--max-new-tokens N] [--size 96]

It takes about 8 minutes on 2 idle cores, nearly all of it the 9,000-row sweep.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Runs ``workbench sweep`` (argv[2:]) in this process and writes its peaks to argv[1].
CHILD = """
import json, sys, threading, time

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])

peak = [status("RssAnon:")]

def watch():
    while True:
        peak[0] = max(peak[0], status("RssAnon:"))
        time.sleep(0.02)

threading.Thread(target=watch, daemon=True).start()
from workbench.cli import main
code = main(sys.argv[2:])
peak[0] = max(peak[0], status("RssAnon:"))
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "anon_kib": peak[0], "hwm_kib": status("VmHWM:")}, f)
sys.exit(code)
"""

TINY = "tiny-llava"
WARM = "import sys; from workbench.samples import read_dataset; print(len(read_dataset(sys.argv[1])))"


def write_pope(folder: Path, rows: int, size: int, shard_rows: int = 1000) -> Path:
    """``rows`` POPE rows (lmms-lab/POPE's columns) with random-noise PNGs, in shards of ``shard_rows``."""
    import datasets
    from PIL import Image

    features = datasets.Features({"id": datasets.Value("string"), "question_id": datasets.Value("string"),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image_source": datasets.Value("string"), "image": datasets.Image(),
                                  "category": datasets.Value("string")})
    rng = np.random.default_rng(0)
    out = folder / f"pope-{rows}" / "data"
    out.mkdir(parents=True)
    shards = -(-rows // shard_rows)
    for shard, start in enumerate(range(0, rows, shard_rows)):
        batch = []
        for i in range(start, min(rows, start + shard_rows)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
            batch.append({"id": str(i), "question_id": str(i), "question": "Is there a dog in the image?",
                          "answer": "yes" if i % 2 else "no", "image_source": f"COCO_val2014_{i:012d}",
                          "image": {"bytes": buffer.getvalue(), "path": None},
                          "category": ("random", "popular", "adversarial")[i % 3]})
        datasets.Dataset.from_list(batch, features=features).to_parquet(
            str(out / f"test-{shard:05d}-of-{shards:05d}.parquet"))
    return out.parent


def sweep(dataset: Path, out: Path, env: dict, args) -> dict:
    """One ``workbench sweep`` in a fresh interpreter: its peaks, wall time and table."""
    import polars as pl

    peaks = out.with_suffix(".json")
    command = [sys.executable, "-c", CHILD, str(peaks), "sweep", "--dataset", str(dataset), "--out", str(out),
               "--methods", args.method, "--budgets", args.budget, "--batch-size", str(args.batch_size)]
    command += [] if args.model == "shipped" else ["--model", args.model]
    command += [] if args.max_new_tokens is None else ["--max-new-tokens", str(args.max_new_tokens)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the sweep of {dataset} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    table = pl.read_parquet(out / "results.parquet")
    return json.loads(peaks.read_text()) | {
        "seconds": seconds, "samples": table["sample_id"].n_unique(), "table_rows": table.height,
        "ok": bool((table["status"] == "ok").all()) and table.group_by("sample_id").len()["len"].n_unique() == 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=9000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    parser.add_argument("--method", default="random", help="the one method swept (default random)")
    parser.add_argument("--budget", default="0.33", help="its one budget (default 0.33)")
    parser.add_argument("--batch-size", type=int, default=16, help="the sweep's --batch-size (default 16)")
    parser.add_argument("--model", default="shipped",
                        help=f"'shipped' (default), '{TINY}' (a tiny random LLaVA saved for the run, "
                             "tests/tiny_models.py), or any --model")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="the sweep's (default: the sweep's own, 8)")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    results, model = {}, args.model
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_DATASETS_CACHE")} | {
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "cache")}
        if args.model == TINY:
            sys.path.insert(0, str(REPO))
            from tests.tiny_models import save_tiny

            args.model = save_tiny("llava", tmp / TINY)
        for rows in (args.small, args.rows):
            path = write_pope(tmp, rows, args.size)
            subprocess.run([sys.executable, "-c", WARM, str(path)], cwd=REPO, env=env, check=True,
                           capture_output=True)
            result = sweep(path, tmp / f"sweep-{rows}", env, args)
            results[rows] = result | {"parquet_mib": sum(p.stat().st_size for p in path.rglob("*.parquet")) / 2**20,
                                      "decoded_mib": rows * args.size * args.size * 3 / 2**20}
            print(f"{rows} rows: {result['seconds']:.0f} s", file=sys.stderr, flush=True)
    small, large = results[args.small], results[args.rows]
    print(f"workbench sweep over POPE parquet shards ({args.size}x{args.size} PNG images; --methods "
          f"{args.method} --budgets {args.budget} --batch-size {args.batch_size}; model {model}, CPU):")
    print(f"{'rows':>6} {'parquet MiB':>12} {'images decoded MiB':>19} {'peak own MiB':>13} {'peak RSS MiB':>13} "
          f"{'rows/s':>7} {'samples in table':>17} {'table rows':>11}")
    for rows, r in results.items():
        print(f"{rows:>6} {r['parquet_mib']:>12.1f} {r['decoded_mib']:>19.1f} {r['anon_kib'] / 1024:>13.1f} "
              f"{r['hwm_kib'] / 1024:>13.1f} {rows / r['seconds']:>7.2f} {r['samples']:>17} {r['table_rows']:>11}")
    print(f"rows x{args.rows / args.small:.0f}: peak own (anonymous) memory x{large['anon_kib'] / small['anon_kib']:.2f}, "
          f"peak RSS x{large['hwm_kib'] / small['hwm_kib']:.2f} (RSS also counts the memory-mapped table's pages "
          "that were read; the system reclaims them)")
    lost = [rows for rows, r in results.items() if r["samples"] != rows or not r["ok"]]
    print("every sample swept, each with all its rows, every row ok" if not lost else
          f"LOST OR FAILED ROWS in the {lost}-row sweep(s)")


if __name__ == "__main__":
    main()
