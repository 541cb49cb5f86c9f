"""``workbench methods``: the registered pruning methods, their defaults, what they read, their references."""

from __future__ import annotations

import argparse
import textwrap

from workbench.subcommands import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="only these methods (default: all)")


def describe(name: str) -> str:
    import inspect

    from workbench.pruning.registry import method_class

    cls = method_class(name)
    method = cls()
    params = ", ".join(f"{k}={v!r}" for k, v in method.params().items()) or "none"
    summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    lines = [f"{name}  ({cls.__module__}.{cls.__name__})", f"  scored by: {cls.scored_by}", f"  defaults: {params}"]
    lines += textwrap.wrap(summary, 100, initial_indent="  ", subsequent_indent="  ")
    if cls.reference:
        lines += textwrap.wrap("reference: " + " ".join(cls.reference.split()), 100,
                               initial_indent="  ", subsequent_indent="    ")
    return "\n".join(lines)


@command("methods", "list the pruning methods with their defaults and reference implementations", _arguments)
def run(args):
    from workbench.pruning.registry import available_methods, method_class

    names = args.names or available_methods()
    for name in names:
        method_class(name)  # an unknown name: one clear error listing the known ones
    print("\n\n".join(describe(name) for name in names))
