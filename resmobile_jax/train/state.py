"""The train state (one pytree, so jit, sharding and orbax see everything) and the optimizers that update it.

The network's parameters and the loss's learned class vectors (proxies) have separate optax chains, so proxies get
their own learning rate (proxy losses train badly when proxies move at the backbone's pace).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from resmobile_jax.losses import init_class_vectors
from resmobile_jax.models import ResMobileNet


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done; the data position is derived from it
    params: Any  # nnx.State of the network's nnx.Param leaves
    batch_stats: Any  # nnx.State of BatchNorm running statistics
    loss_params: Any  # {"proxies": (C, D)} for proxy losses, {} for pair losses
    opt_state: Any
    loss_opt_state: Any
    ema_params: Any  # exponential moving average of params, or None


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int, peak: float) -> optax.Schedule:
    """Linear warmup from 0 to `peak`, then cosine decay to `peak * final_lr_fraction` at `total_steps`."""
    warmup = int(opt.warmup_steps)
    if warmup >= total_steps:
        raise ValueError(
            f"optimizer.warmup_steps = {warmup} is not shorter than the run ({total_steps} steps); "
            f"lower optimizer.warmup_steps or train longer (num_epochs / num_steps)"
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=total_steps,
        end_value=peak * float(opt.final_lr_fraction),
    )


def decay_mask(params):
    """Weight decay applies to conv and linear kernels only, not to BatchNorm scales/biases or biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule, weight_decay: float) -> optax.GradientTransformation:
    chain = []
    if opt.grad_clip_norm:
        chain.append(optax.clip_by_global_norm(float(opt.grad_clip_norm)))
    if opt.name == "adamw":
        chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=weight_decay, mask=decay_mask))
    elif opt.name == "sgd":
        if weight_decay:
            chain.append(optax.add_decayed_weights(weight_decay, mask=decay_mask))
        chain.append(optax.sgd(schedule, momentum=opt.momentum, nesterov=bool(opt.nesterov)))
    else:
        raise ValueError(f"unknown optimizer.name {opt.name!r}; choose 'adamw' or 'sgd'")
    return optax.chain(*chain)


def make_optimizers(config: ml_collections.ConfigDict, total_steps: int):
    """(network optimizer, loss-parameter optimizer, network LR schedule)."""
    opt = config.optimizer
    schedule = learning_rate_schedule(opt, total_steps, float(opt.learning_rate))
    loss_schedule = learning_rate_schedule(opt, total_steps, float(opt.learning_rate) * float(opt.loss_lr_multiplier))
    return make_optimizer(opt, schedule, float(opt.weight_decay)), make_optimizer(opt, loss_schedule, 0.0), schedule


def split_model(model: ResMobileNet):
    """(graphdef, params, batch_stats); the model must already be in train or eval mode, which the graphdef keeps."""
    return nnx.split(model, nnx.Param, nnx.BatchStat)


def create_train_state(model: ResMobileNet, config: ml_collections.ConfigDict, num_classes: int, tx, loss_tx, uses_proxies: bool):
    _, params, batch_stats = split_model(model)
    loss_params = init_class_vectors(num_classes, config.model.embedding_dim, config.seed + 1) if uses_proxies else {}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        loss_params=loss_params,
        opt_state=tx.init(params),
        loss_opt_state=loss_tx.init(loss_params),
        ema_params=jax.tree.map(jnp.copy, params) if config.optimizer.ema_decay else None,
    )
