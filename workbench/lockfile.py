"""The environment against ``requirements.lock``: what differs, and making it match.

``scripts/setup.sh`` installs the lock and then calls ``python -m workbench.lockfile --sync`` to
remove what the lock does not list; the test suite checks that nothing differs. torch is not in the
lock (its CPU build is installed first), nor are pip's own tools and the workbench itself.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
UNLOCKED = frozenset({"torch", "pip", "setuptools", "wheel", "vlm-pruning-workbench"})
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", re.M)


def canonical(name: str) -> str:
    """PEP 503 normalised name: ``Jinja2`` and ``jinja2``, ``typing_extensions`` and ``typing-extensions`` agree."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path = LOCK) -> dict[str, str]:
    """Package -> exact version pinned in the lock."""
    return {canonical(name): version for name, version in _PIN.findall(path.read_text())}


def installed() -> dict[str, str]:
    """Package -> version installed in the running interpreter's environment: its site-packages
    only, not whatever else is on ``sys.path`` (``import ray`` adds the copies of psutil and
    colorama it bundles, which pip never installed)."""
    paths = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions(path=paths)
            if d.metadata["Name"]}


@dataclass(frozen=True)
class Drift:
    missing: dict[str, str]  # locked, not installed
    different: dict[str, tuple[str, str]]  # name -> (locked, installed)
    extra: dict[str, str]  # installed, not locked

    def __bool__(self) -> bool:
        return bool(self.missing or self.different or self.extra)

    def describe(self) -> str:
        parts = [f"missing {n}=={v}" for n, v in sorted(self.missing.items())]
        parts += [f"{n} is {got}, the lock says {want}" for n, (want, got) in sorted(self.different.items())]
        parts += [f"{n}=={v} is not in the lock" for n, v in sorted(self.extra.items())]
        return "; ".join(parts)


def drift(lock: dict[str, str], present: dict[str, str]) -> Drift:
    return Drift(
        missing={n: v for n, v in lock.items() if n not in present},
        different={n: (v, present[n]) for n, v in lock.items() if n in present and present[n] != v},
        extra={n: v for n, v in present.items() if n not in lock and n not in UNLOCKED},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare the environment with requirements.lock.")
    parser.add_argument("--sync", action="store_true", help="uninstall what the lock does not list")
    args = parser.parse_args(argv)
    found = drift(locked(), installed())
    if args.sync and found.extra:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", *found.extra], check=True)
        found = drift(locked(), installed())
    if found:
        print(f"the environment differs from {LOCK.name}: {found.describe()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
