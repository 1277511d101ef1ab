"""The parts around the model: the input pipeline alone (is training input-bound?) and exact kNN over a large
gallery (how long evaluation and search take at 100k items)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from resmobile_jax.data.idx import DatasetError
from resmobile_jax.data.pipeline import TrainBatches
from resmobile_jax.data.preprocess import Preprocess
from resmobile_jax.data.sources import ImageSet, fashion_mnist, folder


def pipeline_images_per_second(images: ImageSet, size: int, batch: int, steps: int, workers: int = 2) -> float:
    """Training batches (decode, random-resized crop, flip) as the train loop consumes them, with nothing else running."""
    batches = TrainBatches(images, Preprocess(size, size, (0.08, 1.0)), batch, 0, None, workers=workers)
    it = batches.iterate(0, steps + 2)
    next(it), next(it)  # tf.data start-up
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch / (time.perf_counter() - t)


def write_jpeg_folder(root: Path, source: ImageSet, per_class: int, size: int) -> Path:
    """A small image-folder dataset of real JPEG files (Fashion-MNIST items, upscaled to `size`, RGB, quality 90),
    the format users' own data comes in."""
    from PIL import Image

    for label, name in enumerate(source.class_names):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(source.labels == label)[:per_class]):
            im = Image.fromarray(np.asarray(source.images[i])).convert("RGB").resize((size, size), Image.BILINEAR)
            im.save(root / name / f"{j:05d}.jpg", quality=90)
    return root


def default_train_images() -> ImageSet:
    """The embedded default data's training split (Fashion-MNIST); a DatasetError saying how to install it, or to run
    the bench with --pipeline=false, when it is missing."""
    try:
        return fashion_mnist("train")
    except DatasetError as e:
        raise DatasetError(f"{e}. Or run the bench with --pipeline=false to skip the input-pipeline measurement.") from e


def input_pipeline(train: ImageSet, default_size: int, default_batch: int, jpeg_size: int, jpeg_batch: int = 32,
                   steps: int = 20) -> dict:
    """Pipeline throughput on the embedded default data (`train`) at the default settings, and on a folder of JPEGs
    (at the bench's train-step size and batch, so the two compare)."""
    out = {"fashion_mnist": {"size": default_size, "batch": default_batch,
                             "images_per_second": pipeline_images_per_second(train, default_size, default_batch, steps)}}
    with tempfile.TemporaryDirectory() as tmp:
        images, _ = folder(write_jpeg_folder(Path(tmp), train, 64, 256))
        out["jpeg_folder"] = {"size": jpeg_size, "batch": jpeg_batch, "source_pixels": 256,
                              "images_per_second": pipeline_images_per_second(images, jpeg_size, jpeg_batch, 16)}
    return out


def knn_throughput(gallery_size: int, queries: int, dim: int = 512, k: int = 5) -> dict:
    """Exact top-k cosine search of `queries` random unit vectors against a `gallery_size` gallery (the evaluation's
    chunked kNN), extrapolated to querying every gallery item (leave-one-out over the whole gallery)."""
    from resmobile_jax.retrieval import knn

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((gallery_size, dim), dtype=np.float32)
    q = gallery[:queries]
    knn(q[:1024], gallery, k=k)  # compile
    t = time.perf_counter()
    knn(q, gallery, k=k)
    seconds = time.perf_counter() - t
    return {"gallery": gallery_size, "queries": queries, "dim": dim, "k": k, "seconds": seconds,
            "queries_per_second": queries / seconds, "all_vs_all_seconds": seconds * gallery_size / queries}
