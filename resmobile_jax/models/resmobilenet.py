"""ResMobileNet V1/V2: stem -> 15 inverted residuals -> 6 bottlenecks -> embedding head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resmobile_jax.models.architecture import (
    BOTTLENECK_WIDTH,
    NUM_BOTTLENECKS,
    TAIL_CHANNELS,
    check_variant,
    mid_block_specs,
    output_stride,
)
from resmobile_jax.models.blocks import SE_KERNEL_MAX_IMAGES, Bottleneck, InvertedResidual
from resmobile_jax.models.head import EmbeddingHead
from resmobile_jax.models.layers import POINTWISE_KERNEL_MAX_PIXELS
from resmobile_jax.models.stems import MobileNetStem, ResNetStem

PARTS = ("stem", "mid", "tail", "head")


class ResMobileNet(nnx.Module):
    """Takes NHWC images (ImageNet-normalized), returns L2-normalized float32 embeddings of shape (N, D).

    `model.train()` / `model.eval()` switch BatchNorm between batch statistics (updating the running ones, as
    PyTorch does) and running statistics.
    """

    def __init__(
        self,
        variant: str = "v2",
        *,
        embedding_dim: int = 512,
        v2_output_stride: int = 32,
        depthwise_impl: str = "auto",
        pointwise_impl: str = "matmul",
        stem_conv_impl: str = "auto",
        batch_norm_impl: str = "auto",
        fuse_eval_bn: bool = True,
        fuse_eval_bottleneck: bool = True,
        fuse_train_bn: bool = True,
        fuse_eval_small_blocks: bool = True,
        se_kernel_max_images: int = SE_KERNEL_MAX_IMAGES,
        pointwise_kernel_max_pixels: int = POINTWISE_KERNEL_MAX_PIXELS,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rng: np.random.Generator | int = 0,
    ):
        check_variant(variant)
        rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be a positive integer, got {embedding_dim}")
        self.variant = variant
        self.embedding_dim = embedding_dim
        self.v2_output_stride = v2_output_stride  # constructor argument, kept so exports can rebuild the model
        self.output_stride = output_stride(variant, v2_output_stride)
        self.dtype = jnp.dtype(dtype)
        kw = dict(dtype=self.dtype, param_dtype=param_dtype, rng=rng)
        self.stem = (MobileNetStem if variant == "v1" else ResNetStem)(
            conv_impl=stem_conv_impl, batch_norm_impl=batch_norm_impl, fuse_eval_bn=fuse_eval_bn, **kw)
        self.mid = nnx.List(
            [InvertedResidual(spec, depthwise_impl=depthwise_impl, pointwise_impl=pointwise_impl,
                              batch_norm_impl=batch_norm_impl, fuse_eval_bn=fuse_eval_bn, fuse_train_bn=fuse_train_bn,
                              fuse_small_blocks=fuse_eval_small_blocks, se_kernel_max_images=se_kernel_max_images,
                              pointwise_kernel_max_pixels=pointwise_kernel_max_pixels, **kw)
             for spec in mid_block_specs(variant, v2_output_stride)]
        )
        self.tail = nnx.List(
            [Bottleneck(TAIL_CHANNELS, BOTTLENECK_WIDTH, pointwise_impl=pointwise_impl, batch_norm_impl=batch_norm_impl,
                        dense_conv_impl=stem_conv_impl, fuse_eval_bn=fuse_eval_bn,
                        fuse_eval_block=fuse_eval_bn and fuse_eval_bottleneck,
                        pointwise_kernel_max_pixels=pointwise_kernel_max_pixels, **kw) for _ in range(NUM_BOTTLENECKS)]
        )
        self.head = EmbeddingHead(TAIL_CHANNELS, embedding_dim, **kw)

    def check_input(self, images: jax.Array) -> None:
        """Shape checks at the model boundary, with a message that says what to change."""
        chex.assert_rank(images, 4)
        if images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images (N, H, W, 3), got shape {tuple(images.shape)}")
        h, w = images.shape[1:3]
        if min(h, w) < self.output_stride:
            raise ValueError(
                f"input image {h}x{w} is smaller than ResMobileNet {self.variant}'s output stride "
                f"{self.output_stride}; resize images to at least {self.output_stride}x{self.output_stride} "
                f"(config.model.input_size)"
            )

    def stages(self, images: jax.Array) -> dict[str, jax.Array]:
        """Every stage's output in order (stem, mid.0..14, tail.0..5, embedding), for parity checks."""
        self.check_input(images)
        out = {}
        x = self.stem(images.astype(self.dtype))
        out["stem"] = x
        for i, block in enumerate(self.mid):
            x = block(x)
            out[f"mid.{i}"] = x
        for i, block in enumerate(self.tail):
            x = block(x)
            out[f"tail.{i}"] = x
        out["embedding"] = self.head(x)
        return out

    def apply_part(self, part: str, x: jax.Array) -> jax.Array:
        """Runs one of PARTS on its input (profiling and per-part timing use this)."""
        if part == "stem":
            return self.stem(x.astype(self.dtype))
        if part in ("mid", "tail"):
            for block in getattr(self, part):
                x = block(x)
            return x
        if part == "head":
            return self.head(x)
        raise ValueError(f"unknown part {part!r}; expected one of {PARTS}")

    def __call__(self, images: jax.Array) -> jax.Array:
        self.check_input(images)
        x = images
        for part in PARTS:
            x = self.apply_part(part, x)
        emb = x
        chex.assert_shape(emb, (images.shape[0], self.embedding_dim))
        chex.assert_type(emb, jnp.float32)
        return emb


# config.model settings under which the model calls none of the C++ kernels (XLA's own ops only): for graphs another
# runtime executes (exports) and for counting FLOPs with XLA's cost analysis.
XLA_ONLY = {"depthwise_impl": "xla", "stem_conv_impl": "xla", "batch_norm_impl": "xla", "se_kernel_max_images": 0,
            "pointwise_kernel_max_pixels": 0}


def model_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments a `config.model` block carries (input_size is the data's business)."""
    return dict(
        variant=model_config["variant"],
        embedding_dim=int(model_config["embedding_dim"]),
        v2_output_stride=int(model_config.get("v2_output_stride", 32)),
        depthwise_impl=model_config.get("depthwise_impl", "auto"),
        pointwise_impl=model_config.get("pointwise_impl", "matmul"),
        stem_conv_impl=model_config.get("stem_conv_impl", "auto"),
        batch_norm_impl=model_config.get("batch_norm_impl", "auto"),
        fuse_eval_bn=bool(model_config.get("fuse_eval_bn", True)),
        fuse_eval_bottleneck=bool(model_config.get("fuse_eval_bottleneck", True)),
        fuse_train_bn=bool(model_config.get("fuse_train_bn", True)),
        fuse_eval_small_blocks=bool(model_config.get("fuse_eval_small_blocks", True)),
        se_kernel_max_images=int(model_config.get("se_kernel_max_images", SE_KERNEL_MAX_IMAGES)),
        pointwise_kernel_max_pixels=int(model_config.get("pointwise_kernel_max_pixels", POINTWISE_KERNEL_MAX_PIXELS)),
        dtype=jnp.dtype(model_config.get("dtype", "float32")),
        param_dtype=jnp.dtype(model_config.get("param_dtype", "float32")),
    )


def build_model(model_config: Mapping[str, Any], seed: int = 0) -> ResMobileNet:
    """Builds the model from a `config.model` ConfigDict (or any mapping with the same keys), in eval mode."""
    model = ResMobileNet(**model_kwargs(model_config), rng=np.random.default_rng(seed))
    model.eval()
    return model


def jit_stages(model: ResMobileNet):
    """A jitted `model.stages` over the model's current state (for checks and profiling, not training)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).stages(x))
    return lambda images: fn(state, images)


def input_hw(input_size) -> tuple[int, int]:
    """`input_size` may be an int (square) or an (height, width) pair."""
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = input_size
    return int(h), int(w)
