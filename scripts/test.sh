#!/usr/bin/env bash
# Set up and run the test suite (extra arguments go to pytest, e.g. -m "not slow"). Tests run on
# one pytest-xdist worker per core (PYTEST_WORKERS to change it; 0 runs them in this process).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy engine cluster cli
exec .venv/bin/python -m pytest -q -n "${PYTEST_WORKERS:-auto}" --dist loadgroup "$@"
