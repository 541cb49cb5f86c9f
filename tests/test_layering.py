"""Imports run one way: dashboards and reports above analyses, analyses above the core (pipeline,
pruning, sweeps), the core above models and probes. The command line (``workbench/cli.py``,
``workbench/commands/``) is the application on top and may import every layer."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {  # package -> the first-party packages it may import
    "probes": {"probes"},
    "workbench": {"workbench", "probes"},
    "analyses": {"analyses", "workbench", "probes"},
    "reports": {"reports", "analyses", "workbench", "probes"},
    "dashboards": {"dashboards", "analyses", "workbench", "probes"},
}
APPLICATION = ("workbench/cli.py", "workbench/__main__.py", "workbench/commands/")


def imported_packages(path: Path) -> set[str]:
    """First-party top-level packages a module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(LAYERS)


def violations() -> list[str]:
    out = []
    for package, allowed in LAYERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith(APPLICATION):
                continue
            out += [f"{relative} imports {name}" for name in sorted(imported_packages(path) - allowed)]
    return out


def test_imports_run_one_way():
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from analyses import failures\n    import reports.write\n")
    assert imported_packages(module) == {"analyses", "reports"}
