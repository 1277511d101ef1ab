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


def parse_size(text) -> tuple[int, int]:
    """'224' -> (224, 224); '96x128' -> (96, 128): image sizes on the command line are H or HxW."""
    h, _, w = str(text).lower().partition("x")
    return int(h), int(w or h)
