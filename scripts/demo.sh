#!/usr/bin/env bash
# Set up, build small synthetic Llama checkpoints, merge them with TIES, print the figures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/raymerge demo "$@"
