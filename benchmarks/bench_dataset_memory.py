"""Peak memory of a sweep's pass over a stored benchmark split: 9,000 synthetic POPE rows against 100,
side by side in one run.

Each size is written as parquet shards in POPE's stored form (lmms-eval's columns, PNG bytes in an
Image column) and read in a fresh interpreter, which then does per sample what the sweep does
before the model: the data set is read (``read_dataset``, memory-mapped through ``datasets``) and
fingerprinted, and each sample is turned into its task row and back and its image decoded and
dropped. The child's peak own (anonymous) memory and its peak resident set are printed for both
sizes and as ratios; flat memory is a ratio near 1 while the rows grow 90 times (the resident set
also counts the pages of the memory-mapped table that were read, which the system can reclaim). For reference the size of the images, had
they all been decoded at once, is printed beside it.

    .venv/bin/python benchmarks/bench_dataset_memory.py [--rows 9000] [--small 100] [--size 96]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys
from pathlib import Path
from workbench.samples import read_dataset, sample_from_row, sample_to_row
from workbench.sweep_identity import dataset_fingerprint

def anonymous_kib():  # the process's own memory; pages of memory-mapped files are not in it
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

path = Path(sys.argv[1])
samples = read_dataset(path)
peak = anonymous_kib()
dataset_fingerprint(path)
peak = max(peak, anonymous_kib())
root = path
pixels = 0
for i, sample in enumerate(samples):
    again = sample_from_row(sample_to_row(sample, root), root, "task")
    image = again.load_image()
    pixels += image.size[0] * image.size[1]
    del image
    if i % 50 == 0:
        peak = max(peak, anonymous_kib())
peak = max(peak, anonymous_kib())
print(json.dumps({"samples": len(samples), "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "anon_kib": peak, "decoded_bytes": pixels * 3}))
"""


def write_pope(folder: Path, rows: int, size: int, shard_rows: int = 1000) -> Path:
    """``rows`` POPE-shaped rows of random-noise PNGs, in shards of ``shard_rows``."""
    import datasets
    from PIL import Image

    features = datasets.Features({"id": datasets.Value("string"), "question_id": datasets.Value("string"),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "image_source": datasets.Value("string"), "image": datasets.Image(),
                                  "category": datasets.Value("string")})
    rng = np.random.default_rng(0)
    out = folder / f"pope-{rows}" / "data"
    out.mkdir(parents=True)
    for start in range(0, rows, shard_rows):
        batch = []
        for i in range(start, min(rows, start + shard_rows)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
            batch.append({"id": str(i), "question_id": str(i), "question": "Is there a dog in the image?",
                          "answer": "yes" if i % 2 else "no", "image_source": f"COCO_val2014_{i:012d}",
                          "image": {"bytes": buffer.getvalue(), "path": None},
                          "category": ("random", "popular", "adversarial")[i % 3]})
        datasets.Dataset.from_list(batch, features=features).to_parquet(str(out / f"test-{start // shard_rows:05d}.parquet"))
    return out.parent


def measure(path: Path, cache: Path) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path)], cwd=REPO, env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=9000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    args = parser.parse_args()
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {}
        for rows in (args.small, args.rows):
            path = write_pope(tmp, rows, args.size)
            on_disk = sum(p.stat().st_size for p in path.rglob("*.parquet"))
            results[rows] = measure(path, tmp / "cache") | {"parquet_mib": on_disk / 2**20}
    small, large = results[args.small], results[args.rows]
    print(f"sweep data path over POPE parquet shards ({args.size}x{args.size} PNG images):")
    print(f"{'rows':>8} {'parquet MiB':>12} {'all images decoded MiB':>23} {'peak own memory MiB':>20} "
          f"{'peak RSS MiB':>13}")
    for rows, r in results.items():
        print(f"{rows:>8} {r['parquet_mib']:>12.1f} {r['decoded_bytes'] / 2**20:>23.1f} {r['anon_kib'] / 1024:>20.1f} "
              f"{r['peak_kib'] / 1024:>13.1f}")
    print(f"rows x{args.rows / args.small:.0f}: peak own (anonymous) memory x{large['anon_kib'] / small['anon_kib']:.2f}, "
          f"peak RSS x{large['peak_kib'] / small['peak_kib']:.2f} (RSS counts the pages of the memory-mapped "
          "table that were read; the system reclaims them)")


if __name__ == "__main__":
    main()
