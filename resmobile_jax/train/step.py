"""The jitted train step and the embedding step, written over graphdef + state pytrees so NNX costs nothing per step.

Both run under `jax.jit` on a batch sharded over the mesh's `data` axis with the state replicated: XLA inserts the
cross-device reductions, so BatchNorm statistics and pair losses see the global batch (no pmap, no manual psum).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from resmobile_jax.data.preprocess import normalize
from resmobile_jax.train.state import TrainState


def train_step(state: TrainState, batch: dict, *, graphdef, loss_fn: Callable, tx, loss_tx, schedule, ema_decay: float,
               dtype=jnp.float32, skip_nonfinite: bool = False):
    """One optimizer update on uint8 images. `graphdef` is the model in train mode (BatchNorm uses and updates batch
    statistics). With `skip_nonfinite`, a NaN/Inf loss or gradient leaves the state unchanged except the step."""

    def objective(params, loss_params, batch_stats):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        embeddings = model(normalize(batch["image"], dtype))
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
    grad_norm = optax.global_norm((grads, loss_grads))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step), "finite": finite}
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, loss_params=loss_params,
        opt_state=opt_state, loss_opt_state=loss_opt_state, ema_params=ema,
    )
    if skip_nonfinite:
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state.replace(step=state.step + 1))
    return new_state, metrics


def make_train_step(replicated, **kwargs):
    """jit(train_step): state replicated in and out, batch sharded on `data`, the old state's buffers donated.

    Input shardings come from the arrays themselves (state placed replicated, batch built by
    `parallel.global_batch`); passing `in_shardings` as well made XLA:CPU's step 15x slower (measured, jax 0.10.2).
    """
    return jax.jit(functools.partial(train_step, **kwargs), out_shardings=(replicated, replicated), donate_argnums=0)
