"""Inference timing: compile time measured apart from run time, and run time as a median with its spread.

A single timed call is noise on a shared machine; the median of many calls after warm-up is not. The persistent XLA
cache is bypassed while compiling here, so the compile figure is a real compile, not a cache read.
"""

from __future__ import annotations

import contextlib
import time

import jax
import numpy as np


@contextlib.contextmanager
def _no_persistent_cache():
    old = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", old)


def repeat_timing(call, *, min_repeats: int = 5, max_repeats: int = 50, budget_seconds: float = 5.0,
                  warmup: int = 2) -> dict:
    """Times `call()` (which must return only when its work is done) after `warmup` untimed calls: repeated until
    `max_repeats` or the time budget, never fewer than `min_repeats`. Times in ms; spread as the 10th-90th
    percentile. Framework-neutral, so JAX and PyTorch are measured by the same loop."""
    for _ in range(warmup):
        call()
    times = []
    started = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - started < budget_seconds):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    ms = np.asarray(times)
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "repeats": len(times),
    }


def compile_jitted(fn, *args):
    """(compiled executable, seconds): a real compile, the persistent cache bypassed."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    t0 = time.perf_counter()
    with _no_persistent_cache():
        compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_jitted(fn, *args, **kwargs) -> dict:
    """Compiles `fn` (jitted here unless it already is) for `args` and times calls of the compiled executable
    (`repeat_timing`'s keyword arguments); the compile time is reported apart."""
    compiled, seconds = compile_jitted(fn, *args)
    return {"compile_seconds": round(seconds, 2), **repeat_timing(lambda: jax.block_until_ready(compiled(*args)), **kwargs)}


def device_description() -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU; on a CPU the processor model and the cores this process may use."""
    d = jax.devices()[0]
    if d.platform != "cpu":
        return f"{d.device_kind} ({d.platform})"
    import os

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores (cpu)"


def inference_timing(model, input_hw: tuple[int, int], batch_sizes=(1, 64), dtype="float32", **kwargs) -> dict:
    """Embedding time of uint8 images -> L2-normalized embeddings (normalization included, as in deployment), per
    batch size: {"batch_1": {..., "ms_per_image", "images_per_second"}, ...}. `model` must be in eval mode."""
    from resmobile_jax import parallel
    from resmobile_jax.embed import make_embed_fn
    from resmobile_jax.train.state import split_model

    graphdef, params, batch_stats = split_model(model)
    embed = make_embed_fn(graphdef, jax.numpy.dtype(dtype), parallel.data_mesh())  # the function evaluation runs
    rng = np.random.default_rng(0)
    out = {"backend": jax.default_backend(), "device": device_description(), "input_hw": list(input_hw)}
    for b in batch_sizes:
        images = rng.integers(0, 256, (b, *input_hw, 3), dtype=np.uint8)
        bound = embed.bind(params, batch_stats)
        r = time_jitted(bound.jitted, bound.leaves, images, **kwargs)
        r["ms_per_image"] = r["median_ms"] / b
        r["images_per_second"] = 1e3 * b / r["median_ms"]
        out[f"batch_{b}"] = r
    return out
