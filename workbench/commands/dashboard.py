"""``workbench dashboard``: the Streamlit app (Explore, Methods, Compare, Failures), served headless."""

from __future__ import annotations

import argparse

from workbench.commands.common import positive_int
from workbench.subcommands import command

RESULTS_ENV = "WORKBENCH_DASHBOARD_RESULTS"  # read by dashboards/state.py (not imported here: it needs a Streamlit run)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="runs",
                   help="the folder of sweeps and reports the Compare and Failures pages may open; "
                        "nothing outside it is read (default runs)")
    p.add_argument("--port", type=positive_int, default=8501, help="local port to serve on (default 8501)")
    p.add_argument("--address", default="localhost", help="address to bind (default localhost)")


def streamlit_command(results: str, port: int, address: str = "localhost") -> list[str]:
    import sys
    from pathlib import Path

    app = Path(__file__).resolve().parents[2] / "dashboards" / "app.py"
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
            "--server.port", str(port), "--server.address", address, "--browser.gatherUsageStats", "false",
            "--", "--results", results]


@command("dashboard", "open the Streamlit dashboard: explore signals, compare pruning methods, browse "
                      "failures (headless; open the printed address)", _arguments)
def run(args):
    import os
    import subprocess
    from pathlib import Path

    results = str(Path(args.results).resolve())
    env = os.environ | {RESULTS_ENV: results}
    print(f"dashboard on http://{args.address}:{args.port} (results folder {results}); Ctrl-C stops it", flush=True)
    try:
        return subprocess.call(streamlit_command(results, args.port, args.address), env=env)
    except KeyboardInterrupt:
        return 130
