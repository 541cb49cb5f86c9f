"""``workbench sweep``: a data set x methods x budgets -> a resumable parquet table and the accuracy table."""

from __future__ import annotations

import argparse
import functools

from workbench.commands.common import add_dataset_arguments, add_model_arguments, positive_int
from workbench.errors import UserError
from workbench.subcommands import command

DEFAULT_BUDGETS = (0.33, 0.22, 0.11)


def budget_list(text: str) -> tuple:
    """"0.33,0.22,0.11" (fractions of the visual tokens) or "64,128" (token counts), or a mix; each
    checked by ``check_budget`` (counts above the model's visual tokens are refused by the sweep
    before it writes anything)."""
    from workbench.pruning.budget import check_budget

    budgets = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            budgets.append(float(part) if any(c in part for c in ".eE") else int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"budgets must be fractions like 0.33 or token counts like 64, "
                                             f"got {part!r}") from None
        try:
            check_budget(budgets[-1])
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    if not budgets:
        raise argparse.ArgumentTypeError("no budgets given")
    return tuple(budgets)


def _arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_dataset_arguments(p)
    p.add_argument("--methods", default="all",
                   help="comma-separated method names, 'all' (default), each optionally with parameters: "
                        "'fastv:rows=text' (see `workbench methods`); separate methods with ';' when giving parameters")
    p.add_argument("--budgets", type=budget_list, default=DEFAULT_BUDGETS,
                   help="fractions of the visual tokens and/or token counts (default 0.33,0.22,0.11)")
    p.add_argument("--out", default="runs/sweep", help="sweep folder; re-running into it resumes (default runs/sweep)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="longest answer generated (default 8)")
    p.add_argument("--batch-size", type=positive_int, default=1,
                   help="samples run together, each under its own plan (padded, masked per sample); "
                        "the same answers as one at a time (default 1)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the samples on Ray workers, each holding the model once (GPUs as Ray resources with "
                        "--device cuda); a new local cluster when no ADDRESS is given; needs the .[ray] extra "
                        "(default: no Ray, this process)")
    p.add_argument("--ray-workers", type=positive_int, default=None,
                   help="with --ray: how many workers (default: one per GPU with --device cuda, else one per CPU)")


def method_specs(text: str):
    from workbench.sweep import MethodSpec, all_methods

    if text.strip() == "all":
        return all_methods()
    parts = text.split(";") if ";" in text or ":" in text else text.split(",")
    return [MethodSpec.parse(part) for part in parts if part.strip()]


def _load_on(args, device: str):
    """The model as ``args`` ask for it, on ``device`` (a Ray worker's own GPU or CPU)."""
    from workbench.commands.common import load_adapter

    return load_adapter(argparse.Namespace(**(vars(args) | {"device": device})))


@command("sweep", "run every method at every budget on a data set; writes a resumable parquet table "
                  "and prints accuracy per method and budget next to the unpruned model", _arguments)
def run(args):
    import polars as pl

    from workbench.commands.common import load_adapter
    from workbench.benchmarks import print_benchmark_summary
    from workbench.samples import read_dataset
    from workbench.sweep import accuracy_by_budget, check_sweep_folder, run_sweep

    # Everything the user gave is checked before the model loads; nothing is written before.
    specs = method_specs(args.methods)
    for spec in specs:
        spec.create()  # unknown names and bad parameters
    if args.ray_workers is not None and args.ray is None:
        raise UserError("--ray-workers is for sweeps on Ray: add --ray (or drop --ray-workers)")
    check_sweep_folder(args.out)
    samples = read_dataset(args.dataset, args.limit, args.benchmark)
    if args.ray is None:
        print(f"loading {args.model} ...", flush=True)
        sweep = functools.partial(run_sweep, load_adapter(args), batch_size=args.batch_size)
    else:
        from workbench.distributed import require_ray, run_on_ray

        require_ray()
        print(f"starting Ray workers, each loading {args.model} ...", flush=True)
        sweep = functools.partial(run_on_ray, functools.partial(_load_on, args), device=args.device,
                                  address=args.ray or None, workers=args.ray_workers, batch_size=args.batch_size)
    try:
        result = sweep(samples, args.dataset, specs, args.budgets, args.out, args.max_new_tokens)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished sample is saved in {args.out}; run the same command to resume")
        return 130
    table = result.table.filter(pl.col("sample_id").is_in([s.id for s in samples]))
    skipped = table.filter(pl.col("status") == "not_applicable").select("method", "message").unique()
    print(f"\n{args.model}: {len(samples)} samples from {args.dataset}; {result.new_rows} new rows, "
          f"{result.table.height} in {result.folder}/results.parquet")
    with pl.Config(tbl_rows=100, float_precision=3, tbl_hide_dataframe_shape=True, tbl_width_chars=160):
        print("accuracy by method and budget (fraction of the visual tokens or token count):")
        print(accuracy_by_budget(table))
        print_benchmark_summary(table, samples)
    for method, message in skipped.iter_rows():
        print(f"  {method}: not applicable ({message})")
    failed = table.filter(pl.col("status") == "error").select("sample_id", "message").unique(maintain_order=True)
    for sample_id, message in failed.iter_rows():
        print(f"  sample {sample_id}: could not run ({message}); its rows are marked 'error'")
