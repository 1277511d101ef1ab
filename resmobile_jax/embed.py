"""Embedding a set of images with a model: batched, jitted, sharded over the mesh, padding dropped.

`python -m resmobile_jax.embed --checkpoint RUN_OR_MODEL --images DIR --out gallery.npz` embeds a folder into a
gallery file (`resmobile_jax.gallery`) that `python -m resmobile_jax.search` queries.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from resmobile_jax import cli, parallel
from resmobile_jax.data.pipeline import eval_batches
from resmobile_jax.data.preprocess import Preprocess, normalize
from resmobile_jax.data.sources import ImageSet


class EmbedFn:
    """jit((params, batch_stats, uint8 images) -> embeddings), taking the two states as their leaves. nnx.State
    flattens in Python, ~1 ms per call for this model's ~400 arrays: a quarter of the batch-1 latency at 64 px
    (measured). `bind` flattens them once; calls of what it returns pass a list of arrays (jit's C++ fast path)."""

    def __init__(self, graphdef, dtype, mesh):
        self._graphdef, self._dtype, self._out_sharding = graphdef, dtype, parallel.replicated(mesh)
        self._jitted = {}  # one jit per state structure (in practice one)

    def jitted(self, treedef):
        """jit((leaves of (params, batch_stats), images) -> embeddings) for states of structure `treedef`."""
        if treedef not in self._jitted:
            def embed(leaves, images):
                params, batch_stats = jax.tree.unflatten(treedef, leaves)
                return nnx.merge(self._graphdef, params, batch_stats)(normalize(images, self._dtype))

            self._jitted[treedef] = jax.jit(embed, out_shardings=self._out_sharding)
        return self._jitted[treedef]

    def bind(self, params, batch_stats) -> "BoundEmbedFn":
        leaves, treedef = jax.tree.flatten((params, batch_stats))
        return BoundEmbedFn(self.jitted(treedef), leaves)

    def __call__(self, params, batch_stats, images):
        return self.bind(params, batch_stats)(images)


class BoundEmbedFn(NamedTuple):
    """images -> embeddings with the weights bound; `jitted.lower(leaves, images)` compiles it ahead of time."""

    jitted: Callable
    leaves: list

    def __call__(self, images):
        return self.jitted(self.leaves, images)


def make_embed_fn(graphdef, dtype, mesh) -> EmbedFn:
    """(params, batch_stats, uint8 images) -> embeddings; `graphdef` must come from a model in eval mode."""
    return EmbedFn(graphdef, dtype, mesh)


def embed_images(embed_fn, params, batch_stats, images: ImageSet, preprocess: Preprocess, batch_size: int, mesh,
                 progress: bool = False) -> np.ndarray:
    """(N, D) float32 embeddings of every image, on every process."""
    sharding = parallel.batch_sharding(mesh)
    parallel.check_global_batch(batch_size, "data.eval_batch_size")
    batches = eval_batches(images, preprocess, batch_size, jax.process_index(), jax.process_count())
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(images) // batch_size), desc="embedding", unit="batch", leave=False)
    bound = embed_fn.bind(params, batch_stats)
    out = []
    for local, real in batches:
        emb = bound(jax.make_array_from_process_local_data(sharding, local["image"]))
        out.append(np.asarray(emb.addressable_data(0))[:real])  # replicated: every process holds all rows
    return np.concatenate(out)


def embed_files(loaded, paths: list[str], input_hw: tuple[int, int], batch_size: int = 64,
                progress: bool = False) -> np.ndarray:
    """(N, D) embeddings of image files with a loaded model (`evaluate.LoadedModel`), evaluation preprocessing."""
    from resmobile_jax.train.state import split_model

    mesh = parallel.data_mesh()
    devices = jax.device_count()
    batch_size = min(batch_size, -(-len(paths) // devices) * devices)  # a handful of queries: no 64-image padding
    graphdef, params, batch_stats = split_model(loaded.model)
    preprocess = Preprocess(*input_hw, eval_crop_fraction=float(loaded.config.data.eval_crop_fraction))
    fn = make_embed_fn(graphdef, jax.numpy.dtype(loaded.config.model.dtype), mesh)
    images = ImageSet(list(paths), np.zeros(len(paths), np.int32), [])
    return embed_images(fn, params, batch_stats, images, preprocess, batch_size, mesh, progress)


def model_input_hw(loaded, input_size=None) -> tuple[int, int]:
    """--input_size (H or HxW) when given, else the size the model was trained at."""
    from resmobile_jax.models import input_hw

    return cli.parse_size(input_size) if input_size else input_hw(loaded.config.model.input_size)


def main(argv):
    """python -m resmobile_jax.embed --checkpoint RUN_OR_MODEL --images DIR --out gallery.npz"""
    import sys
    import time

    from absl import flags

    from resmobile_jax.evaluate import load_checkpoint
    from resmobile_jax.checkpoint import model_fingerprint
    from resmobile_jax.gallery import Gallery, check_output, list_images, save_gallery

    cli.start_command(argv)
    f = flags.FLAGS
    try:
        check_output(f.out, f.overwrite)  # before any work
        loaded = load_checkpoint(f.checkpoint)
        hw = model_input_hw(loaded, f.input_size)
        paths, labels, class_names, skipped = list_images(f.images)
        print(f"embedding {len(paths)} images from {f.images} ({len(class_names)} labelled folders) with "
              f"{loaded.source} at {hw[0]}x{hw[1]}", flush=True)
        for path, reason in skipped[:10]:
            print(f"skipped {path}: {reason}", file=sys.stderr)
        if len(skipped) > 10:
            print(f"... and {len(skipped) - 10} more skipped files", file=sys.stderr)
        started = time.perf_counter()
        embeddings = embed_files(loaded, paths, hw, f.batch_size, progress=True)
        meta = {"model_sha256": model_fingerprint(loaded.model), "source": loaded.source,
                "checkpoint": str(Path(f.checkpoint).absolute()), "variant": loaded.model.variant,
                "embedding_dim": loaded.model.embedding_dim, "input_hw": list(hw),
                "images_root": str(Path(f.images).absolute()), "skipped_files": len(skipped)}
        out = save_gallery(f.out, Gallery(embeddings, paths, labels, class_names, meta), overwrite=f.overwrite)
    except ValueError as e:  # EvaluationError, GalleryError, DatasetError are ValueErrors with a message for the user
        sys.exit(f"error: {e}")
    print(f"wrote {out}: {len(paths)} embeddings of size {embeddings.shape[1]} in {time.perf_counter() - started:.1f} s"
          + (f"; {len(skipped)} files skipped" if skipped else ""))


if __name__ == "__main__":
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "a training run's workdir or a model checkpoint (convert to-flax --out)")
    flags.DEFINE_string("images", None, "folder of images; files in DIR/<class>/ are labelled <class>")
    flags.DEFINE_string("out", None, "gallery file to write (.npz)")
    flags.DEFINE_string("input_size", None, "H or HxW (default: the checkpoint's training size)")
    flags.DEFINE_integer("batch_size", 64, "images per jitted call")
    flags.DEFINE_bool("overwrite", False, "replace an existing --out")
    flags.mark_flags_as_required(["checkpoint", "images", "out"])
    cli.run(main)
