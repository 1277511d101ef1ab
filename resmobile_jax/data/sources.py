"""Where images come from: the embedded Fashion-MNIST, any TFDS catalog dataset, or a folder of labelled images.

Every source returns `ImageSet`s: labels plus images held either as decoded uint8 arrays (small datasets) or as
encoded bytes / file paths that the input pipeline decodes on the fly. Problems are found here, before anything
compiles: unknown dataset names, empty classes, files that do not decode (counted, listed, skipped or fatal).
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from resmobile_jax.data.idx import CLASS_NAMES as FASHION_MNIST_CLASSES
from resmobile_jax.data.idx import DEBIAN_DIR, DatasetError, load_fashion_mnist

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # animated: the first frame
MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused (decompression bombs), not decoded


@dataclasses.dataclass
class ImageSet:
    """`images` is a uint8 array (N, H, W) / (N, H, W, C), or a length-N sequence of encoded bytes or file paths."""

    images: np.ndarray | Sequence
    labels: np.ndarray  # int32 (N,)
    class_names: list[str]  # indexed by label

    def __post_init__(self):
        self.labels = np.asarray(self.labels, np.int32)
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> ImageSet:
        images = self.images[index] if isinstance(self.images, np.ndarray) else [self.images[i] for i in index]
        return ImageSet(images, self.labels[index], self.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def concatenate(sets: Sequence[ImageSet]) -> ImageSet:
    if all(isinstance(s.images, np.ndarray) for s in sets):
        images = np.concatenate([s.images for s in sets])
    else:
        images = [x for s in sets for x in s.images]
    return ImageSet(images, np.concatenate([s.labels for s in sets]), list(sets[0].class_names))


# ---------------------------------------------------------------- Fashion-MNIST, offline first


def fashion_mnist(split: str, manual_dir: str | None = None, data_dir: str | None = None) -> ImageSet:
    """From the IDX files (Debian's dataset-fashion-mnist or `manual_dir`); TFDS's copy where those are absent."""
    directory = manual_dir or DEBIAN_DIR
    if Path(directory, "train-images-idx3-ubyte.gz").is_file() or manual_dir:
        images, labels = load_fashion_mnist(split, directory)
        return ImageSet(images, labels, list(FASHION_MNIST_CLASSES))
    try:
        return tfds_split("fashion_mnist", split, data_dir=data_dir)
    except DatasetError as e:
        raise DatasetError(
            f"Fashion-MNIST not found: no IDX files in {DEBIAN_DIR} and TFDS could not provide it ({e}). "
            f"Offline: `apt-get install dataset-fashion-mnist`, or set config.data.manual_dir to a folder with the four "
            f"*-ubyte.gz files"
        ) from None


# ---------------------------------------------------------------- TFDS catalog


def tfds_split(name: str, split: str, *, data_dir=None, manual_dir=None, image_key="image", label_key="label") -> ImageSet:
    """One split of a TFDS catalog dataset, images kept encoded (decoded in the input pipeline)."""
    from resmobile_jax.data import tf_setup

    tf_setup.hide_accelerators_from_tensorflow()
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        close = [n for n in tfds.list_builders() if name.replace("-", "_").lower()[:4] in n][:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise DatasetError(
            f"{name!r} is not a TFDS catalog dataset.{hint} Use config.data.dataset='fashion_mnist' (built in), "
            f"'folder' with config.data.folder=PATH for your own images, or a name from "
            f"https://www.tensorflow.org/datasets/catalog"
        ) from None
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as e:  # network errors, checksum mismatches, manual downloads missing
        raise DatasetError(
            f"TFDS could not prepare {name!r} in {builder.data_dir}: {type(e).__name__}: {str(e)[:300]}. "
            f"Prepare it once on a machine with internet (it is cached in data_dir), or place the files it asks for in "
            f"config.data.manual_dir"
        ) from None
    info = builder.info
    if split not in info.splits:
        raise DatasetError(f"{name} has no split {split!r}; it has {', '.join(info.splits)}")
    for key in (image_key, label_key):
        if key not in info.features:
            raise DatasetError(
                f"{name} has no feature {key!r} (features: {', '.join(info.features)}); set config.data.image_key / label_key"
            )
    ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    images, labels = [], []
    for ex in tfds.as_numpy(ds):
        images.append(bytes(ex[image_key]))
        labels.append(int(ex[label_key]))
    names = info.features[label_key].names if hasattr(info.features[label_key], "names") else None
    class_names = list(names) if names else [str(i) for i in range(max(labels, default=-1) + 1)]
    return ImageSet(images, np.asarray(labels), class_names)


# ---------------------------------------------------------------- image folders


@dataclasses.dataclass
class FolderScan:
    files: list[str]
    labels: np.ndarray
    class_names: list[str]
    bad_files: list[tuple[str, str]]  # (path, reason)


def _list_class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Image files below a class folder (recursively, symlinks not followed into loops), hidden entries skipped."""
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
            else:
                skipped.append((path, f"not an image file (extension not in {', '.join(IMAGE_EXTENSIONS)})"))
    return files, skipped


def check_image_file(path: str | bytes) -> str | None:
    """None if the file decodes completely to an RGB-convertible image, else the reason it does not."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                return f"{im.width}x{im.height} pixels, above the {MAX_IMAGE_PIXELS:,} limit"
            im.load()
            im.convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        return f"cannot decode: {type(e).__name__}: {e}"
    return None


def scan_folder(root: str | os.PathLike, validate: bool = True, progress: bool = False) -> FolderScan:
    """`root/<class>/**/*.{jpg,png,...}`: classes are the sorted subfolder names."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory (config.data.folder)")
    class_dirs = _list_class_dirs(root)
    if not class_dirs:
        raise DatasetError(f"{root} has no class subfolders; expected {root}/<class name>/<image files>")
    files, labels, bad, empty = [], [], [], []
    for label, d in enumerate(class_dirs):
        found, skipped = _image_files(d)
        bad.extend(skipped)
        if not found:
            empty.append(d.name)
        files.extend(found)
        labels.extend([label] * len(found))
    if empty:
        raise DatasetError(
            f"{len(empty)} class folder(s) in {root} hold no image files ({', '.join(IMAGE_EXTENSIONS)}): "
            f"{', '.join(empty[:20])}; remove them or add images"
        )
    keep = np.ones(len(files), bool)
    if validate:
        iterator = range(len(files))
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc=f"checking images in {root}", unit="img", leave=False)
        for i in iterator:
            reason = check_image_file(files[i])
            if reason:
                bad.append((files[i], reason))
                keep[i] = False
    files = [f for f, k in zip(files, keep) if k]
    return FolderScan(files, np.asarray(labels, np.int32)[keep], [d.name for d in class_dirs], bad)


def folder(root: str | os.PathLike, progress: bool = False) -> tuple[ImageSet, list[tuple[str, str]]]:
    scan = scan_folder(root, progress=progress)
    return ImageSet(scan.files, scan.labels, scan.class_names), scan.bad_files
