"""Every subcommand module; importing this package registers them all."""

from workbench.commands import dashboard, evaluate, make_scenes, train_shapes  # noqa: F401
from workbench.commands import findings, methods, record, report, sweep  # noqa: F401,E402
from workbench.commands import benchmarks  # noqa: F401,E402
