"""Helper for test_sharding.py: a few real train steps of ResMobileNet on Fashion-MNIST, on however many devices and
processes this process was started with; process 0 writes the final params to an .npz file.

    python tests/train/sharded_steps.py OUT.npz [STEPS]
Environment: XLA_FLAGS=--xla_force_host_platform_device_count=N, and for multi-process runs
RESMOBILE_COORDINATOR / RESMOBILE_NUM_PROCESSES / RESMOBILE_PROCESS_ID.
"""

import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from resmobile_jax import parallel

parallel.maybe_initialize_distributed()

import numpy as np

from configs.v1 import get_config
from resmobile_jax.checkpoint import _key
from resmobile_jax.data.pipeline import TrainBatches
from resmobile_jax.data.preprocess import Preprocess
from resmobile_jax.data.sources import fashion_mnist
from resmobile_jax.losses import get_loss
from resmobile_jax.models import build_model
from resmobile_jax.train.state import create_train_state, make_optimizers, split_model
from resmobile_jax.train.step import make_train_step


def main(out: str, steps: int) -> None:
    config = get_config()
    config.data.batch_size, config.data.p, config.data.k = 16, 4, 4
    config.optimizer.warmup_steps = 1
    # SGD: the update is linear in the gradient, so parameter differences measure gradient differences (AdamW's
    # first steps are ~lr * sign(g) and turn rounding noise in tiny gradients into lr-sized differences).
    config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
    # The same convolution code on 1 and on 4 devices, so only the sharding differs: "auto" would pick the C++ kernels
    # on one device and the pure-JAX forms on several, and their float32 rounding, carried through train-mode
    # BatchNorm, alone moved the head BN bias update by 0.7% (each implementation is tested against torch apart).
    config.model.depthwise_impl, config.model.stem_conv_impl, config.model.batch_norm_impl = "shifted", "xla", "xla"
    mesh = parallel.data_mesh()
    replicated = parallel.replicated(mesh)
    images = fashion_mnist("train")
    images = images.subset(np.arange(2000))
    loss = get_loss("multi_similarity")
    batches = TrainBatches(images, Preprocess(32, 32, (0.5, 1.0)), 16, 0, (4, 4), jax.process_index(), jax.process_count())
    tx, loss_tx, schedule = make_optimizers(config, 10)
    model = build_model(config.model)
    model.train()
    state = jax.device_put(create_train_state(model, config, 10, tx, loss_tx, False), replicated)
    initial = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
    step = make_train_step(replicated, state, graphdef=split_model(model)[0], loss_fn=loss.fn, tx=tx, loss_tx=loss_tx,
                           schedule=schedule, ema_decay=0.0)
    for i in range(steps):
        state, metrics = step(state, parallel.global_batch(batches.load(i), parallel.batch_sharding(mesh)))
    flat = {}
    update = jax.tree.map(lambda new, old: np.asarray(new.addressable_data(0)) - old, state.params, initial)
    for prefix, tree in (("update.", update), ("stats.", state.batch_stats)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            flat[prefix + _key(path)] = np.asarray(leaf.addressable_data(0) if hasattr(leaf, "addressable_data") else leaf)
    if jax.process_index() == 0:
        np.savez(out, loss=np.asarray(metrics["loss"].addressable_data(0)), devices=jax.device_count(), **flat)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    os._exit(0)  # skip slow distributed teardown
