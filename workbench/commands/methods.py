"""``workbench methods``: the registered pruning methods, their defaults, what they read, their references."""

from __future__ import annotations

import argparse
import textwrap

from workbench.subcommands import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="only these methods (default: all); a composition 'first+second' "
                                            "(e.g. visionzip+pyramiddrop) shows its two stages")
    p.add_argument("--model", default=None,
                   help="also say where each method acts on this model (its layers, found by running it on "
                        "the first sample of --dataset), or why it does not apply (default: none)")
    p.add_argument("--dataset", default="data/eval/samples.jsonl",
                   help="the data set whose first sample --model runs (default: data/eval/samples.jsonl)")
    p.add_argument("--budget", type=float, default=0.22,
                   help="the budget that run uses, a fraction of the visual tokens (default 0.22)")
    p.add_argument("--device", default="cpu", help="torch device for --model (default: cpu)")
    p.add_argument("--allow-download", action="store_true", help="let --model be fetched (default: offline)")


def acts_at(adapter, ready, name: str, budget: float) -> str:
    """Where ``name`` prunes on the loaded model: every stage of the plan it actually ran."""
    from workbench import pipeline
    from workbench.pruning.plan import describe_where
    from workbench.pruning.registry import create_method

    result = pipeline.run(adapter, ready, create_method(name), budget, max_new_tokens=1)
    if result.status != "ok":
        return f"does not apply: {result.message}"
    stages = [f"{describe_where(s.where)} ({len(s.kept)} kept)" for s in result.plan.stages]
    return "; ".join(stages) or "prunes nothing"


def _summary(cls) -> str:
    import inspect

    return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


def describe_composed(name: str) -> str:
    """A composition "first+second": its stages in order, its parameters, and each part's summary."""
    from workbench.pruning.registry import create_method

    method = create_method(name)
    params = ", ".join(f"{k}={v!r}" for k, v in method.params().items())
    lines = [f"{name}  (composition: {method.first.name} before the LLM, then {method.second.name} inside it on "
             "the tokens the first kept)", f"  scored by: {method.scored_by} (the second stage's)",
             f"  defaults: {params}"]
    for role, part in (("first", method.first), ("then", method.second)):
        lines += textwrap.wrap(f"{role}: {part.name}: {_summary(type(part))}", 100,
                               initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


def describe(name: str) -> str:
    from workbench.pruning.compose import is_composed
    from workbench.pruning.registry import method_class

    if is_composed(name):
        return describe_composed(name)
    cls = method_class(name)
    method = cls()
    params = ", ".join(f"{k}={v!r}" for k, v in method.params().items()) or "none"
    summary = _summary(cls)
    lines = [f"{name}  ({cls.__module__}.{cls.__name__})", f"  scored by: {cls.scored_by}", f"  defaults: {params}"]
    lines += textwrap.wrap(summary, 100, initial_indent="  ", subsequent_indent="  ")
    if cls.reference:
        lines += textwrap.wrap("reference: " + " ".join(cls.reference.split()), 100,
                               initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


@command("methods", "list the pruning methods with their defaults and reference implementations", _arguments)
def run(args):
    from workbench.pruning.registry import available_methods, method_class

    from workbench.pruning.compose import is_composed
    from workbench.pruning.registry import create_method

    names = args.names or available_methods()
    for name in names:
        # an unknown name: one clear error listing the known ones (a composition: also a misfit part)
        create_method(name) if is_composed(name) else method_class(name)
    where = {}
    if args.model:
        from workbench.commands.common import load_adapter_with_message
        from workbench.pipeline import prepare_sample
        from workbench.pruning.budget import check_budget
        from workbench.pruning.registry import create_method
        from workbench.samples import check_images, read_dataset

        budget = check_budget(args.budget)
        sample = read_dataset(args.dataset, 1)
        check_images(sample)
        adapter = load_adapter_with_message(args)
        ready = prepare_sample(adapter, sample[0], [create_method(name) for name in names])
        where = {name: f"  acts on {adapter.name} ({len(adapter.decoder_layers())} decoder layers, budget "
                       f"{budget:g}): {acts_at(adapter, ready, name, budget)}" for name in names}
    print("\n\n".join("\n".join(filter(None, [describe(name), where.get(name)])) for name in names))
