from workbench.subcommands import command
from workbench.commands.common import positive_int
from workbench.scene_dataset import DEFAULT_EVAL_SEED

DEFAULT_OUT = "runs/scenes"  # not data/eval: that is the shipped evaluation set


def _arguments(p):
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"new or empty output folder (samples.jsonl, images/, masks/; default {DEFAULT_OUT})")
    p.add_argument("-n", "--samples", type=positive_int, default=1200,
                   help="number of samples, at least one per question type (default 1200)")
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED,
                   help=f"random seed (default {DEFAULT_EVAL_SEED}, the shipped evaluation set's)")
    p.add_argument("--min-objects", type=positive_int, default=2, help="fewest objects per scene (default 2)")
    p.add_argument("--max-objects", type=positive_int, default=4, help="most objects per scene, up to 9 (default 4)")


@command("make-scenes", "write a grounded synthetic data set (images, evidence masks, JSONL)", _arguments)
def run(args):
    import os
    import shutil
    import uuid
    from pathlib import Path

    from workbench.errors import UserError
    from workbench.files import check_output
    from workbench.scene_dataset import make_dataset
    from workbench.scenes import QUESTION_TYPES

    if args.samples < len(QUESTION_TYPES):
        raise UserError(f"-n/--samples {args.samples}: need at least {len(QUESTION_TYPES)}, one per question type "
                        f"({', '.join(QUESTION_TYPES)})")
    if not 1 <= args.min_objects <= args.max_objects <= 9:
        raise UserError(f"--min-objects {args.min_objects} / --max-objects {args.max_objects}: "
                        "need 1 <= --min-objects <= --max-objects <= 9")
    out = check_output(args.out)
    # Never write over what is there: a data set in this folder may be the shipped one, or the user's.
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: is not empty; give a new or empty folder (nothing there is replaced)")
    # Written beside --out and renamed into place: an interrupted run leaves no half-written data set
    # (the JSONL's paths are relative to its folder, so the rename keeps them valid).
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        samples = make_dataset(tmp, args.samples, args.seed, args.min_objects, args.max_objects)
        os.replace(tmp, out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {len(samples)} samples to {Path(args.out) / 'samples.jsonl'}")
