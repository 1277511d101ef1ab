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
from absl import logging as absl_logging

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only or unwritable workdir, quota)."""


_STORAGE_CODES = {"RESOURCE_EXHAUSTED": "No space left on device", "PERMISSION_DENIED": "Permission denied"}


def storage_failure(exc: BaseException) -> str | None:
    """Why a write failed, if `exc` (or what it wraps) is a storage failure: an OSError from Python, or the status
    text TensorStore (orbax's array writer) puts in a ValueError (RESOURCE_EXHAUSTED when the disk is full)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return f"{exc.strerror or exc} ({type(exc).__name__})"
        text = str(exc)
        for code, meaning in _STORAGE_CODES.items():
            if code in text:
                return f"{meaning} ({code} from the checkpoint writer)"
        exc = exc.__cause__ or exc.__context__
    return None


def abstract_like(state) -> Any:
    """Shapes, dtypes and shardings of `state`: orbax restores straight into the same (sharded) layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class RunCheckpoints:
    def __init__(self, workdir: str | Path, keep: int, async_save: bool = True, best_metric: str = "map"):
        workdir = Path(workdir).absolute()
        self.directory = workdir / LATEST_DIR
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

    def _storage_guard(self, what: str, call):
        """Runs an orbax call; an I/O failure becomes one clear message naming the last checkpoint that is intact.
        Orbax commits a save by renaming its temporary directory, so a failed save never replaces a finished one."""
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - only I/O failures are translated, the rest re-raised as they are
            reason = storage_failure(e)
            if reason is None:
                raise
            good = self.latest_step()
            intact = (f"the last complete checkpoint is step {good} in {self.directory}" if good is not None
                      else "no complete checkpoint was written yet")
            raise CheckpointWriteError(
                f"could not write {what} to {self.directory}: {reason}; {intact}. Free space or fix the permissions of the workdir, then rerun "
                f"the same command to resume from it"
            ) from e

    def save(self, step: int, state, record: dict) -> None:
        if step not in self.latest.all_steps():
            self._storage_guard(f"the checkpoint of step {step}",
                                lambda: self.latest.save(step, args=self._args(state, record), force=True))

    def save_best(self, step: int, state, record: dict, metrics: dict) -> None:
        """Kept only if `metrics[best_metric]` beats the best so far."""
        if step not in self.best.all_steps():
            self._storage_guard(f"the best checkpoint (step {step})", lambda: self.best.save(
                step, args=self._args(state, record), metrics={k: float(v) for k, v in metrics.items()}, force=True))

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
        self._storage_guard("a checkpoint", self.latest.wait_until_finished)
        self._storage_guard("the best checkpoint", self.best.wait_until_finished)

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def read_run_weights(workdir: str | Path, parts: dict[str, Any], best: bool = False) -> tuple[dict[str, Any], int]:
    """Reads only `parts` of the saved TrainState (e.g. {"params": like, "batch_stats": like}, the values giving shapes)
    from a run's latest (or best) checkpoint. Read-only: another run's workdir is never written to."""
    directory = Path(workdir).absolute() / (BEST_DIR if best else LATEST_DIR)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} does not exist")
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, max_to_keep=None, create=False,
                                           cleanup_tmp_directories=False)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns that a read-only manager is read-only
    try:
        manager = ocp.CheckpointManager(directory, options=options)
    finally:
        absl_logging.set_verbosity(verbosity)
    try:
        step = manager.latest_step()  # best/ keeps a single checkpoint, the best one
        if step is None:
            raise FileNotFoundError(f"{directory} holds no finished checkpoint")
        item = {k: abstract_like(v) for k, v in parts.items()}
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    finally:
        manager.close()
    return dict(restored["state"]), step

