#!/usr/bin/env bash
# The main job on the shipped model: the default report (sweep, analyses, failure diagnosis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/workbench report "$@"
