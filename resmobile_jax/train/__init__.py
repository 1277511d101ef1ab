"""Training: train state and optimizers (state.py), the sharded jit step (step.py), orbax checkpoints
(checkpoints.py), metrics output (metrics.py), config checks (validate.py), and the loop (loop.py)."""

from resmobile_jax.train.loop import train_and_evaluate

__all__ = ["train_and_evaluate"]
