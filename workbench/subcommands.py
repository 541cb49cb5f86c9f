"""The subcommand registry: each module in ``workbench/commands/`` registers its command here
(kept outside that package so importing the registry does not import every command)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``run(args)`` as the subcommand ``name``."""
    def wrap(run):
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run
    return wrap
