"""The installed environment is exactly requirements.lock, and the lock fits pyproject's ranges."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from workbench.lockfile import LOCK, Drift, canonical, drift, installed, locked

ROOT = Path(__file__).resolve().parents[1]


def test_installed_environment_is_the_lock():
    found = drift(locked(), installed())
    assert not found, found.describe()


def test_what_a_package_puts_on_sys_path_is_not_installed():
    """``import ray`` puts its bundled psutil and colorama on ``sys.path``; pip installed neither,
    so they are not part of the environment (the check above holds in any test order)."""
    import importlib

    importlib.import_module("ray")  # the lock's ray extra

    assert "psutil" not in installed() and "colorama" not in installed()
    assert not drift(locked(), installed()), drift(locked(), installed()).describe()


def test_drift_names_what_is_missing_different_and_extra():
    found = drift({"numpy": "2.4.6", "polars": "2.1.0"}, {"numpy": "2.4.5", "torch": "2.13.0+cpu", "rich": "15.0.0"})
    assert found == Drift(missing={"polars": "2.1.0"}, different={"numpy": ("2.4.6", "2.4.5")}, extra={"rich": "15.0.0"})
    assert found.describe() == ("missing polars==2.1.0; numpy is 2.4.5, the lock says 2.4.6; "
                                "rich==15.0.0 is not in the lock")
    assert not drift({"numpy": "2.4.6"}, {"numpy": "2.4.6", "torch": "2.13.0+cpu", "pip": "23.2.1"})


def test_lock_leaves_torch_and_cuda_out():
    names = locked()
    assert "torch" not in names
    assert not [n for n in names if n.startswith(("nvidia-", "triton", "cuda-"))]


def test_every_declared_dependency_is_locked_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = locked(LOCK)
    for requirement in declared:
        name = canonical(requirement.name)
        if name == "torch" or (requirement.marker and not requirement.marker.evaluate()):
            continue
        assert name in pins, f"{name} is declared but not locked"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
