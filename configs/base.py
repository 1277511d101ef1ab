"""Shared configuration of every ResMobileNet run; `v1.py` and `v2.py` differ from it only in `model.variant`.

Presets (the string after the colon in `--config configs/v2.py:PRESET`):
  cpu    (default) the embedded Fashion-MNIST run, sized for a 2-core CPU
  accel  224 px ImageNet-style resolution, for a GPU or TPU
Any field can be overridden: `--config.model.embedding_dim=256`.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("cpu", "accel")


def get_base_config(variant: str, preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "cpu"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} (configs/v2.py:cpu)")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = variant
    c.model.embedding_dim = 512
    c.model.input_size = 64 if preset == "cpu" else 224  # int (square) or (height, width)
    c.model.v2_output_stride = 32  # 32: V2 block 2 at stride 1, like V1; 64: keep MobileNetV3's stride 2
    c.model.depthwise_impl = "auto"  # "auto" (shifted on CPU, xla elsewhere) | "xla" | "shifted"
    c.model.dtype = "float32" if preset == "cpu" else "bfloat16"  # compute dtype
    c.model.param_dtype = "float32"
    return c
