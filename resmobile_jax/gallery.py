"""Gallery files: embeddings of a folder of images plus what a later search needs to trust them.

A gallery (.npz, no pickles) holds `embeddings` (N, D) float32, `paths`, `labels` (-1 = unlabelled), `class_names`,
and `meta` (JSON): the fingerprint of the model that made the embeddings, its variant, embedding size and input
size. A search embeds its queries with a model and refuses a gallery made by any other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

FORMAT = "resmobile_jax.gallery/1"
UNLABELLED = -1


class GalleryError(ValueError):
    """A gallery that cannot be used as asked; printed as `error: ...`."""


@dataclasses.dataclass
class Gallery:
    embeddings: np.ndarray
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    meta: dict

    def check_model(self, fingerprint: str, embedding_dim: int, checkpoint: str) -> None:
        """Refuses to compare query embeddings of one model with a gallery embedded by another."""
        have = self.embeddings.shape[1]
        fix = f"re-embed the gallery with this model: python -m resmobile_jax.embed --checkpoint {checkpoint} ..."
        if have != embedding_dim:
            raise GalleryError(f"the gallery holds {have}-d embeddings but {checkpoint} makes {embedding_dim}-d ones: "
                               f"it was embedded by another model ({self.meta.get('source', '?')}); {fix}")
        if self.meta.get("model_sha256") != fingerprint:
            raise GalleryError(f"the gallery was embedded by another model (sha256 {self.meta.get('model_sha256', '?')[:12]}... "
                               f"from {self.meta.get('source', '?')}), not by {checkpoint} (sha256 {fingerprint[:12]}...); "
                               f"similarities between the two would be meaningless; {fix}")


def list_images(root: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str], list[tuple[str, str]]]:
    """Image files below `root`: (paths, labels, class names, skipped (path, reason)). Files inside a subfolder are
    labelled by the subfolder's name (`root/<class>/...`); files directly in `root` are unlabelled."""
    from resmobile_jax.data.sources import _image_files, check_image_file

    root = Path(root)
    if not root.is_dir():
        raise GalleryError(f"--images {root} does not exist or is not a directory")
    top, skipped = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.is_dir():
            continue
        found, rejected = _image_files_of(entry)
        top += found
        skipped += rejected
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths, labels = list(top), [UNLABELLED] * len(top)
    for label, d in enumerate(class_dirs):
        found, rejected = _image_files(d)
        paths += found
        labels += [label] * len(found)
        skipped += rejected
    keep = []
    for i, p in enumerate(paths):
        reason = check_image_file(p)
        if reason:
            skipped.append((p, reason))
        else:
            keep.append(i)
    if not keep:
        raise GalleryError(f"no readable image files under {root}" + (f" ({len(skipped)} skipped, e.g. {skipped[0][0]}: "
                                                                       f"{skipped[0][1]})" if skipped else ""))
    return [paths[i] for i in keep], np.asarray(labels, np.int32)[keep], [d.name for d in class_dirs], skipped


def _image_files_of(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    from resmobile_jax.data.sources import IMAGE_EXTENSIONS

    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return [str(path)], []
    return [], [(str(path), f"not an image file (extension not in {', '.join(IMAGE_EXTENSIONS)})")]


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Where a gallery may be written; embed calls it before any work, save_gallery again before writing."""
    path = Path(path)
    if path.suffix != ".npz":
        raise GalleryError(f"--out {path} must end in .npz")
    if path.exists() and not overwrite:
        raise GalleryError(f"{path} exists; pass --overwrite to replace it, or choose another --out")
    return path


def save_gallery(path: str | os.PathLike, gallery: Gallery, overwrite: bool = False) -> Path:
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, embeddings=gallery.embeddings.astype(np.float32), paths=np.asarray(gallery.paths, dtype=str),
             labels=gallery.labels.astype(np.int32), class_names=np.asarray(gallery.class_names, dtype=str),
             meta=np.asarray(json.dumps({"format": FORMAT, **gallery.meta})))
    tmp.replace(path)  # an interrupted write never replaces a good gallery with half of one
    return path


def load_gallery(path: str | os.PathLike) -> Gallery:
    path = Path(path)
    if not path.is_file():
        raise GalleryError(f"gallery {path} does not exist; make one with python -m resmobile_jax.embed")
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            if meta.get("format") != FORMAT:
                raise KeyError("format")
            return Gallery(np.asarray(f["embeddings"], np.float32), [str(p) for p in f["paths"]],
                           np.asarray(f["labels"], np.int32), [str(c) for c in f["class_names"]], meta)
    except (OSError, ValueError, KeyError) as e:
        raise GalleryError(f"{path} is not a gallery written by python -m resmobile_jax.embed "
                           f"({type(e).__name__}: {e})") from None
