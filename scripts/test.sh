#!/usr/bin/env bash
# The test suite, from a fresh machine: bash scripts/test.sh [pytest args]
source "$(dirname "$0")/_venv.sh" requirements-test.txt
source scripts/_data.sh
# Two workers, one test file each at a time (module fixtures stay shared): XLA compiles single-threaded, so the
# suite's many compiles overlap. PYTEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
