"""The embedding head: GAP -> Linear -> BatchNorm1d -> ReLU -> L2 normalize."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resmobile_jax.models.layers import RESNET_BN, BatchNorm, Linear, global_avg_pool, linear_init


def l2_normalize(x, eps: float = 1e-12):
    """F.normalize(x, dim=-1): x / max(||x||, eps), in float32 so retrieval sees unit vectors at any compute dtype."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class EmbeddingHead(nnx.Module):
    """Maps the 160-channel feature map to a unit-norm D-dim embedding (always float32).

    ReLU before normalizing means embeddings live in the positive orthant; kept because the user's production
    model does it.
    """

    def __init__(self, in_channels: int, embedding_dim: int, *, dtype=None, param_dtype=jnp.float32, rng: np.random.Generator):
        self.fc = Linear(in_channels, embedding_dim, kernel_init=linear_init, dtype=dtype, param_dtype=param_dtype, rng=rng)
        self.bn = BatchNorm(embedding_dim, dtype=dtype, param_dtype=param_dtype, **RESNET_BN)

    def __call__(self, x):
        return l2_normalize(jax.nn.relu(self.bn(self.fc(global_avg_pool(x)))))
