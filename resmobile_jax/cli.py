"""What every command-line entry point does first."""

from __future__ import annotations

import logging
import os


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
