"""torch state_dict <-> Flax ResMobileNet state, with a report of exactly what was loaded."""

from __future__ import annotations

import dataclasses

import numpy as np

from resmobile_jax.checkpoint import load_state_dict, mismatch_message, model_state_dict
from resmobile_jax.convert.checkpoint_io import CheckpointError
from resmobile_jax.convert.layout import (
    SOURCE_FORMATS,
    canonical_layout,
    detect_format,
    source_layout,
    to_flax,
    to_torch,
)
from resmobile_jax.models import ResMobileNet


@dataclasses.dataclass
class ConversionReport:
    source_format: str
    loaded: list[tuple[str, str]]  # (torch key, flax key)
    missing: list[str]  # flax keys the source did not provide (kept at their initial values with --partial)
    unexpected: list[str]  # source keys that map to nothing in the target
    mismatched: list[tuple[str, tuple, tuple]]  # (torch key, source shape as Flax, target shape)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, verbose: bool = False) -> str:
        lines = [
            f"source format: {self.source_format} ({SOURCE_FORMATS[self.source_format]})",
            f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}; unexpected {len(self.unexpected)}; "
            f"wrong shape {len(self.mismatched)}",
        ]
        if verbose:
            lines += [f"  loaded   {t} -> {f}" for t, f in self.loaded]
            lines += [f"  missing  {f}" for f in self.missing]
            lines += [f"  skipped  {t} (not in target)" for t in self.unexpected]
            lines += [f"  skipped  {t} (shape {s} vs target {e})" for t, s, e in self.mismatched]
        return "\n".join(lines)


def resmobilenet_variant(state: dict) -> str:
    """Which variant a canonical checkpoint holds, read off its stem."""
    if "stem.conv1.weight" in state:
        return "v2"
    if "stem.0.weight" in state:
        return "v1"
    raise CheckpointError("checkpoint has ResMobileNet keys but no stem (stem.0.weight or stem.conv1.weight)")


def embedding_dim_of(state: dict) -> int | None:
    w = state.get("head.fc.weight")
    return None if w is None else int(w.shape[0])


def torch_to_flax(state: dict[str, np.ndarray], model: ResMobileNet, partial: bool = False) -> ConversionReport:
    """Loads a torch state_dict into `model` in place.

    Strict (default): every model tensor must come from the source and every source tensor must be used.
    Partial: loads whatever matches by name and shape, keeps the rest at the model's initial values, and reports it.
    """
    fmt = detect_format(state)
    source_variant = model.variant
    if fmt == "resmobilenet":
        source_variant = resmobilenet_variant(state)
        if source_variant != model.variant and not partial:
            raise CheckpointError(
                f"the checkpoint is a ResMobileNet {source_variant} (its stem is "
                f"{'stem.0 (MobileNet 3x3)' if source_variant == 'v1' else 'stem.conv1 (ResNet 7x7)'}), but --variant "
                f"{model.variant} was asked for; pass --variant {source_variant}, or --partial to load the shared mid/tail"
            )
    elif not partial:
        raise CheckpointError(
            f"this is a {SOURCE_FORMATS[fmt]}, which covers only part of ResMobileNet; pass --partial to load it "
            f"and keep the rest at initial values"
        )
    target = model_state_dict(model)
    new = dict(target)
    loaded, mismatched, unexpected = [], [], set(state)
    for e in source_layout(fmt, source_variant):
        if e.torch_key not in state or e.flax_key not in target:
            continue
        unexpected.discard(e.torch_key)
        value = to_flax(e.kind, state[e.torch_key])
        if value.shape != target[e.flax_key].shape:
            mismatched.append((e.torch_key, value.shape, target[e.flax_key].shape))
            continue
        new[e.flax_key] = value.astype(target[e.flax_key].dtype)
        loaded.append((e.torch_key, e.flax_key))
    loaded_flax = {f for _, f in loaded}
    report = ConversionReport(
        source_format=fmt,
        loaded=loaded,
        missing=sorted(k for k in target if k not in loaded_flax),
        unexpected=sorted(unexpected),
        mismatched=mismatched,
    )
    if not partial and not report.complete:
        raise CheckpointError(mismatch_message(report.missing, report.unexpected, report.mismatched))
    if not loaded:
        raise CheckpointError("no tensor of the checkpoint matches the model by name and shape; nothing to load")
    load_state_dict(model, new)
    return report


def flax_to_torch(model: ResMobileNet) -> dict[str, np.ndarray]:
    """The model as a canonical torchvision-style state_dict (loads with strict=True into the reference)."""
    flat = model_state_dict(model)
    out = {}
    for e in canonical_layout(model.variant):
        out[e.torch_key] = to_torch(e.kind, flat[e.flax_key])
    return out
