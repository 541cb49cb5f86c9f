#!/usr/bin/env bash
# The main job on the shipped model: answer the evaluation set and print the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/workbench evaluate "$@"
