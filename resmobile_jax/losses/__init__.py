"""Metric-learning losses, selected by `config.loss.name`.

Every loss takes (embeddings (B, D), integer labels (B,), loss_params) and returns a scalar; pair losses ignore
loss_params (it is {}), proxy losses read `loss_params["proxies"]`. All are jit-able on fixed shapes.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

from resmobile_jax.losses import pair_losses, proxy_losses


class Loss(NamedTuple):
    fn: Callable  # (embeddings, labels, params) -> scalar
    uses_proxies: bool  # learned class vectors in the train state
    wants_pk_batches: bool  # needs several images per class in a batch


def _pair(fn):
    return lambda embeddings, labels, params, **kw: fn(embeddings, labels, **kw)


LOSSES: dict[str, Loss] = {
    "triplet": Loss(_pair(pair_losses.triplet_batch_hard), False, True),
    "contrastive": Loss(_pair(pair_losses.contrastive), False, True),
    "multi_similarity": Loss(_pair(pair_losses.multi_similarity), False, True),
    "supcon": Loss(_pair(pair_losses.supcon), False, True),
    "ntxent": Loss(_pair(pair_losses.ntxent), False, True),
    "arcface": Loss(proxy_losses.arcface, True, False),
    "cosface": Loss(proxy_losses.cosface, True, False),
    "proxy_anchor": Loss(proxy_losses.proxy_anchor, True, False),
    "normalized_softmax": Loss(proxy_losses.normalized_softmax, True, False),
}


def get_loss(name: str, **hyperparameters) -> Loss:
    """The loss `name` with its hyperparameters bound (e.g. margin=0.1); unknown names list the choices."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    loss = LOSSES[name]
    return loss._replace(fn=functools.partial(loss.fn, **hyperparameters))


init_class_vectors = proxy_losses.init_class_vectors
