"""``workbench report``: sweep, analyses, failure diagnosis -> an HTML/Markdown report with figures."""

from __future__ import annotations

import argparse

from workbench.commands.common import positive_int
from workbench.subcommands import command


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="TOML file with ReportConfig keys (reports/config.py); "
                                                   "default: none, the defaults run on the shipped model")
    p.add_argument("--model", default=None, help="override the config's model (default: the config's)")
    p.add_argument("--dataset", default=None, help="override the config's data set (default: the config's)")
    p.add_argument("--benchmark", default=None, help="how to read a stored benchmark (see `workbench benchmarks`; "
                                                      "default: the config's, else inferred from its columns)")
    p.add_argument("--samples", type=positive_int, default=None,
                   help="override how many samples are swept (default: the config's)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="samples swept together (default: the config's, 8)")
    p.add_argument("--out", default=None, help="override the output folder (default runs/report)")


@command("report", "run the sweep, the analyses and the failure diagnosis; write index.html, summary.md, "
                   "figures and tables", _arguments)
def run(args):
    from workbench.models.loading import load
    from reports.config import load_config
    from reports.write import build_report

    from workbench.files import check_output

    config = load_config(args.config, model=args.model, dataset=args.dataset, benchmark=args.benchmark,
                         samples=args.samples, batch_size=args.batch_size, out=args.out)
    check_output(config.out)  # before the model loads, not after the sweep
    print(f"loading {config.model} ...", flush=True)
    adapter = load(config.model, device=config.device)
    folder = build_report(adapter, config)
    print(f"report written to {folder}/index.html and {folder}/summary.md")
    print((folder / "summary.md").read_text().split("## Findings", 1)[1].split("\n## ", 1)[0].strip())
