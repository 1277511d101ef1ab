"""Where training reports go: a JSONL file and TensorBoard event files in the workdir (process 0 only), and a tqdm
progress bar with ETA, images/s, loss and learning rate."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        self.path = Path(workdir) / METRICS_FILE
        self._tb = None
        if self.enabled:
            from resmobile_jax.data import tf_setup

            tf_setup.hide_accelerators_from_tensorflow()
            import tensorflow as tf

            self._tb = tf.summary.create_file_writer(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in values.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "split": split, "time": round(time.time(), 3), **scalars}) + "\n")
        import tensorflow as tf

        with self._tb.as_default(step=int(step)):
            for k, v in scalars.items():
                tf.summary.scalar(f"{split}/{k}", v)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
