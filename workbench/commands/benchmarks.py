"""``workbench benchmarks``: the benchmarks a stored data set can be read as, with their columns,
prompts, scorers and metrics."""

from __future__ import annotations

import argparse

from workbench.subcommands import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="only these benchmarks (default: all)")


@command("benchmarks", "list the benchmarks --dataset can be read as (POPE, GQA, TextVQA, ...): the columns of "
                       "their stored form, the reference prompt, the scorer and the official metric", _arguments)
def run(args):
    from workbench.benchmarks import BENCHMARKS, check_benchmark_name
    from workbench.scoring import scorer

    for name in args.names or list(BENCHMARKS):
        b = check_benchmark_name(name)
        print(f"{b.name}: {b.title}")
        print("  stored columns: " + " or ".join("{" + ", ".join(sorted(s)) + "}" for s in b.signatures)
              + f", images in {b.image_column!r}")
        print(f"  prompt:  {b.prompt}")
        print(f"  scorer:  {b.scorer} ({scorer(b.scorer).protocol})")
        print(f"  metric:  {b.metric}")
        print(f"  source:  {b.reference}")
