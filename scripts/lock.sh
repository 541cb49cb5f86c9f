#!/usr/bin/env bash
# Refresh requirements.lock: the exact version of every direct and transitive dependency of the
# workbench and its test and ray extras, resolved by pip-tools within pyproject.toml's ranges, newest first.
# torch is left out of the lock (setup.sh installs its CPU build first, so no CUDA wheel is ever
# pulled); the resolution runs against that CPU build, so none of its CUDA dependencies appear.
# Needs network access to the package index and the CPU torch wheel where pip can find it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$PYTHON" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet pip-tools
echo "torch==${TORCH_VERSION}" > "$tools/torch.txt"
CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$tools/venv/bin/pip-compile" --quiet --upgrade --strip-extras --no-emit-index-url --no-emit-find-links \
  --extra test --extra ray --constraint "$tools/torch.txt" --unsafe-package torch \
  --output-file requirements.lock pyproject.toml
# The header names the releases it was resolved against, for the README.
"$tools/venv/bin/python" - <<'PY'
import platform, re
path = "requirements.lock"
text = open(path).read()
body = text.split("\n", 1)[1] if text.startswith("#") else text
pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, re.M))
print("locked:", ", ".join(f"{n} {pins[n]}" for n in ("transformers", "nnsight", "streamlit", "polars") if n in pins),
      f"(CPython {platform.python_version()})")
PY
