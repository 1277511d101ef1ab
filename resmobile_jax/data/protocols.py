"""Turning a dataset into (train set, evaluation set) under one of the two retrieval protocols.

- closed_set: train and evaluation share classes (e.g. Fashion-MNIST train -> test); the evaluation set is queried
  leave-one-out against itself.
- class_disjoint: the classes are split, the model trains on some and is evaluated on unseen ones (the CUB-200 /
  Cars-196 / SOP protocol). By default the first half of the sorted class ids trains, as in those benchmarks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

from resmobile_jax.data import sources
from resmobile_jax.data.idx import DatasetError
from resmobile_jax.data.sources import ImageSet

PROTOCOLS = ("closed_set", "class_disjoint")


@dataclasses.dataclass
class Splits:
    train: ImageSet  # labels remapped to 0..C_train-1 (proxy losses need contiguous class ids)
    eval: ImageSet
    bad_files: list[tuple[str, str]]  # files that did not decode, skipped
    description: str


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: a seeded permutation, ceil(fraction * n) to test (at least one), the rest to train."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(np.ceil(test_fraction * len(idx))))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.asarray(train, np.int64)), np.sort(np.asarray(test, np.int64))


def _remap(s: ImageSet) -> ImageSet:
    classes = np.unique(s.labels)
    lookup = np.full(max(s.num_classes, int(classes.max(initial=0)) + 1), -1, np.int32)
    lookup[classes] = np.arange(len(classes), dtype=np.int32)
    return ImageSet(s.images, lookup[s.labels], [s.class_names[c] for c in classes])


def _disjoint_class_count(value, num_classes: int) -> int:
    n = int(round(value * num_classes)) if 0 < value < 1 else int(value)
    if not 1 <= n < num_classes:
        raise DatasetError(
            f"data.train_classes = {value} leaves no classes for training or for evaluation ({num_classes} classes); "
            f"use a fraction in (0, 1) or a count in [1, {num_classes - 1}]"
        )
    return n


def _check_closed_set_classes(labels: np.ndarray, class_names: list[str], where: str) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    single = [class_names[c] for c in np.flatnonzero(counts == 1)]
    if single:
        raise DatasetError(
            f"{len(single)} class(es) in {where} have a single image, which cannot go to both training and "
            f"evaluation: {', '.join(single[:20])}; add images, remove the class, or use data.protocol='class_disjoint'"
        )


def load_splits(data: ml_collections.ConfigDict, seed: int, progress: bool = False) -> Splits:
    if data.protocol not in PROTOCOLS:
        raise DatasetError(f"unknown data.protocol {data.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    bad: list[tuple[str, str]] = []
    name = data.dataset
    if name == "folder":
        if not data.folder:
            raise DatasetError("data.dataset='folder' needs data.folder=PATH (root/<class>/* or root/{train,test}/<class>/*)")
        root = Path(data.folder)
        if (root / "train").is_dir() and (root / "test").is_dir():
            train, bad_train = sources.folder(root / "train", progress)
            test, bad_test = sources.folder(root / "test", progress)
            bad = bad_train + bad_test
            if train.class_names != test.class_names and data.protocol == "closed_set":
                raise DatasetError(f"{root}/train and {root}/test hold different class folders; closed-set needs the same")
            pools = [train, test]
        else:
            everything, bad = sources.folder(root, progress)
            if data.protocol == "closed_set":
                _check_closed_set_classes(everything.labels, everything.class_names, str(root))
                tr, te = _stratified_split(everything.labels, float(data.test_fraction), seed)
                pools = [everything.subset(tr), everything.subset(te)]
            else:
                pools = [everything]
        where = str(root)
    else:
        if name == "fashion_mnist":
            load = lambda split: sources.fashion_mnist(split, data.manual_dir or None, data.data_dir or None)
        else:
            load = lambda split: sources.tfds_split(
                name, split, data_dir=data.data_dir or None, manual_dir=data.manual_dir or None,
                image_key=data.image_key, label_key=data.label_key,
            )
        pools = [load(data.train_split), load(data.eval_split)]
        where = f"{name} {data.train_split}/{data.eval_split}"

    if data.protocol == "closed_set":
        train, evaluation = pools
        desc = f"{where}, closed-set: {len(train)} train / {len(evaluation)} eval images, {train.num_classes} classes"
    else:
        everything = sources.concatenate(pools) if len(pools) > 1 else pools[0]
        classes = np.unique(everything.labels)
        n_train = _disjoint_class_count(float(data.train_classes), len(classes))
        is_train = np.isin(everything.labels, classes[:n_train])
        train, evaluation = everything.subset(np.flatnonzero(is_train)), everything.subset(np.flatnonzero(~is_train))
        desc = (
            f"{where}, class-disjoint: {n_train} train classes ({len(train)} images) / "
            f"{len(classes) - n_train} unseen eval classes ({len(evaluation)} images)"
        )
    if data.max_eval_images and len(evaluation) > data.max_eval_images:
        keep, _ = _stratified_split(evaluation.labels, 1 - data.max_eval_images / len(evaluation), seed)
        evaluation = evaluation.subset(keep)
        desc += f" (eval subsampled to {len(evaluation)}, stratified)"
    train, evaluation = _remap(train), _remap(evaluation)
    if evaluation.num_classes < 2:
        raise DatasetError(f"the evaluation set ({where}) has {evaluation.num_classes} class; retrieval needs at least 2")
    return Splits(train, evaluation, bad, desc)
