#!/usr/bin/env bash
# The main job, from a fresh machine: bash scripts/main.sh
# Until training (issue #3) and the comparison report (issue #4) land, it proves the Flax models against
# torchvision and profiles both variants.
source "$(dirname "$0")/_venv.sh" requirements-test.txt
source scripts/_data.sh
for v in v1 v2; do
  .venv/bin/python -m resmobile_jax.convert check --variant "$v"
  .venv/bin/python -m resmobile_jax.profile --config "configs/$v.py"
done
