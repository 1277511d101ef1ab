"""Metric-learning losses, selected by `config.loss.name`.

Every loss takes (embeddings (B, D), integer labels (B,), loss_params) and returns a scalar; pair losses ignore
loss_params (it is {}), proxy losses read `loss_params["proxies"]`. All are jit-able on fixed shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

from resmobile_jax.losses import pair_losses, proxy_losses


class Loss(NamedTuple):
    fn: Callable  # (embeddings, labels, params) -> scalar
    uses_proxies: bool  # learned class vectors in the train state
    wants_pk_batches: bool  # needs several images per class in a batch


def _pair(fn):
    def loss(embeddings, labels, params, **kw):
        return fn(embeddings, labels, **kw)

    loss.__wrapped_loss__ = fn  # parse_hparams reads the real signature
    return loss


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


def parse_hparams(name: str, text: str) -> dict[str, float]:
    """'margin=0.2,scale=32' -> {'margin': 0.2, 'scale': 32.0}, checked against the loss's keyword arguments."""
    import inspect

    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    fn = LOSSES[name].fn
    target = getattr(fn, "__wrapped_loss__", fn)
    allowed = [p.name for p in inspect.signature(target).parameters.values() if p.default is not inspect.Parameter.empty]
    out = {}
    for item in filter(None, (part.strip() for part in str(text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"loss.hparams item {item!r} is not name=value (e.g. margin=0.2)")
        if key.strip() not in allowed:
            raise ValueError(f"loss {name!r} has no hyperparameter {key.strip()!r}; it takes {', '.join(allowed) or 'none'}")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"loss.hparams {key.strip()}={value!r} is not a number") from None
    return out
