"""NaN/Inf in training: 'stop' names the step and the last good checkpoint; 'skip' leaves the state untouched."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.v1 import get_config
from resmobile_jax import parallel
from resmobile_jax.bench.jax_side import synthetic_batch
from resmobile_jax.losses import get_loss
from resmobile_jax.train import train_and_evaluate
from resmobile_jax.train.loop import NonFiniteError
from resmobile_jax.train.state import create_train_state, make_optimizers, split_model
from resmobile_jax.train.step import make_train_step


@pytest.mark.slow
def test_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss turns NaN on the batches whose items 0 and 2 share a label (as real divergence, it depends on the
    data): with seed 0 that is first step 6. Checkpoints every 2 steps, logs every 5: the NaN is caught at step 6, before
    that step's checkpoint, and step 4 is named as the last good one."""
    from resmobile_jax.train import loop

    real_get_loss = loop.get_loss

    def nan_loss(name, **kw):
        real = real_get_loss(name, **kw)
        return real._replace(fn=lambda e, labels, p: jnp.where(labels[0] == labels[2], jnp.nan, real.fn(e, labels, p)))

    monkeypatch.setattr(loop, "get_loss", nan_loss)
    c = get_config()
    c.data.batch_size, c.train.num_steps, c.train.checkpoint_every_steps, c.train.log_every_steps = 16, 40, 2, 5
    c.optimizer.warmup_steps, c.train.progress, c.data.max_eval_images = 1, False, 200
    with pytest.raises(NonFiniteError) as e:
        train_and_evaluate(c, str(tmp_path))
    msg = str(e.value)
    assert re.search(r"became NaN/Inf at step 6 \(loss nan\); the last good checkpoint is step 4 in .*checkpoints", msg), msg
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    assert "optimizer.learning_rate" in msg and "on_nonfinite='skip'" in msg
    assert not (tmp_path / "final_metrics.json").exists()


class TinyEmbedder(nnx.Module):
    """BatchNorm + linear + L2 norm: the step's skip logic is model-independent, and this compiles in seconds where
    the full network takes a minute (the full network's NaN path is the stop test above)."""

    def __init__(self, dim: int):
        self.bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
        self.fc = nnx.Linear(3, dim, rngs=nnx.Rngs(0))

    def __call__(self, images):
        e = self.fc(self.bn(images).mean(axis=(1, 2)))
        return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def test_skip_mode_leaves_the_state_unchanged_on_a_nan_loss():
    c = get_config()
    c.model.embedding_dim = 16
    c.optimizer.warmup_steps = 1
    real = get_loss(c.loss.name)

    def loss_fn(embeddings, labels, params):  # NaN whenever the batch's first label is 9
        return jnp.where(labels[0] == 9, jnp.nan, real.fn(embeddings, labels, params))

    tx, loss_tx, schedule = make_optimizers(c, 100)
    model = TinyEmbedder(16)
    model.train()
    mesh = parallel.data_mesh()
    rep = parallel.replicated(mesh)
    state = jax.device_put(create_train_state(model, c, 10, tx, loss_tx, real.uses_proxies), rep)
    assert state.loss_params and state.ema_params is not None  # proxies and EMA are part of what must not move
    step = make_train_step(rep, state, graphdef=split_model(model)[0], loss_fn=loss_fn, tx=tx, loss_tx=loss_tx, schedule=schedule,
                           ema_decay=0.9, skip_nonfinite=True)
    batch = synthetic_batch(8, 32)
    good = parallel.global_batch(batch, parallel.batch_sharding(mesh))
    bad = parallel.global_batch({**batch, "label": np.full(8, 9, np.int32)}, parallel.batch_sharding(mesh))
    state, m = step(state, good)
    assert bool(m["finite"])
    before = jax.tree.map(np.asarray, state)
    state, m = step(state, bad)
    assert not bool(m["finite"])
    after = jax.tree.map(np.asarray, state)
    assert int(after.step) == int(before.step) + 1  # counted, so the data position moves on
    for a, b in zip(jax.tree.leaves(before.replace(step=0)), jax.tree.leaves(after.replace(step=0))):
        np.testing.assert_array_equal(a, b)
