"""Training entry point. The training loop (data, losses, sharded steps, orbax checkpoints) is issue #3."""

from __future__ import annotations

import sys

import ml_collections


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> None:
    print(f"ResMobileNet {config.model.variant}, preset {config.preset}, workdir {workdir}")
    print(config)
    print("Training is not implemented yet (issue #3); use `python -m resmobile_jax.convert` and "
          "`python -m resmobile_jax.profile` meanwhile.", file=sys.stderr)
    sys.exit(3)
