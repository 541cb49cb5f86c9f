"""``workbench findings``: the observations pruning papers build on, measured on a model and a data
set in any stored form, each beside the paper's value."""

from workbench.commands.common import (add_dataset_arguments, add_model_arguments, load_adapter_with_message,
                                       positive_int)
from workbench.subcommands import command


def _arguments(p):
    add_model_arguments(p)
    add_dataset_arguments(p)
    p.add_argument("--samples", type=positive_int, default=32,
                   help="samples recorded and answered (default 32; --limit caps the data set first)")
    p.add_argument("--max-new-tokens", type=positive_int, default=8,
                   help="longest answer generated for the zero-visual-token accuracy (default 8)")
    p.add_argument("--out", default=None, help="also write every table as parquet into this folder (default: none)")


def print_findings(tables: dict, model: str, depth: int, where: str) -> None:
    """The claims beside the papers', then the per-layer and per-benchmark tables behind them."""
    import polars as pl

    from analyses import literature

    dims = tables["sink_dimensions"]
    found = ", ".join(f"{d} ({s:.0%})" for d, s in dims.head(5).select("dim", "share").iter_rows()) or "none"
    print(f"\n{model} ({depth} decoder layers): {where}")
    with pl.Config(tbl_rows=100, float_precision=3, tbl_hide_dataframe_shape=True, fmt_str_lengths=90,
                   tbl_width_chars=200, tbl_cols=-1):
        print(tables["claims"].select("finding", "paper", "paper_model", "paper_value", "measured", "statement"))
        print("last token's attention share by role and layer (FastV, LLaVA-1.5-7B: image tokens 64 % of the input, "
              "least attention per token after layer 2; system about 85 % in deep layers):")
        print(tables["role_shares"])
        print(f"visual sink dimensions from layer {literature.VAR_FROM_LAYER} on (VAR, LLaVA-1.5-7B: "
              f"{', '.join(map(str, literature.VAR_SINK_DIMS))}; threshold {literature.VAR_TAU:g} at hidden size "
              f"{literature.VAR_HIDDEN}): {found}")
        print("accuracy with zero visual tokens, per benchmark (MMTok, LLaVA-1.5-7B: 92 % of MMMU and 91 % of "
              "ScienceQA accuracy remain):")
        print(tables["zero_by_benchmark"])


@command("findings", "measure the observations pruning papers build on (attention by token role, FastV's "
                     "kept rows with and without RoPE, visual sinks, top-k overlap across layers, accuracy "
                     "with zero visual tokens per benchmark), each beside the paper's value", _arguments)
def run(args):
    from pathlib import Path

    from analyses import literature
    from workbench.files import check_output, write_atomically_bytes
    from workbench.samples import check_images, read_dataset

    out = check_output(args.out) if args.out else None
    samples = read_dataset(args.dataset, args.limit, args.benchmark)[: args.samples]
    check_images(samples)
    adapter = load_adapter_with_message(args)
    tables = literature.measure(adapter, samples, max_new_tokens=args.max_new_tokens)
    depth = len(adapter.decoder_layers())
    print_findings(tables, adapter.name, depth, f"{len(samples)} samples from {args.dataset}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in tables.items():
            write_atomically_bytes(out / f"{name}.parquet", frame.write_parquet)
        print(f"tables written to {Path(out)}")
