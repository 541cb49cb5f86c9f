"""The ``workbench`` console script: a registry of subcommands, one module each in ``commands/``.

User mistakes (a missing file, an unknown method, a checkpoint that is not there) are raised as
``UserError`` or one of the known error types and printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from workbench.subcommands import COMMANDS, command  # noqa: F401  (re-exported for command modules)
from workbench.errors import UserError


def _user_error_types() -> tuple[type[BaseException], ...]:
    from workbench.models.loading import ModelNotAvailable
    from workbench.models.registry import UnsupportedModel
    from PIL import UnidentifiedImageError

    from workbench.samples import DatasetError

    return UserError, ModelNotAvailable, UnsupportedModel, DatasetError, FileNotFoundError, UnidentifiedImageError


def build_parser() -> argparse.ArgumentParser:
    import workbench.commands  # noqa: F401  (registers every subcommand)

    parser = argparse.ArgumentParser(
        prog="workbench",
        description="Open up vision-language models: why visual-token pruning keeps what it keeps, and why it fails.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in sorted(COMMANDS.values(), key=lambda c: c.name):
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def single_threaded_blas() -> None:
    """NumPy's BLAS on one thread: the analyses' matrices are small, and BLAS threads that spin
    beside torch's on a few cores make them 20x slower (measured on 2 cores); torch keeps its own."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--allow-download" not in argv:
        # Before transformers is imported: never wait on the network unless asked.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    single_threaded_blas()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except _user_error_types() as e:
        print(f"workbench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"workbench {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``workbench methods | head``): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
