"""Losses against learned per-class vectors (proxies / classifier weights). They train well with plain shuffled
batches. The class vectors live in the train state as `loss_params` with their own learning rate."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from resmobile_jax.losses.pairs import cosine_matrix, masked_logsumexp


def init_class_vectors(num_classes: int, embedding_dim: int, seed: int = 0) -> dict:
    """Proxies (C, D), fan-out He normal as pytorch-metric-learning initializes ProxyAnchor's; only directions matter."""
    rng = np.random.default_rng(seed)
    return {"proxies": jnp.asarray(rng.standard_normal((num_classes, embedding_dim), dtype=np.float32) * math.sqrt(2.0 / num_classes))}


def _cross_entropy(logits, labels):
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0])


def normalized_softmax(embeddings, labels, params, temperature: float = 0.05):
    """Normalized softmax (Zhai & Wu 2018): cross-entropy over cos(embedding, class vector) / temperature."""
    return _cross_entropy(cosine_matrix(embeddings, params["proxies"]) / temperature, labels)


def cosface(embeddings, labels, params, margin: float = 0.35, scale: float = 64.0):
    """CosFace (Wang et al. 2018): the target logit is cos - margin, all logits scaled."""
    cos = cosine_matrix(embeddings, params["proxies"])
    onehot = jax.nn.one_hot(labels, cos.shape[1], dtype=cos.dtype)
    return _cross_entropy(scale * (cos - margin * onehot), labels)


def arcface(embeddings, labels, params, margin_degrees: float = 28.6, scale: float = 64.0):
    """ArcFace (Deng et al. 2019): the target logit is cos(theta + m); past theta = pi - m, the monotonic
    continuation cos(theta) - m sin(m) (as pytorch-metric-learning does)."""
    m = math.radians(margin_degrees)
    cos = cosine_matrix(embeddings, params["proxies"])
    onehot = jax.nn.one_hot(labels, cos.shape[1], dtype=bool)
    theta = jnp.arccos(jnp.clip(cos, -1.0 + 1e-7, 1.0 - 1e-7))
    target = jnp.where(theta <= math.pi - m, jnp.cos(theta + m), cos - m * math.sin(m))
    return _cross_entropy(scale * jnp.where(onehot, target, cos), labels)


def proxy_anchor(embeddings, labels, params, margin: float = 0.1, alpha: float = 32.0):
    """Proxy-Anchor (Kim et al. 2020): each proxy pulls its class's batch items and pushes the others; the positive
    term is averaged over the proxies present in the batch, the negative term over all proxies."""
    cos = cosine_matrix(embeddings, params["proxies"])  # (B, C)
    pos = jax.nn.one_hot(labels, cos.shape[1], dtype=bool)
    pos_term = masked_logsumexp(-alpha * (cos - margin), pos, axis=0, add_one=True)
    neg_term = masked_logsumexp(alpha * (cos + margin), ~pos, axis=0, add_one=True)
    num_present = jnp.maximum(jnp.sum(jnp.any(pos, axis=0)), 1)
    return jnp.sum(pos_term) / num_present + jnp.sum(neg_term) / cos.shape[1]
