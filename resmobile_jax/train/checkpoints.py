"""Run checkpoints with orbax `CheckpointManager`: the latest N in WORKDIR/checkpoints, the best by the evaluation
metric in WORKDIR/best. Saves are asynchronous (training continues while the previous step is written) and atomic
(orbax writes to a temporary directory and renames it when complete, so a crash never leaves a half checkpoint that
a restart would load).

Each checkpoint holds the whole TrainState (params, batch stats, both optimizer states, EMA, step) plus a small
JSON record: the data position (epoch, batch), the model config and the metrics at that step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


def abstract_like(state) -> Any:
    """Shapes, dtypes and shardings of `state`: orbax restores straight into the same (sharded) layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class RunCheckpoints:
    def __init__(self, workdir: str | Path, keep: int, async_save: bool = True, best_metric: str = "map"):
        workdir = Path(workdir).absolute()
        self.best_metric = best_metric
        self.latest = ocp.CheckpointManager(
            workdir / LATEST_DIR,
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True, enable_async_checkpointing=async_save),
        )
        self.best = ocp.CheckpointManager(
            workdir / BEST_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, best_fn=lambda m: m[best_metric], best_mode="max",
                enable_async_checkpointing=async_save,
            ),
        )

    @staticmethod
    def _args(state, record: dict):
        return ocp.args.Composite(state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record))

    def save(self, step: int, state, record: dict) -> None:
        if step not in self.latest.all_steps():
            self.latest.save(step, args=self._args(state, record), force=True)

    def save_best(self, step: int, state, record: dict, metrics: dict) -> None:
        """Kept only if `metrics[best_metric]` beats the best so far."""
        if step not in self.best.all_steps():
            self.best.save(step, args=self._args(state, record), metrics={k: float(v) for k, v in metrics.items()}, force=True)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def restore(self, abstract_state, step: int | None = None, best: bool = False) -> tuple[Any, dict]:
        manager = self.best if best else self.latest
        step = (manager.best_step() if best else manager.latest_step()) if step is None else step
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["record"])

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()
