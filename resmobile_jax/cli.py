"""What every command-line entry point does first."""

from __future__ import annotations

import logging
import os
import platform
import sys


def quiet_logging() -> None:
    """Keeps orbax's per-save INFO lines and TensorFlow's start-up chatter out of the user's terminal."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)
    for name in ("jax._src.xla_bridge", "orbax", "absl"):
        logging.getLogger(name).setLevel(logging.WARNING)


def start_command(argv, accepts_arguments: bool = False) -> None:
    """What every `main(argv)` does first: refuse stray positional arguments (usually a flag missing its `--`), keep
    the logs quiet and turn on the persistent XLA cache."""
    if len(argv) > 1 and not accepts_arguments:
        from absl import app

        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_logging()
    enable_compilation_cache()


def parse_size(text) -> tuple[int, int]:
    """'224' -> (224, 224); '96x128' -> (96, 128): image sizes on the command line are H or HxW."""
    h, _, w = str(text).lower().partition("x")
    return int(h), int(w or h)


def enable_compilation_cache() -> None:
    """Persists compiled XLA programs (the train step takes ~50 s to compile on a 2-core CPU), so a resumed run, the
    second model of a comparison with the same shapes, or a rerun starts at once. JAX_COMPILATION_CACHE_DIR
    overrides the location; RESMOBILE_NO_XLA_CACHE=1 turns it off."""
    if os.environ.get("RESMOBILE_NO_XLA_CACHE"):
        return
    import jax

    directory = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "resmobile_jax", "xla"
    )
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


# glibc malloc settings for a process that allocates and frees gigabyte-sized buffers every step (XLA:CPU's
# per-execution temporaries): by default each such buffer is a fresh mmap, so every step page-faults it in 4 KiB
# pages at ~1 GB/s. Keeping freed memory in the heap (no mmap, no trim) and backing it with transparent huge pages
# raised JAX training throughput 5-41% in the bench on the 2-core CPU (benchmarks/cpu_2core*.md; README, Speed).
# Unknown tunables are ignored by older glibc; other C libraries are left alone.
MALLOC_TUNABLES = {
    "glibc.malloc.hugetlb": "1",
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 36),
}
_REEXEC_MARK = "RESMOBILE_MALLOC_REEXEC"


def malloc_tunables_env(environ) -> dict | None:
    """The environment to re-execute with, or None when nothing is to change: RESMOBILE_MALLOC=default opts out, a
    tunable the user already set in GLIBC_TUNABLES is kept as they set it, and a process is re-executed once."""
    if environ.get("RESMOBILE_MALLOC", "tuned") == "default" or environ.get(_REEXEC_MARK):
        return None
    if platform.libc_ver()[0] != "glibc" or not hasattr(os, "execve"):
        return None
    current = dict(item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item)
    missing = {k: v for k, v in MALLOC_TUNABLES.items() if k not in current}
    if not missing:
        return None
    return {**environ, _REEXEC_MARK: "1",
            "GLIBC_TUNABLES": ":".join(f"{k}={v}" for k, v in {**current, **missing}.items())}


# XLA:CPU flags the entry points add to XLA_FLAGS. Each must leave the numbers as they are (within float32
# rounding) and have won a same-process A/B on this project's models (README, Speed).
# - dots (the 1x1 convolutions, as matmuls) through XLA's own matmul emitter instead of one YNNPACK call each: the
#   input-gradient dots ran at half their isolated speed inside the train step; 224 px train step 1-9% faster,
#   batch-1 inference 5-25% faster, batch-32 inference unchanged.
XLA_CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_dot"}


def xla_flags_value(environ) -> str | None:
    """XLA_FLAGS with XLA_CPU_FLAGS added, or None when nothing is to change: RESMOBILE_XLA_FLAGS=default opts out,
    and a flag the user already set in XLA_FLAGS is kept as they set it."""
    if environ.get("RESMOBILE_XLA_FLAGS", "tuned") == "default":
        return None
    current = environ.get("XLA_FLAGS", "")
    named = {item.lstrip("-").split("=", 1)[0] for item in current.split()}
    missing = [f"--{k}={v}" for k, v in XLA_CPU_FLAGS.items() if k not in named]
    return " ".join([current, *missing]).strip() if missing else None


def inline_cpu_execution(environ) -> bool:
    """Whether XLA:CPU should run each computation on the calling thread (jax_cpu_enable_async_dispatch=False),
    part of the malloc tuning (RESMOBILE_MALLOC=default turns both off). Dispatched asynchronously, a computation
    allocates its temporaries on an XLA pool thread, which glibc gives its own arena; such an arena grows in heaps
    of at most 64 MB and serves any bigger block with a fresh mmap whatever mmap_max says. A 224 px train step's
    ~957 MB temporary block was mapped, zero-filled as ~460 huge pages and unmapped again on every step (strace,
    /proc/vmstat); run inline it comes from the main arena's heap and stays mapped. V1 224 px train step 0.78x the
    time (3 alternating process pairs, ad-hoc script; README, Speed)."""
    return environ.get("RESMOBILE_MALLOC", "tuned") != "default"


def apply_cpu_settings() -> None:
    """For library use (a notebook, your own script): what `run` sets in-process, with the same opt-outs, i.e.
    XLA_CPU_FLAGS and inline XLA:CPU execution. Call it before JAX's first computation: XLA reads XLA_FLAGS when its
    backend starts. glibc's malloc tunables need a process start: launch Python with GLIBC_TUNABLES set (see
    MALLOC_TUNABLES) for those. Library use on a 2-core Zen 4 (ad-hoc, separate processes): V1 embed at 224 px batch
    1 6.9-7.2 -> 5.1-6.1 ms, 64 px batch 32 12.6-14.0 -> 10.7-11.0 ms."""
    from jax._src import xla_bridge  # jax 0.10 has no public way to ask whether a backend has started

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "JAX's backend has already started, so XLA_FLAGS can no longer take effect: call "
            "resmobile_jax.cli.apply_cpu_settings() before any JAX computation (in a notebook: restart the kernel "
            "and call it first)")
    _apply_in_process()


def _apply_in_process() -> None:
    if (xla_flags := xla_flags_value(os.environ)) is not None:
        os.environ["XLA_FLAGS"] = xla_flags
    if inline_cpu_execution(os.environ):
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)


def run(main, **kwargs) -> None:
    """absl's app.run for the command-line entry points (never called on import): since glibc reads GLIBC_TUNABLES
    only at start-up, re-executes the process once, same interpreter and arguments, with MALLOC_TUNABLES; then adds
    XLA_CPU_FLAGS (XLA reads XLA_FLAGS when the first backend starts, i.e. later) and turns off XLA:CPU's async
    dispatch (inline_cpu_execution), also before the backend starts."""
    env = malloc_tunables_env(os.environ)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    _apply_in_process()
    from absl import app

    app.run(main, **kwargs)
