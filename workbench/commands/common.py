"""Arguments shared by several subcommands, and how they turn into objects."""

from __future__ import annotations

import argparse

from workbench.models.loading import SHIPPED_MODEL

DEFAULT_DATASET = "data/eval/samples.jsonl"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=SHIPPED_MODEL,
                        help=f"hub name or local checkpoint folder (default: the shipped {SHIPPED_MODEL})")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights and activations (default: auto, the checkpoint's); attention stays on SDPA")
    parser.add_argument("--device-map", default=None, metavar="auto|DEV,DEV,...",
                        help="split a model too large for one device over several: 'auto' (every visible GPU) "
                             "or a list such as cuda:0,cuda:1; replaces --device (default: none)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let transformers fetch a checkpoint that is not available locally (default: offline)")


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help="JSONL file, parquet file or folder of shards, save_to_disk folder, or COCO-style "
                             f"annotation JSON with its images (workbench/dataset_formats.py; default: {DEFAULT_DATASET})")
    parser.add_argument("--benchmark", default=None,
                        help="how to read a stored benchmark (see `workbench benchmarks`; default: inferred from "
                             "its columns)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N samples (default: all)")


def _number(text: str, parse, accept, want: str):
    """``parse(text)`` when ``accept`` holds for it, else argparse's one-line error naming what is wanted."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "a positive number")


def load_adapter(args: argparse.Namespace):
    from workbench.models.loading import load

    return load(args.model, device=args.device, allow_download=args.allow_download, dtype=getattr(args, "dtype", None),
                device_map=getattr(args, "device_map", None))


def load_adapter_with_message(args):
    print(f"loading {args.model} ...", flush=True)
    return load_adapter(args)
