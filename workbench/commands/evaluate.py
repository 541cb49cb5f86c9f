from workbench.subcommands import command
from workbench.commands.common import (add_dataset_arguments, add_model_arguments, load_adapter_with_message,
                                       non_negative_int, positive_int)


def _arguments(p):
    add_model_arguments(p)
    add_dataset_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per forward (default 32)")
    p.add_argument("--no-blank", action="store_true", help="skip the blank-image control (default: run it)")
    p.add_argument("--attention-samples", type=non_negative_int, default=300,
                   help="samples used for the evidence-attention ratio (0 to skip; default 300)")
    p.add_argument("--out", default=None,
                   help="also write the per-sample answers to this parquet file (default: none)")


@command("evaluate", "answer a data set, print accuracy per question type, the blank-image control "
                     "and the evidence-attention ratio per layer", _arguments)
def run(args):
    from pathlib import Path

    import polars as pl

    from workbench.evaluate import accuracy_table, answer_dataset, evidence_attention, majority_prior
    from workbench.samples import read_dataset

    from workbench.files import check_output
    from workbench.samples import check_images

    # Everything the user gave is checked before the model loads: the results must be writable
    # (not found out after all the work) and every image must decode.
    if args.out:
        check_answers_target(check_output(args.out, folder=False))
    samples = read_dataset(args.dataset, args.limit, args.benchmark)
    check_images(samples)
    adapter = load_adapter_with_message(args)
    answers = answer_dataset(adapter, samples, args.batch_size)
    table = accuracy_table(answers)
    if not args.no_blank:
        blank = accuracy_table(answer_dataset(adapter, samples, args.batch_size, blank=True))
        table = table.join(blank.select("question_type", blank_accuracy="accuracy"), on="question_type", how="left")
        table = table.join(majority_prior(samples), on="question_type", how="left")
    print(f"\n{adapter.name}: {len(samples)} samples from {args.dataset}")
    with pl.Config(tbl_rows=50, float_precision=3, tbl_hide_dataframe_shape=True):
        print(table)
        if args.attention_samples:
            ratios = evidence_attention(adapter, samples[: args.attention_samples])
            print("\nattention of the answer position to the evidence (head mean; ratio 1 = chance):")
            print(ratios)
    if args.out:
        from workbench.samples import write_atomically_bytes

        write_atomically_bytes(Path(args.out), answers.write_parquet)
        print(f"answers written to {args.out}")


def check_answers_target(path) -> None:
    """An existing ``--out`` is replaced only when it is an answers table evaluate wrote: anything
    else is the user's and is refused, never overwritten."""
    import polars as pl

    from workbench.errors import UserError

    if not path.exists():
        return
    try:
        columns = set(pl.read_parquet_schema(path))
    except Exception:  # polars raises several types for a file that is not parquet
        columns = set()
    if not {"question_type", "correct"} <= columns:
        raise UserError(f"--out {path}: exists and is not an answers table written by evaluate; "
                        "refusing to overwrite it (give a new file)")
