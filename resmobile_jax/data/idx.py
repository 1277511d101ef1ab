"""Fashion-MNIST from its four IDX files, read with NumPy: offline, no TensorFlow needed.

Debian's `dataset-fashion-mnist` package installs the same four files TFDS's `fashion_mnist` builder downloads, in
/usr/share/datasets/fashion-mnist/; their gzip bytes differ from TFDS's registered checksums, so we parse them
directly (the decompressed content is what is checked here: magic numbers, shapes, label range).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_MAGIC = {3: 2051, 1: 2049}  # idx3 (images), idx1 (labels), unsigned bytes


class DatasetError(ValueError):
    """Dataset files missing or malformed; the message says which and what to do."""


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read ({e}); the file is truncated or not gzip") from None
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != _MAGIC[ndim]:
        raise DatasetError(f"{path}: magic number {magic}, expected {_MAGIC[ndim]} (an idx{ndim}-ubyte file)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(f"{path}: header says {shape} but the file holds {body.size} values (truncated?)")
    return body.reshape(shape)


def load_fashion_mnist(split: str, directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int32 (N,)) for split 'train' (60,000) or 'test' (10,000)."""
    if split not in FILES:
        raise DatasetError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    directory = Path(directory or DEBIAN_DIR)
    image_file, label_file = (directory / name for name in FILES[split])
    for f in (image_file, label_file):
        if not f.is_file():
            raise DatasetError(
                f"Fashion-MNIST file {f} not found. Offline: `apt-get install dataset-fashion-mnist` (installs "
                f"{DEBIAN_DIR}); or point config.data.manual_dir at a folder holding the four *-ubyte.gz files"
            )
    images, labels = read_idx(image_file, 3), read_idx(label_file, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise DatasetError(f"{label_file}: label {labels.max()} outside 0-9")
    return images, labels.astype(np.int32)
