"""Batch orders: class-balanced P x K batches for pair losses, plain shuffled batches for proxy losses.

Both are pure functions of (seed, epoch), so any process can recompute the order, and a run resumes from
(epoch, batch index) without storing the order. Every batch has the full, fixed size (the last partial batch of an
epoch is dropped), so jitted steps compile once.
"""

from __future__ import annotations

import numpy as np


def check_pk(labels: np.ndarray, p: int, k: int, batch_size: int) -> None:
    """Clear errors for P x K settings that cannot work, before anything compiles."""
    classes, counts = np.unique(labels, return_counts=True)
    if p * k != batch_size:
        raise ValueError(f"P x K = {p} x {k} = {p * k} does not equal the batch size {batch_size}; set data.p and data.k so that P*K == batch size")
    if k < 2:
        raise ValueError(f"K = {k}: pair losses need at least 2 images of a class per batch (data.k >= 2)")
    if p < 2:
        raise ValueError(f"P = {p}: pair losses need at least 2 classes per batch for negatives (data.p >= 2)")
    if p > len(classes):
        raise ValueError(f"P = {p} classes per batch, but the training split has only {len(classes)} classes; lower data.p")
    usable = int(np.sum(counts >= 2))
    if usable < p:
        raise ValueError(f"only {usable} classes have 2 or more images, fewer than P = {p}; lower data.p or add images")


def pk_batches(labels: np.ndarray, p: int, k: int, seed: int, epoch: int) -> np.ndarray:
    """(num_batches, P*K) indices into `labels`: each batch is K images of each of P distinct classes.

    Every class with >= 2 images takes part. Images are drawn without replacement per class, reshuffled when a class
    runs out; a class with fewer than K images repeats some within the batch. Classes are chosen in proportion to
    their remaining images, so an epoch sees each image about once.
    """
    rng = np.random.default_rng([seed, epoch])
    classes = [c for c in np.unique(labels) if np.sum(labels == c) >= 2]
    pools = {c: np.flatnonzero(labels == c) for c in classes}
    queues = {c: list(rng.permutation(pools[c])) for c in classes}
    num_batches = len(labels) // (p * k)
    batches = np.empty((num_batches, p * k), dtype=np.int64)
    for b in range(num_batches):
        weights = np.array([max(len(queues[c]), 1) for c in classes], dtype=np.float64)
        chosen = rng.choice(len(classes), size=p, replace=False, p=weights / weights.sum())
        row = []
        for ci in chosen:
            c = classes[ci]
            for _ in range(k):
                if not queues[c]:
                    queues[c] = list(rng.permutation(pools[c]))
                row.append(queues[c].pop())
        batches[b] = row
    return batches


def shuffled_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """(num_batches, batch_size) indices: a fresh permutation per epoch, last partial batch dropped."""
    if batch_size > num_items:
        raise ValueError(f"batch size {batch_size} is larger than the {num_items} training images")
    order = np.random.default_rng([seed, epoch]).permutation(num_items)
    n = num_items // batch_size
    return order[: n * batch_size].reshape(n, batch_size)
