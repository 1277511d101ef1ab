"""The jitted train step and the embedding step, written over graphdef + state pytrees so NNX costs nothing per step.

Both run under `jax.jit` on a batch sharded over the mesh's `data` axis with the state replicated: XLA inserts the
cross-device reductions, so BatchNorm statistics and pair losses see the global batch (no pmap, no manual psum).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from resmobile_jax.train.state import TrainState


def train_step(state: TrainState, batch: dict, *, graphdef, loss_fn: Callable, tx, loss_tx, schedule, ema_decay: float):
    """One optimizer update. `graphdef` is the model in train mode (BatchNorm uses and updates batch statistics)."""

    def objective(params, loss_params, batch_stats):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        embeddings = model(batch["image"])
        loss = loss_fn(embeddings, batch["label"], loss_params)
        return loss, nnx.state(model, nnx.BatchStat)

    (loss, batch_stats), (grads, loss_grads) = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
        state.params, state.loss_params, state.batch_stats
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss_updates, loss_opt_state = loss_tx.update(loss_grads, state.loss_opt_state, state.loss_params)
    loss_params = optax.apply_updates(state.loss_params, loss_updates)
    ema = state.ema_params
    if ema is not None:
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state.step), "finite": finite}
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, loss_params=loss_params,
        opt_state=opt_state, loss_opt_state=loss_opt_state, ema_params=ema,
    )
    return new_state, metrics


def make_train_step(graphdef, loss_fn, tx, loss_tx, schedule, ema_decay, state_sharding, batch_sharding, replicated):
    """jit(train_step) with explicit shardings; the old state's buffers are donated to the new one."""
    fn = functools.partial(
        train_step, graphdef=graphdef, loss_fn=loss_fn, tx=tx, loss_tx=loss_tx, schedule=schedule, ema_decay=ema_decay
    )
    return jax.jit(
        fn, in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated), donate_argnums=0
    )


def make_embed_step(graphdef, batch_sharding):
    """jit(images -> embeddings) with the model in eval mode (`graphdef` split from a model after `.eval()`)."""

    def embed(params, batch_stats, images):
        return nnx.merge(graphdef, params, batch_stats)(images)

    return jax.jit(embed, out_shardings=batch_sharding)
