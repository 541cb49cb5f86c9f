"""Every subcommand module; importing this package registers them all."""

from workbench.commands import evaluate, make_scenes, train_shapes  # noqa: F401
from workbench.commands import record  # noqa: F401,E402
