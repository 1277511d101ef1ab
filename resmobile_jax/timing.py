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
    return interleaved_timing({"call": call}, min_rounds=min_repeats, max_rounds=max_repeats,
                              budget_seconds=budget_seconds, warmup=warmup)["call"]


def interleaved_times(calls: dict, *, min_rounds: int, max_rounds: int, budget_seconds: float = float("inf"),
                      per_round: int = 1, warmup: int = 1, untimed_per_round: int = 0) -> dict[str, list[float]]:
    """{name: times in ms} of several calls timed in alternation: each warmed up, then rounds of `per_round` calls of
    each, the order reversed every other round, until `max_rounds` or the budget (never fewer than `min_rounds`).
    On a shared machine whose speed drifts by 20-40% over minutes, alternation makes the drift hit every call alike,
    so their ratio holds where separate runs of each do not. `untimed_per_round` calls start each block untimed,
    for warm-cache figures: the other call has just evicted this one's weights from the caches."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times = {name: [] for name in names}
    started = time.perf_counter()
    r = 0
    while r < max_rounds and (r < min_rounds or time.perf_counter() - started < budget_seconds):
        for name in names if r % 2 == 0 else names[::-1]:
            for _ in range(untimed_per_round):
                calls[name]()
            for _ in range(per_round):
                t = time.perf_counter()
                calls[name]()
                times[name].append((time.perf_counter() - t) * 1e3)
        r += 1
    return times


def summary(times_ms) -> dict:
    """Median, 10th and 90th percentile, minimum (ms) and count of a list of times."""
    ms = np.asarray(times_ms)
    return {
        "median_ms": float(np.median(ms)),
        "p10_ms": float(np.percentile(ms, 10)),
        "p90_ms": float(np.percentile(ms, 90)),
        "min_ms": float(ms.min()),
        "repeats": len(ms),
    }


def interleaved_timing(calls: dict, **kwargs) -> dict[str, dict]:
    """{name: summary} of `interleaved_times(calls, **kwargs)`."""
    return {name: summary(t) for name, t in interleaved_times(calls, **kwargs).items()}


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


def cpuinfo_fields(info: str) -> dict[str, str]:
    """/proc/cpuinfo's text as {field: value} of the first CPU listed ('model name', 'cpu family', 'flags', ...)."""
    field = {}
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in field:
            field[key.strip()] = value.strip()
    return field


def cpu_model(info: str) -> str:
    """The processor in /proc/cpuinfo's text: its model name, and its vendor, family and model numbers, which tell
    CPUs apart where a VM shows only 'AMD EPYC' (family 25 is Zen 3/4, 26 Zen 5)."""
    field = cpuinfo_fields(info)
    ids = " ".join(f"{label}{field[key]}" for key, label in (("vendor_id", ""), ("cpu family", "family "),
                                                               ("model", "model ")) if key in field)
    return field.get("model name", "unknown CPU") + (f" ({ids})" if ids else "")


def device_description() -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU; on a CPU the processor (cpu_model) and the cores this process may use."""
    d = jax.devices()[0]
    if d.platform != "cpu":
        return f"{d.device_kind} ({d.platform})"
    import os

    try:
        with open("/proc/cpuinfo") as f:
            model = cpu_model(f.read())
    except OSError:
        model = "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores (cpu)"


def embed_calls(model, input_hw: tuple[int, int], batch_sizes=(1, 64), dtype="float32") -> dict:
    """{batch size: (call, compile seconds)}: call() embeds a batch of random uint8 images with the compiled function
    evaluation runs (normalization included) and returns when the embeddings are ready. `model` in eval mode."""
    from resmobile_jax import parallel
    from resmobile_jax.embed import make_embed_fn
    from resmobile_jax.train.state import split_model

    graphdef, params, batch_stats = split_model(model)
    bound = make_embed_fn(graphdef, jax.numpy.dtype(dtype), parallel.data_mesh()).bind(params, batch_stats)
    rng = np.random.default_rng(0)
    calls = {}
    for b in batch_sizes:
        images = rng.integers(0, 256, (b, *input_hw, 3), dtype=np.uint8)
        compiled, seconds = compile_jitted(bound.jitted, bound.leaves, images)
        calls[b] = (lambda compiled=compiled, images=images: jax.block_until_ready(compiled(bound.leaves, images)),
                    round(seconds, 2))
    return calls


def per_image(r: dict, batch: int) -> dict:
    """A timing summary of one batch call, with ms per image and images per second added."""
    return {**r, "ms_per_image": r["median_ms"] / batch, "images_per_second": 1e3 * batch / r["median_ms"]}


def inference_timing(model, input_hw: tuple[int, int], batch_sizes=(1, 64), dtype="float32", **kwargs) -> dict:
    """Embedding time of uint8 images -> L2-normalized embeddings (normalization included, as in deployment), per
    batch size: {"batch_1": {..., "ms_per_image", "images_per_second"}, ...}. `model` must be in eval mode."""
    out = {"backend": jax.default_backend(), "device": device_description(), "input_hw": list(input_hw)}
    for b, (call, seconds) in embed_calls(model, input_hw, batch_sizes, dtype).items():
        out[f"batch_{b}"] = per_image({"compile_seconds": seconds, **repeat_timing(call, **kwargs)}, b)
    return out
