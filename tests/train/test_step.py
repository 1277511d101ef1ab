"""TrainStep: the loop's fast path on leaves computes what a step on the TrainState computes, donates the old
leaves, and refuses a state of another structure with a message that says what to do."""

import jax
import numpy as np
import pytest

from configs.v1 import get_config
from resmobile_jax import parallel
from resmobile_jax.bench.jax_side import synthetic_batch
from resmobile_jax.losses import get_loss
from resmobile_jax.train.state import create_train_state, make_optimizers, split_model
from resmobile_jax.train.step import make_train_step
from tests.train.test_nonfinite import TinyEmbedder


@pytest.fixture(scope="module")
def setup():
    c = get_config()
    c.model.embedding_dim = 16
    c.optimizer.warmup_steps = 1
    loss = get_loss(c.loss.name)
    tx, loss_tx, schedule = make_optimizers(c, 100)
    model = TinyEmbedder(16)
    model.train()
    mesh = parallel.data_mesh()
    rep = parallel.replicated(mesh)

    def new_state(config=c):
        return jax.tree.map(np.array, create_train_state(model, config, 10, tx, loss_tx, loss.uses_proxies))

    state = new_state()
    step = make_train_step(rep, state, graphdef=split_model(model)[0], loss_fn=loss.fn, tx=tx, loss_tx=loss_tx,
                           schedule=schedule, ema_decay=0.9)
    batches = [parallel.global_batch(synthetic_batch(8, 32, seed), parallel.batch_sharding(mesh)) for seed in (1, 2)]
    return step, new_state, batches, c, rep


def test_steps_on_leaves_match_steps_on_the_state_and_donate_the_old_leaves(setup):
    step, new_state, batches, _, rep = setup
    initial = new_state()
    state = jax.device_put(initial, rep)
    for batch in batches:
        state, _ = step(state, batch)
    leaves = step.leaves(jax.device_put(new_state(), rep))
    first = leaves
    for batch in batches:
        leaves, metrics = step.on_leaves(leaves, batch)
    assert all(leaf.is_deleted() for leaf in first)  # donated: the loop must not keep them
    rebuilt = step.state(leaves)
    assert int(rebuilt.step) == 2 and np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(rebuilt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(initial.params),
                                                                   jax.tree.leaves(rebuilt.params))]
    assert any(moved)


def test_a_state_of_another_structure_is_refused(setup):
    step, new_state, _, c, _ = setup
    other = c.copy_and_resolve_references()
    other.optimizer.ema_decay = 0.0  # no EMA weights: ema_params is None
    state = new_state(other)
    assert state.ema_params is None
    with pytest.raises(ValueError, match=r"build it with the state it will run on"):
        step.leaves(state)
