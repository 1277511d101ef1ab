"""Similarity matrices, label masks and masked reductions shared by the pair-based losses.

Everything works on fixed-shape (B, D) batches with boolean masks instead of index lists, so the losses jit once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so masked rows give exp(.) = 0 without inf - inf = nan in gradients


def normalize(x, eps: float = 1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_matrix(a, b=None):
    a = normalize(a)
    return a @ (a if b is None else normalize(b)).T


def euclidean_matrix(x):
    """Distances between L2-normalized embeddings. Clamped before the sqrt so the diagonal's gradient is 0, not nan."""
    sq = jnp.maximum(2.0 - 2.0 * cosine_matrix(x), 0.0)
    return jnp.sqrt(jnp.maximum(sq, 1e-12)) * (sq > 1e-12)


def label_masks(labels):
    """(positive, negative) boolean (B, B) masks; an item is never its own positive."""
    same = labels[:, None] == labels[None, :]
    eye = jnp.eye(labels.shape[0], dtype=bool)
    return same & ~eye, ~same


def masked_logsumexp(x, mask, axis, add_one: bool):
    """log(sum_{mask} exp(x)) (+1 inside the log with add_one); 0 where the mask is empty."""
    x = jnp.where(mask, x, NEG_INF)
    if add_one:
        zeros = jnp.zeros_like(jnp.take(x, jnp.array([0]), axis=axis))
        x = jnp.concatenate([x, zeros], axis=axis)
    out = jax.nn.logsumexp(x, axis=axis)
    return jnp.where(jnp.any(mask, axis=axis), out, 0.0)


def mean_nonzero(losses, valid=None):
    """Mean over the positive entries (pytorch-metric-learning's AvgNonZeroReducer); 0 if there are none."""
    valid = jnp.ones_like(losses, dtype=bool) if valid is None else valid
    active = valid & (losses > 0)
    return jnp.sum(jnp.where(active, losses, 0.0)) / jnp.maximum(jnp.sum(active), 1)


def masked_mean(losses, mask):
    return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
