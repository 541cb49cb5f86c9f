#!/usr/bin/env bash
# Create (or re-sync) the local virtual environment .venv: torch's CPU build first, so nothing
# pulls a CUDA wheel; then exactly requirements.lock; then the workbench itself (editable, without
# resolving anything). It re-syncs whenever the lock, pyproject.toml or this script changes, and
# removes what the lock does not list, so a working tree's environment is a fresh machine's.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.workbench-lock
want="$(cat requirements.lock pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) torch==$TORCH_VERSION"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip=(.venv/bin/python -m pip --quiet --disable-pip-version-check)
  have=$(.venv/bin/python -c 'from importlib.metadata import version; print(version("torch").split("+")[0])' \
         2>/dev/null || true)
  if [ "$have" != "$TORCH_VERSION" ]; then
    "${pip[@]}" install "torch==$TORCH_VERSION"
  fi
  "${pip[@]}" install --requirement requirements.lock
  "${pip[@]}" install --no-deps --editable .
  .venv/bin/python -m workbench.lockfile --sync
  "${pip[@]}" check
  echo "$want" > "$stamp"
fi
