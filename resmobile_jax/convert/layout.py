"""Which torch tensor is which Flax variable: the key layout of torchvision-style checkpoints.

Each `Entry` ties one torch `state_dict` key to one key of the flat Flax state (`checkpoint.model_state_dict`) and
names the layout change between them. The table is generated from the same architecture table as the model, so the
two cannot drift apart. Source layouts other than the canonical one (torchvision's own mobilenet_v3_large and
resnet classification checkpoints) are the canonical table with renamed prefixes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from resmobile_jax.models.architecture import NUM_BOTTLENECKS, mid_block_specs

# torch -> Flax layout changes; each has an exact inverse.
#   conv:   OIHW -> HWIO (also depthwise: (C, 1, k, k) -> (k, k, 1, C))
#   fc1x1:  a 1x1 conv used as a Linear (SE fc1/fc2): (O, I, 1, 1) -> (I, O)
#   linear: (O, I) -> (I, O)
#   vector: unchanged (biases, BN scale/shift/mean/var)
#   count:  BN num_batches_tracked, int64 scalar <-> int32 scalar
KINDS = ("conv", "fc1x1", "linear", "vector", "count")


class Entry(NamedTuple):
    torch_key: str
    flax_key: str
    kind: str


def to_flax(kind: str, t: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return np.ascontiguousarray(t.transpose(2, 3, 1, 0))
    if kind == "fc1x1":
        return np.ascontiguousarray(t[:, :, 0, 0].T)
    if kind == "linear":
        return np.ascontiguousarray(t.T)
    if kind == "count":
        return np.asarray(t, dtype=np.int32).reshape(())
    return np.asarray(t)


def to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":  # bf16 params (ml_dtypes): torch.from_numpy and safetensors.numpy cannot take them
        a = a.astype(np.float32)
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if kind == "fc1x1":
        return np.ascontiguousarray(a.T[:, :, None, None])
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "count":
        return np.asarray(a, dtype=np.int64).reshape(())
    return np.asarray(a)


def _conv_bn(torch_conv: str, torch_bn: str, flax_prefix: str) -> Iterator[Entry]:
    yield Entry(f"{torch_conv}.weight", f"{flax_prefix}.conv.kernel", "conv")
    yield from _bn(torch_bn, f"{flax_prefix}.bn")


def _bn(torch_bn: str, flax_bn: str) -> Iterator[Entry]:
    for t, f in (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var")):
        yield Entry(f"{torch_bn}.{t}", f"{flax_bn}.{f}", "vector")
    yield Entry(f"{torch_bn}.num_batches_tracked", f"{flax_bn}.num_batches_tracked", "count")


def canonical_layout(variant: str, v2_output_stride: int = 32) -> list[Entry]:
    """The full table for the reference model (`torch_reference.TorchResMobileNet`)."""
    entries: list[Entry] = []
    if variant == "v1":  # mobilenet_v3_large features[0]: Conv2dNormActivation = Sequential(conv, bn, act)
        entries += _conv_bn("stem.0", "stem.1", "stem.conv_bn_act")
    else:  # resnet conv1 / bn1
        entries += _conv_bn("stem.conv1", "stem.bn1", "stem.conv_bn_act")
    for i, spec in enumerate(mid_block_specs(variant, v2_output_stride)):
        parts = (["expand"] if spec.expanded != spec.in_channels else []) + ["depthwise"]
        parts += (["se"] if spec.use_se else []) + ["project"]
        for j, part in enumerate(parts):  # torchvision's InvertedResidual.block is a Sequential in this order
            t, f = f"mid.{i}.block.{j}", f"mid.{i}.{part}"
            if part == "se":
                for fc in ("fc1", "fc2"):
                    entries += [Entry(f"{t}.{fc}.weight", f"{f}.{fc}.kernel", "fc1x1"), Entry(f"{t}.{fc}.bias", f"{f}.{fc}.bias", "vector")]
            else:
                entries += _conv_bn(f"{t}.0", f"{t}.1", f)
    for i in range(NUM_BOTTLENECKS):
        for n in (1, 2, 3):
            entries += _conv_bn(f"tail.{i}.conv{n}", f"tail.{i}.bn{n}", f"tail.{i}.conv_bn{n}")
    entries += [Entry("head.fc.weight", "head.fc.kernel", "linear"), Entry("head.fc.bias", "head.fc.bias", "vector")]
    entries += _bn("head.bn", "head.bn")
    return entries


def _renamed(entries: list[Entry], renames: list[tuple[str, str]]) -> list[Entry]:
    out = []
    for e in entries:
        for old, new in renames:
            if e.torch_key.startswith(old):
                out.append(e._replace(torch_key=new + e.torch_key[len(old):]))
                break
    return out


def torchvision_mobilenet_v3_layout() -> list[Entry]:
    """torchvision `mobilenet_v3_large` classification checkpoint: features.0 = V1 stem, features.1-15 = mid."""
    renames = [("stem.", "features.0.")] + [(f"mid.{i}.", f"features.{i + 1}.") for i in range(15)]
    return _renamed(canonical_layout("v1"), renames)


def torchvision_resnet_layout() -> list[Entry]:
    """torchvision `resnet18/34/50/...` classification checkpoint: conv1/bn1 = V2 stem."""
    return _renamed(canonical_layout("v2"), [("stem.conv1.", "conv1."), ("stem.bn1.", "bn1.")])


SOURCE_FORMATS = {
    "resmobilenet": "this project's reference model (stem./mid./tail./head.)",
    "torchvision_mobilenet_v3": "torchvision mobilenet_v3_large classification checkpoint (features.*)",
    "torchvision_resnet": "torchvision ResNet classification checkpoint (conv1, layer1-4, fc)",
}


def detect_format(keys) -> str:
    keys = set(keys)
    if any(k.startswith(("stem.", "mid.", "tail.", "head.")) for k in keys):
        return "resmobilenet"
    if {"features.0.0.weight", "features.1.block.0.0.weight"} <= keys:
        return "torchvision_mobilenet_v3"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "torchvision_resnet"
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(
        f"unrecognised checkpoint layout (first keys: {sample}); expected a ResMobileNet state_dict "
        f"(stem./mid./tail./head.), a torchvision mobilenet_v3_large one (features.*) or a torchvision ResNet one"
    )


def source_layout(fmt: str, variant: str, v2_output_stride: int = 32) -> list[Entry]:
    if fmt == "resmobilenet":
        return canonical_layout(variant, v2_output_stride)
    if fmt == "torchvision_mobilenet_v3":
        return torchvision_mobilenet_v3_layout()
    return torchvision_resnet_layout()
