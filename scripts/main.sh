#!/usr/bin/env bash
# The main job, from a fresh machine: bash scripts/main.sh [extra flags for resmobile_jax.compare]
# Trains ResMobileNet V1 and V2 on the embedded Fashion-MNIST with identical settings, evaluates both against the
# raw-pixel baseline, and writes runs/compare/report.md (+ report.json). Rerunning reuses finished runs.
source "$(dirname "$0")/_venv.sh" requirements.txt
source scripts/_data.sh
exec .venv/bin/python -m resmobile_jax.compare --workdir runs/compare "$@"
