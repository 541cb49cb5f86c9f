from workbench.subcommands import command
from workbench.commands.common import positive_int
from workbench.scene_dataset import DEFAULT_EVAL_SEED


def _arguments(p):
    p.add_argument("--out", default="data/eval", help="output folder (samples.jsonl, images/, masks/)")
    p.add_argument("-n", "--samples", type=positive_int, default=1200, help="number of samples (default 1200)")
    p.add_argument("--seed", type=int, default=DEFAULT_EVAL_SEED)
    p.add_argument("--min-objects", type=positive_int, default=2)
    p.add_argument("--max-objects", type=positive_int, default=4)


@command("make-scenes", "write a grounded synthetic data set (images, evidence masks, JSONL)", _arguments)
def run(args):
    from workbench.errors import UserError
    from workbench.scene_dataset import make_dataset

    if not 1 <= args.min_objects <= args.max_objects <= 9:
        raise UserError("need 1 <= --min-objects <= --max-objects <= 9")
    samples = make_dataset(args.out, args.samples, args.seed, args.min_objects, args.max_objects)
    print(f"wrote {len(samples)} samples to {args.out}/samples.jsonl")
