#!/usr/bin/env bash
# Set up and run the test suite (extra arguments go to pytest, e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy engine cluster cli
exec .venv/bin/python -m pytest -q "$@"
