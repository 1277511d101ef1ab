"""Saving and loading model weights as orbax checkpoints, plus the flat state view the converter works on.

A *model checkpoint* directory holds `state/` (an orbax StandardCheckpointer tree of params and batch stats, keyed
like `mid.3.se.fc1.kernel`) and `metadata.json` (the model config needed to rebuild the network, and where the
weights came from). The converter writes this; evaluation and `init_from` read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from resmobile_jax.models import VARIANTS, ResMobileNet, build_model

METADATA_FILE = "metadata.json"
STATE_DIR = "state"
FORMAT_VERSION = 1


def _key(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)


def model_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every Param and BatchStat as a flat {dotted key: numpy array} dict (the Flax side of the converter)."""
    pure = nnx.state(model, nnx.Param, nnx.BatchStat)
    flat = {}
    for part in pure:
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(part))[0]:
            flat[_key(path)] = np.asarray(leaf)
    return flat


def state_shapes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (v.shape, v.dtype) for k, v in model_state_dict(model).items()}


def load_state_dict(model: nnx.Module, flat: dict[str, Any]) -> None:
    """Writes a flat dict into the model in place; keys and shapes must match exactly (cast to the model's dtypes)."""
    expected = state_shapes(model)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = sorted(k for k in set(expected) & set(flat) if tuple(np.shape(flat[k])) != expected[k][0])
    if missing or unexpected or wrong:
        raise ValueError(mismatch_message(missing, unexpected, [(k, np.shape(flat[k]), expected[k][0]) for k in wrong]))
    for filt in (nnx.Param, nnx.BatchStat):
        state = nnx.state(model, filt)
        pure = nnx.to_pure_dict(state)
        new = jax.tree_util.tree_map_with_path(lambda p, leaf: np.asarray(flat[_key(p)], dtype=leaf.dtype), pure)
        nnx.replace_by_pure_dict(state, new)
        nnx.update(model, state)


def mismatch_message(missing, unexpected, wrong, limit: int = 20) -> str:
    def listing(items):
        items = list(items)
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(str(i) for i in items[:limit]) + more

    lines = ["checkpoint does not match the model:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {listing(unexpected)}")
    if wrong:
        lines.append(f"  wrong shape ({len(wrong)}): {listing(f'{k} {tuple(a)} vs model {tuple(b)}' for k, a, b in wrong)}")
    return "\n".join(lines)


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_model(directory: str | os.PathLike, model: ResMobileNet, model_config: dict, metadata: dict | None = None) -> Path:
    """Writes `model` to a fresh directory. Refuses to overwrite, so an existing checkpoint is never lost."""
    directory = Path(directory).absolute()
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} already exists and is not empty; choose a new --out directory or delete it")
    directory.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpointer()
    ckpt.save(directory / STATE_DIR, model_state_dict(model))
    ckpt.wait_until_finished()
    meta = {"format_version": FORMAT_VERSION, "model": dict(model_config), **(metadata or {})}
    (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return directory


def read_metadata(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    meta_file = directory / METADATA_FILE
    if not meta_file.is_file() or not (directory / STATE_DIR).is_dir():
        raise FileNotFoundError(
            f"{directory} is not a resmobile_jax model checkpoint (expected {METADATA_FILE} and {STATE_DIR}/ inside); "
            f"convert a PyTorch checkpoint with `python -m resmobile_jax.convert to-flax`"
        )
    try:
        meta = json.loads(meta_file.read_text())
        variant = meta["model"]["variant"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_file} is not valid model metadata ({type(e).__name__}: {e}); the checkpoint was "
                         "damaged or written by another tool: convert the source checkpoint again") from None
    if variant not in VARIANTS:
        raise ValueError(f"{meta_file} names model variant {variant!r}, which this version of resmobile_jax does not "
                         f"know (it builds {', '.join(VARIANTS)}); was it written by a newer version, or edited?")
    return meta


def model_fingerprint(model: nnx.Module) -> str:
    """sha256 over every weight and BN statistic (names, shapes, dtypes, bytes): which model produced an embedding.
    Galleries record it, so a search never compares embeddings from different models."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(model_state_dict(model).items()):
        value = np.ascontiguousarray(value)
        h.update(f"{key}|{value.shape}|{value.dtype}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def load_model(directory: str | os.PathLike, expect_variant: str | None = None) -> tuple[ResMobileNet, dict]:
    """Rebuilds the model recorded in the metadata and restores its weights. Returns (model in eval mode, metadata)."""
    directory = Path(directory).absolute()
    meta = read_metadata(directory)
    variant = meta["model"]["variant"]
    if expect_variant is not None and variant != expect_variant:
        raise ValueError(f"{directory} holds a ResMobileNet {variant} checkpoint, but {expect_variant} was asked for")
    model = build_model(meta["model"])
    target = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in state_shapes(model).items()}
    flat = _checkpointer().restore(directory / STATE_DIR, target)
    load_state_dict(model, flat)
    return model, meta
