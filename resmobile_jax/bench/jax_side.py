"""The JAX side of the benchmark: the project's own embed function and train step, exactly as training runs them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from configs.base import get_base_config
from resmobile_jax import parallel
from resmobile_jax.bench.system import PeakRSS
from resmobile_jax.losses import get_loss
from resmobile_jax.models import build_model
from resmobile_jax.timing import compile_jitted, embed_calls, repeat_timing
from resmobile_jax.train.state import create_train_state, make_optimizers, split_model
from resmobile_jax.train.step import make_train_step

NUM_CLASSES = 10


def bench_config(variant: str, size: int, dtype: str, depthwise_impl: str = "auto"):
    """The default run's settings (optimizer, loss, EMA, clipping) at another image size and compute dtype."""
    config = get_base_config(variant, "cpu")
    config.model.input_size = size
    config.model.dtype = dtype
    config.model.depthwise_impl = depthwise_impl
    return config


def synthetic_batch(batch: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """uint8 images and labels; both frameworks get these same arrays."""
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": (np.arange(batch) % NUM_CLASSES).astype(np.int32)}


def inference_calls(config, batch_sizes) -> dict:
    """{batch size: (call, compile seconds)} of the embedding function evaluation runs (timing.embed_calls)."""
    model = build_model(config.model, config.seed)
    model.eval()
    size = int(config.model.input_size)
    return embed_calls(model, (size, size), batch_sizes, config.model.dtype)


def train_setup(config, batch: int):
    """(jitted train step, replicated initial state, sharded synthetic batch): what the training loop runs."""
    loss = get_loss(config.loss.name)
    tx, loss_tx, schedule = make_optimizers(config, 10_000)
    model = build_model(config.model, config.seed)
    model.train()
    mesh = parallel.data_mesh()
    replicated = parallel.replicated(mesh)
    state = jax.device_put(create_train_state(model, config, NUM_CLASSES, tx, loss_tx, loss.uses_proxies), replicated)
    step = make_train_step(replicated, state, graphdef=split_model(model)[0], loss_fn=loss.fn, tx=tx, loss_tx=loss_tx,
                           schedule=schedule, ema_decay=float(config.optimizer.ema_decay),
                           dtype=jnp.dtype(config.model.dtype))
    data = parallel.global_batch(synthetic_batch(batch, int(config.model.input_size)), parallel.batch_sharding(mesh))
    return step, state, data


def step_megabytes(compiled) -> float:
    """Device memory one call of a compiled function needs by XLA's buffer assignment: arguments, outputs and
    temporaries, donated arguments that outputs reuse counted once. Exact and on every backend, where the allocator's
    peak statistics cannot be reset between measurements."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 1e6


def train_step_call(config, batch: int):
    """(call, compile seconds, device MB): call() runs one compiled train step to completion and returns its metrics,
    the state carried as leaves and donated from step to step as in training; device MB = step_megabytes."""
    step, state, data = train_setup(config, batch)
    holder = [step.leaves(state)]
    compiled, compile_seconds = compile_jitted(step.on_leaves, holder[0], data)

    def call():
        holder[0], metrics = compiled(holder[0], data)
        return jax.block_until_ready((holder[0], metrics))[1]

    return call, compile_seconds, step_megabytes(compiled)


def train(config, batch: int, budget_seconds: float) -> dict:
    """Images/s of the full train step (forward, loss, backward, AdamW, clipping, BN and EMA updates)."""
    with PeakRSS() as mem:
        call, compile_seconds, _ = train_step_call(config, batch)
        r = repeat_timing(call, min_repeats=3, max_repeats=30, budget_seconds=budget_seconds, warmup=1)
    loss_value = float(jax.device_get(call()["loss"]))
    return {**r, "compile_seconds": round(compile_seconds, 2), "images_per_second": 1e3 * batch / r["median_ms"],
            "peak_rss_mb": mem.megabytes, "finite_loss": bool(np.isfinite(loss_value))}
