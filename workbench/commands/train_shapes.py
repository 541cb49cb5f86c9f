from dataclasses import fields

from workbench.subcommands import command
from workbench.models.loading import SHIPPED_MODEL_DIR


def _arguments(p):
    from workbench.shapes_model.train import TrainConfig

    p.add_argument("--out", default=str(SHIPPED_MODEL_DIR), help="where to save the model (default: the shipped one)")
    for f in fields(TrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(f.default, tuple):
            p.add_argument(flag, nargs="+", default=f.default, help=f"(default {' '.join(f.default)})")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"(default {f.default})")


@command("train-shapes", "train the shipped scene VLM from scratch on CPU (37-46 min on 2 cores, with the machine's speed)", _arguments)
def run(args):
    from pathlib import Path

    from workbench.shapes_model.card import write_model_card
    from workbench.shapes_model.train import TrainConfig, train

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    curve = train(config, Path(args.out))
    write_model_card(Path(args.out))
    print(f"saved to {args.out}; final held-out first-token accuracy {curve[-1]['acc_overall']:.3f}; its model card "
          f"has the recipe and curve, `workbench evaluate --model {args.out}` measures the rest")
