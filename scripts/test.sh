#!/usr/bin/env bash
# The test suite, from a fresh machine: bash scripts/test.sh [pytest args]
source "$(dirname "$0")/_venv.sh" requirements-test.txt
source scripts/_data.sh
exec .venv/bin/python -m pytest "$@"
