"""``workbench findings``: the observations pruning papers build on, measured on a model."""

from workbench.commands.common import (add_dataset_arguments, add_model_arguments, load_adapter_with_message,
                                       positive_int)
from workbench.subcommands import command


def _arguments(p):
    add_model_arguments(p)
    add_dataset_arguments(p)
    p.add_argument("--samples", type=positive_int, default=32,
                   help="samples recorded and answered (default 32; --limit caps the data set first)")
    p.add_argument("--out", default=None, help="also write every table as parquet into this folder (default: none)")


@command("findings", "measure the observations pruning papers build on (attention by token role, FastV's "
                     "kept rows with and without RoPE, visual sinks, top-k overlap across layers, accuracy "
                     "with zero visual tokens), each beside the paper's value", _arguments)
def run(args):
    from pathlib import Path

    import polars as pl
    from tqdm import tqdm

    from analyses import literature
    from workbench.files import check_output, write_atomically_bytes
    from workbench.recorder import record
    from workbench.samples import check_images, read_dataset

    out = check_output(args.out) if args.out else None
    samples = read_dataset(args.dataset, args.limit)[: args.samples]
    check_images(samples)
    adapter = load_adapter_with_message(args)
    recordings = [record(adapter, adapter.prepare(s.load_image(), s.question), literature.REQUEST, sample_id=s.id,
                         question=s.question) for s in tqdm(samples, desc="recording")]
    depth = len(adapter.decoder_layers())
    tables = {
        "attention_by_role": literature.attention_by_role(recordings),
        "fastv_rows": literature.fastv_rows(recordings, depth),
        "visual_sinks": literature.visual_sinks(recordings, int(adapter.language_model().config.hidden_size)),
        "topk_overlap": literature.topk_overlap(recordings),
        "zero_tokens": literature.zero_token_accuracy(adapter, tqdm(samples, desc="zero visual tokens")),
    }
    claims = literature.claims(tables["attention_by_role"], tables["fastv_rows"], tables["visual_sinks"],
                               tables["topk_overlap"], tables["zero_tokens"], depth)
    print(f"\n{adapter.name} ({depth} decoder layers): {len(samples)} samples from {args.dataset}")
    with pl.Config(tbl_rows=50, float_precision=3, tbl_hide_dataframe_shape=True, fmt_str_lengths=90,
                   tbl_width_chars=200):
        print(claims.select("finding", "paper", "paper_model", "paper_value", "measured", "statement"))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in {**tables, "claims": claims}.items():
            write_atomically_bytes(out / f"{name}.parquet", frame.write_parquet)
        print(f"tables written to {Path(out)}")
