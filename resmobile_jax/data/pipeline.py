"""The input pipeline: batch orders (sampling.py) -> this process's share -> decode/augment (preprocess.py) on
tf.data worker threads -> prefetched uint8 batches.

The position in the data is a pure function of the global step (epoch = step // steps_per_epoch), so a resumed run
continues with exactly the batches it would have seen, and every process computes the same global order and loads
only its own columns of it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from resmobile_jax.data import sampling
from resmobile_jax.data.preprocess import Preprocess
from resmobile_jax.data.sources import ImageSet


def process_columns(batch_size: int, process_index: int, process_count: int) -> slice:
    """Which columns of a global batch this process loads (each host reads only its own images)."""
    if batch_size % process_count:
        raise ValueError(f"batch size {batch_size} does not split over {process_count} processes")
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


class TrainBatches:
    """Global batches of `batch_size` images; P x K class-balanced when `pk` is (P, K), else shuffled."""

    def __init__(self, images: ImageSet, preprocess: Preprocess, batch_size: int, seed: int, pk: tuple[int, int] | None,
                 process_index: int = 0, process_count: int = 1, workers: int = 2):
        self.images, self.preprocess, self.batch_size, self.seed, self.pk = images, preprocess, batch_size, seed, pk
        self.columns = process_columns(batch_size, process_index, process_count)
        self.workers = workers
        if pk:
            sampling.check_pk(images.labels, pk[0], pk[1], batch_size)
        elif batch_size > len(images):
            raise ValueError(f"batch size {batch_size} is larger than the {len(images)} training images")
        self.steps_per_epoch = len(images) // batch_size
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                if self.pk:
                    o = sampling.pk_batches(self.images.labels, self.pk[0], self.pk[1], self.seed, epoch)
                else:
                    o = sampling.shuffled_batches(len(self.images), self.batch_size, self.seed, epoch)
                self._orders = {epoch: o}  # keep one epoch's order; batches are consumed in order
            return self._orders[epoch]

    def load(self, step: int) -> dict[str, np.ndarray]:
        """This process's part of global batch `step`: uint8 images (b, H, W, 3) and int32 labels (b,)."""
        epoch, b = divmod(int(step), self.steps_per_epoch)
        index = self.order(epoch)[b]
        u = self.preprocess.random_params(np.random.default_rng([self.seed, epoch, b, 1]), self.batch_size)
        cols = range(self.batch_size)[self.columns]
        images = np.stack([self.preprocess.train_image(self.images.images[index[c]], u[c]) for c in cols])
        return {"image": images, "label": self.images.labels[index[self.columns]]}

    def iterate(self, start_step: int, end_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches start_step .. end_step-1, decoded on tf.data threads and prefetched, in order."""
        from resmobile_jax.data import tf_setup

        tf_setup.hide_accelerators_from_tensorflow()
        import tensorflow as tf

        p = self.preprocess
        local = self.columns.stop - self.columns.start

        def load(step):
            out = self.load(int(step))
            return out["image"], out["label"]

        def tf_load(step):
            images, labels = tf.numpy_function(load, [step], (tf.uint8, tf.int32), stateful=False)
            return {"image": tf.ensure_shape(images, (local, p.height, p.width, 3)), "label": tf.ensure_shape(labels, (local,))}

        options = tf.data.Options()
        options.threading.private_threadpool_size = max(1, self.workers)
        ds = (
            tf.data.Dataset.range(start_step, end_step)
            .map(tf_load, num_parallel_calls=self.workers, deterministic=True)
            .prefetch(2)
            .with_options(options)
        )
        yield from ds.as_numpy_iterator()


def eval_batches(images: ImageSet, preprocess: Preprocess, batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """(this process's part of each global eval batch, number of real items in the global batch). The last batch is
    padded with copies of item 0 so every batch has the same shape; callers drop the padding."""
    n = len(images)
    cols = process_columns(batch_size, process_index, process_count)
    for start in range(0, n, batch_size):
        index = np.arange(start, start + batch_size)
        real = int(min(batch_size, n - start))
        index[real:] = 0
        local = index[cols]
        batch = np.stack([preprocess.eval_image(images.images[i]) for i in local])
        yield {"image": batch, "label": images.labels[local]}, real
