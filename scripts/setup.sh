#!/usr/bin/env bash
# Create .venv and install raymerge with its test tools. Idempotent: reinstalls only when
# pyproject.toml changed. torch is pinned first so pip takes the CPU build instead of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.raymerge-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import raymerge.engine" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import raymerge.engine, torch, mergekit, transformers" 
  echo "$want" > "$stamp"
fi
