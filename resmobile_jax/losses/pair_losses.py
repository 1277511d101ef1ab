"""Losses on pairs within the batch (need several images per class: use P x K batches).

Definitions and defaults follow pytorch-metric-learning, which the tests use as the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resmobile_jax.losses.pairs import (
    NEG_INF,
    cosine_matrix,
    euclidean_matrix,
    label_masks,
    masked_logsumexp,
    masked_mean,
    mean_nonzero,
)


def triplet_batch_hard(embeddings, labels, margin: float = 0.05):
    """Triplet loss with batch-hard mining (Hermans et al. 2017): per anchor, the farthest positive and the nearest
    negative; relu(d_ap - d_an + margin), averaged over the non-zero triplets."""
    d = euclidean_matrix(embeddings)
    pos, neg = label_masks(labels)
    hardest_pos = jnp.max(jnp.where(pos, d, -jnp.inf), axis=1)
    hardest_neg = jnp.min(jnp.where(neg, d, jnp.inf), axis=1)
    valid = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
    losses = jax.nn.relu(jnp.where(valid, hardest_pos - hardest_neg, 0.0) + margin)
    return mean_nonzero(losses, valid)


def contrastive(embeddings, labels, pos_margin: float = 0.0, neg_margin: float = 1.0):
    """Contrastive loss (Hadsell et al. 2006) over all pairs: positives pulled within pos_margin, negatives pushed
    beyond neg_margin; each side averaged over its non-zero pairs."""
    d = euclidean_matrix(embeddings)
    pos, neg = label_masks(labels)
    return mean_nonzero(jax.nn.relu(d - pos_margin), pos) + mean_nonzero(jax.nn.relu(neg_margin - d), neg)


def multi_similarity(embeddings, labels, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, epsilon: float = 0.1):
    """Multi-similarity loss with its miner (Wang et al. 2019), on cosine similarity.

    The miner keeps a positive if it is less similar than the most similar negative + epsilon, and a negative if
    it is more similar than the least similar positive - epsilon.
    """
    s = cosine_matrix(embeddings)
    pos, neg = label_masks(labels)
    max_neg = jnp.max(jnp.where(neg, s, -jnp.inf), axis=1, keepdims=True)
    min_pos = jnp.min(jnp.where(pos, s, jnp.inf), axis=1, keepdims=True)
    s_ng = jax.lax.stop_gradient(s)
    pos_kept = pos & (s_ng - epsilon < max_neg)
    neg_kept = neg & (s_ng + epsilon > min_pos)
    any_pairs = jnp.any(pos) & jnp.any(neg)
    pos_loss = masked_logsumexp(alpha * (base - s), pos_kept, axis=1, add_one=True) / alpha
    neg_loss = masked_logsumexp(beta * (s - base), neg_kept, axis=1, add_one=True) / beta
    return jnp.where(any_pairs, jnp.mean(pos_loss + neg_loss), 0.0)


def supcon(embeddings, labels, temperature: float = 0.1):
    """Supervised contrastive loss (Khosla et al. 2020): per anchor, the mean log-probability of its positives among
    all other items; averaged over anchors with a non-zero loss."""
    s = cosine_matrix(embeddings) / temperature
    pos, neg = label_masks(labels)
    s = s - jax.lax.stop_gradient(jnp.max(s, axis=1, keepdims=True))
    log_prob = s - masked_logsumexp(s, pos | neg, axis=1, add_one=False)[:, None]
    mean_log_prob_pos = jnp.sum(jnp.where(pos, log_prob, 0.0), axis=1) / (jnp.sum(pos, axis=1) + 1e-16)
    return jnp.where(jnp.any(pos) & jnp.any(neg), mean_nonzero(-mean_log_prob_pos), 0.0)


def ntxent(embeddings, labels, temperature: float = 0.07):
    """NT-Xent / InfoNCE (Chen et al. 2020) with labels: every positive pair (a, p) against a's negatives,
    averaged over positive pairs."""
    s = cosine_matrix(embeddings) / temperature
    pos, neg = label_masks(labels)
    neg_s = jnp.where(neg, s, NEG_INF)  # (B, B): row a's negatives
    # For pair (a, p): -log(exp(s_ap) / (exp(s_ap) + sum_n exp(s_an))) = logaddexp(s_ap, lse_n s_an) - s_ap
    lse_neg = jax.nn.logsumexp(neg_s, axis=1, keepdims=True)
    losses = jnp.logaddexp(s, lse_neg) - s
    return jnp.where(jnp.any(pos) & jnp.any(neg), masked_mean(losses, pos), 0.0)
