"""``workbench record``: record probe signals for one image + question, or for rows of a data set."""

from __future__ import annotations

import argparse
import re

from workbench.commands.common import add_model_arguments, positive_float, positive_int
from workbench.subcommands import command

DEFAULT_DATASET = "data/eval/samples.jsonl"


def layer_list(text: str) -> tuple[int, ...] | None:
    """"all" -> None; "0,5,-1" -> those layers; "0-3" -> 0, 1, 2, 3."""
    if text == "all":
        return None
    layers: list[int] = []
    for part in text.split(","):
        span = re.fullmatch(r"\s*(\d+)-(\d+)\s*", part)
        try:
            layers.extend(range(int(span[1]), int(span[2]) + 1) if span else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"layers must be 'all' or like 0,5,-1 or 0-3, got {text!r}") from None
    return tuple(layers)


def name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def stack_list(text: str) -> tuple[str, ...]:
    """"both" is the default's name in the help; it means the two stacks."""
    return ("tower", "llm") if text.strip() == "both" else name_list(text)


def group_list(text: str) -> tuple[int, ...]:
    try:
        groups = tuple(int(part) for part in name_list(text))
    except ValueError:
        groups = ()
    if not groups or min(groups) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers like 1,2, got {text!r}")
    return groups


def _arguments(p: argparse.ArgumentParser) -> None:
    from workbench.recording import SINGLE_FORWARD_SIGNALS

    add_model_arguments(p)
    source = p.add_argument_group("what to record on (an image and a question, or a data set)")
    source.add_argument("--image", default=None, help="an image file (default: none; give --image or --dataset)")
    source.add_argument("--question", default=None, help="the question about --image (required with --image; default: none)")
    source.add_argument("--dataset", default=None,
                        help=f"JSONL data set (e.g. {DEFAULT_DATASET}; default: none, give --image or --dataset)")
    source.add_argument("--limit", type=positive_int, default=None,
                        help="only the first N samples of --dataset (default: all)")
    p.add_argument("--out", required=True,
                   help="output folder (required): the recording itself for --image, one sub-folder per sample id "
                        "for --dataset; an existing folder is replaced only if it is a recording")
    p.add_argument("--signals", type=name_list, default=SINGLE_FORWARD_SIGNALS,
                   help="comma-separated signals, or 'all' (every registered signal; default: everything one "
                        "forward records; the saliency signals grad_x_input, attention_x_gradient, occlusion "
                        "need extra passes)")
    p.add_argument("--layers", type=layer_list, default=None, help="decoder layers: all (default), 0,5,-1 or 0-3")
    p.add_argument("--tower-layers", type=layer_list, default=None,
                   help="vision-tower layers, same syntax (default all)")
    p.add_argument("--rows", type=name_list, default=("last", "cls", "mean"),
                   help="query rows: last, text, cls, visual, mean (default last,cls,mean)")
    p.add_argument("--stacks", type=stack_list, default=("tower", "llm"),
                   help="tower, llm, or both (tower,llm; default)")
    p.add_argument("--per-head", action="store_true",
                   help="keep one value per head instead of the head reduction (default: off)")
    p.add_argument("--occlusion-groups", type=group_list, default=(1,),
                   help="k of the k x k groups occlusion removes (default 1)")
    p.add_argument("--answer", default=None,
                   help="answer the saliency signals score (--image only; default: the model's own answer)")
    p.add_argument("--reference-answers", action="store_true",
                   help="with --dataset: saliency scores each sample's reference answer, not the model's "
                        "(default: off)")
    p.add_argument("--memory-limit-gib", type=positive_float, default=4.0,
                   help="refuse captures estimated above this (default 4)")


def capture_request(args):
    """The ``CaptureRequest`` the arguments ask for; "all" is every registered signal (read from
    the probes' registry, so a new signal is never silently left out)."""
    from probes.registry import available_signals
    from workbench.errors import UserError
    from workbench.recording import CaptureRequest

    signals = tuple(available_signals()) if args.signals == ("all",) else args.signals
    try:
        return CaptureRequest(signals=signals, layers=args.layers, tower_layers=args.tower_layers,
                              rows=args.rows, stacks=args.stacks, per_head=args.per_head,
                              occlusion_groups=args.occlusion_groups)
    except ValueError as e:
        raise UserError(str(e)) from None


@command("record", "record attention, flow, sink, saliency and transition signals per layer "
                   "(safetensors + parquet + manifest per sample)", _arguments)
def run(args):
    from pathlib import Path

    from tqdm import tqdm

    from workbench.commands.common import load_adapter
    from workbench.errors import UserError
    from workbench.files import check_output, child_folder
    from workbench.images import open_rgb
    from workbench.recorder import record
    from workbench.recording import check_target
    from workbench.samples import read_dataset

    # Everything the user gave is checked before the model loads, and nothing is written before.
    if (args.image is None) == (args.dataset is None):
        raise UserError("give either --image with --question, or --dataset")
    if args.image is not None and not (args.question or "").strip():
        raise UserError("--image needs a non-empty --question")
    request = capture_request(args)
    if args.image is not None:
        jobs = [(check_target(args.out), None, args.image, args.question, args.answer)]
    else:
        check_output(args.out)
        samples = read_dataset(args.dataset, args.limit)
        jobs = [(check_target(child_folder(args.out, s.id)), s, s.image_path, s.question,
                 s.answer if args.reference_answers else None) for s in samples]
    for _, sample, image_path, _, _ in jobs:  # an undecodable image is one line naming it, before any work
        sample.load_image() if sample else open_rgb(image_path)
    adapter = load_adapter(args)
    limit = int(args.memory_limit_gib * 2**30)
    for folder, sample, image_path, question, answer in tqdm(jobs, desc="recording", unit="sample"):
        prepared = adapter.prepare(sample.load_image() if sample else open_rgb(image_path), question)
        try:
            recording = record(adapter, prepared, request, sample_id=sample.id if sample else Path(image_path).stem,
                               question=question, answer=answer, memory_limit=limit)
        except ValueError as e:  # a layer out of range, an empty answer
            raise UserError(str(e)) from None
        recording.save(folder)
    print(f"wrote {len(jobs)} recording{'s' if len(jobs) != 1 else ''} to {args.out}")
