"""Flax NNX ResMobileNet V1/V2, mirroring torchvision module for module."""

from resmobile_jax.models.architecture import MOBILENET_V3_LARGE_BLOCKS, VARIANTS, mid_block_specs, output_stride
from resmobile_jax.models.resmobilenet import PARTS, ResMobileNet, build_model, input_hw, jit_stages, model_kwargs

__all__ = [
    "MOBILENET_V3_LARGE_BLOCKS",
    "PARTS",
    "VARIANTS",
    "ResMobileNet",
    "build_model",
    "input_hw",
    "jit_stages",
    "mid_block_specs",
    "model_kwargs",
    "output_stride",
]
