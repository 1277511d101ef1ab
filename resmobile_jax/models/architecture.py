"""The architecture table of ResMobileNet V1/V2 (DESIGN.md §2), shared by the Flax model and the PyTorch reference."""

from __future__ import annotations

from typing import NamedTuple


class InvertedResidualSpec(NamedTuple):
    """One row of MobileNetV3-Large's block table (torchvision's InvertedResidualConfig)."""

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    activation: str  # "RE" (ReLU) or "HS" (Hardswish), as in the paper and torchvision
    stride: int


# features[1:16] of torchvision.models.mobilenet_v3_large(): (in, kernel, expanded, out, SE, activation, stride).
MOBILENET_V3_LARGE_BLOCKS: tuple[InvertedResidualSpec, ...] = tuple(
    InvertedResidualSpec(*row)
    for row in [
        (16, 3, 16, 16, False, "RE", 1),
        (16, 3, 64, 24, False, "RE", 2),
        (24, 3, 72, 24, False, "RE", 1),
        (24, 5, 72, 40, True, "RE", 2),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 5, 120, 40, True, "RE", 1),
        (40, 3, 240, 80, False, "HS", 2),
        (80, 3, 200, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 184, 80, False, "HS", 1),
        (80, 3, 480, 112, True, "HS", 1),
        (112, 3, 672, 112, True, "HS", 1),
        (112, 5, 672, 160, True, "HS", 2),
        (160, 5, 960, 160, True, "HS", 1),
        (160, 5, 960, 160, True, "HS", 1),
    ]
)

VARIANTS = ("v1", "v2")
STEM_CHANNELS = {"v1": 16, "v2": 64}  # MobileNetV3 features[0] vs ResNet conv1
NUM_BOTTLENECKS = 6
TAIL_CHANNELS = 160  # Bottleneck(160, 40): expansion 4, so 160 in and out, no downsample
BOTTLENECK_WIDTH = 40


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    return variant


def mid_block_specs(variant: str, v2_output_stride: int = 32) -> tuple[InvertedResidualSpec, ...]:
    """The 15 inverted-residual rows for a variant.

    V2's ResNet stem already downsamples 4x and outputs 64 channels, so block 1 takes 64 inputs (torchvision then
    adds a 1x1 expand conv 64->16) and, for output stride 32, block 2 runs at stride 1.
    """
    check_variant(variant)
    if v2_output_stride not in (32, 64):
        raise ValueError(f"v2_output_stride must be 32 or 64, got {v2_output_stride}")
    blocks = list(MOBILENET_V3_LARGE_BLOCKS)
    if variant == "v2":
        blocks[0] = blocks[0]._replace(in_channels=STEM_CHANNELS["v2"])
        if v2_output_stride == 32:
            blocks[1] = blocks[1]._replace(stride=1)
    return tuple(blocks)


def output_stride(variant: str, v2_output_stride: int = 32) -> int:
    stem_stride = 2 if check_variant(variant) == "v1" else 4
    mid_stride = 1
    for spec in mid_block_specs(variant, v2_output_stride):
        mid_stride *= spec.stride
    return stem_stride * mid_stride
