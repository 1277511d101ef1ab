"""Reading and writing PyTorch state_dicts safely: `.pth`/`.pt` via `torch.load(weights_only=True)` (never runs
pickled code), `.safetensors` via safetensors' numpy API (no torch needed)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

# Prefixes that training wrappers put in front of every key: DataParallel/DDP, Lightning, torch.compile, EMA helpers.
COMMON_PREFIXES = ("module.", "model.", "_orig_mod.", "state_dict.", "ema_model.", "net.", "backbone.", "encoder.")
# Keys under which training scripts nest the state_dict inside a larger checkpoint dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema_state_dict", "net")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message says why and what to do."""


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Returns {key: float/int numpy array}, unwrapped and with common prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        raw = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        raw = _read_torch(path)
    else:
        raise CheckpointError(f"{path}: unknown checkpoint extension {path.suffix!r}; use .pth, .pt or .safetensors")
    return strip_prefixes(raw)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path} contains pickled objects other than tensors, so it was not loaded (weights_only=True never runs "
            f"code from a checkpoint). Save a plain state_dict (torch.save(model.state_dict(), ...)) or use "
            f".safetensors. Detail: {first}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint (truncated or corrupt?): {e}") from None
    return _tensors_from(obj, path)


def _tensors_from(obj, path) -> dict[str, np.ndarray]:
    import torch

    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict) and not isinstance(obj[key], torch.Tensor):
                return _tensors_from(obj[key], path)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = type(obj).__name__ if not isinstance(obj, dict) else "a dict whose values are not all tensors"
        raise CheckpointError(f"{path} holds {what}, not a state_dict of tensors; save model.state_dict()")
    out = {}
    for k, v in obj.items():
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            v = v.float()
        out[str(k)] = v.numpy().copy()
    return out


def strip_prefixes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes a wrapper prefix shared by every key, repeatedly (e.g. `module.model.`)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in COMMON_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def write_state_dict(state: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Writes atomically (temporary file, then rename), so a failed write never leaves a half file at `path`."""
    path = Path(path)
    if path.suffix not in (".safetensors",) + TORCH_SUFFIXES:
        raise CheckpointError(f"{path}: output must end in .pth, .pt or .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file({k: np.array(v, order="C") for k, v in state.items()}, str(tmp))
        else:
            import torch

            torch.save({k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
