"""Embedding a set of images with a model: batched, jitted, sharded over the mesh, padding dropped."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from resmobile_jax import parallel
from resmobile_jax.data.pipeline import eval_batches
from resmobile_jax.data.preprocess import Preprocess, normalize
from resmobile_jax.data.sources import ImageSet


def make_embed_fn(graphdef, dtype, mesh):
    """jit((params, batch_stats, uint8 images) -> embeddings); `graphdef` must come from a model in eval mode."""

    def embed(params, batch_stats, images):
        return nnx.merge(graphdef, params, batch_stats)(normalize(images, dtype))

    return jax.jit(embed, out_shardings=parallel.replicated(mesh))


def embed_images(embed_fn, params, batch_stats, images: ImageSet, preprocess: Preprocess, batch_size: int, mesh,
                 progress: bool = False) -> np.ndarray:
    """(N, D) float32 embeddings of every image, on every process."""
    sharding = parallel.batch_sharding(mesh)
    parallel.check_global_batch(batch_size, "data.eval_batch_size")
    batches = eval_batches(images, preprocess, batch_size, jax.process_index(), jax.process_count())
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-len(images) // batch_size), desc="embedding", unit="batch", leave=False)
    out = []
    for local, real in batches:
        emb = embed_fn(params, batch_stats, jax.make_array_from_process_local_data(sharding, local["image"]))
        out.append(np.asarray(emb.addressable_data(0))[:real])  # replicated: every process holds all rows
    return np.concatenate(out)
