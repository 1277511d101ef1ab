"""The shared body: MobileNetV3 inverted residuals (with squeeze-excitation) and ResNet bottlenecks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resmobile_jax.models.architecture import InvertedResidualSpec
from resmobile_jax.models.kernels import cpu_kernels
from resmobile_jax.models.layers import (
    ACTIVATIONS,
    MOBILENET_BN,
    POINTWISE_KERNEL_MAX_PIXELS,
    RESNET_BN,
    BatchNormImpl,
    ConvBNAct,
    DepthwiseImpl,
    Linear,
    PointwiseImpl,
    StemConvImpl,
    conv_init,
    global_avg_pool,
    hard_sigmoid,
    kernel_with_reference_gradient,
    make_divisible,
    static_at_most,
    unfused_conv_bn_act,
)


# Eval mode computes the SE scale of at most this many images in one C++ kernel call (cpu_kernels.se_scale_forward)
# that splits its matrix-vector products over both cores: at batch 1 they are bound by reading weights that are cold
# in cache at every call (V2 224 px: 0.5 ms of a 7 ms call on a Zen 4, benchmarks/SPEED.md). With more images XLA's
# matmuls reuse each weight over the rows. 224 px embed: batch 1 0.98x the time, batch 4 0.995x; a limit of 8 at
# batch 8 1.004x (config.model.se_kernel_max_images; 0 keeps every SE on XLA).
SE_KERNEL_MAX_IMAGES = 4


class SqueezeExcitation(nnx.Module):
    """torchvision's SqueezeExcitation as MobileNetV3 uses it: GAP -> fc1 -> ReLU -> fc2 -> Hardsigmoid -> scale.

    fc1/fc2 are biased 1x1 convs in torchvision; on a 1x1 map they are Linear layers (same init: fan-out He).
    """

    def __init__(self, channels: int, squeeze_channels: int, *, kernel_max_images: int = SE_KERNEL_MAX_IMAGES,
                 dtype=None, param_dtype=jnp.float32, rng: np.random.Generator):
        kw = dict(kernel_init=conv_init, dtype=dtype, param_dtype=param_dtype, rng=rng)
        self.kernel_max_images = kernel_max_images
        self.fc1 = Linear(channels, squeeze_channels, **kw)
        self.fc2 = Linear(squeeze_channels, channels, **kw)

    def weights(self, dtype) -> tuple[jax.Array, ...]:
        return tuple(p[...].astype(dtype) for p in (self.fc1.kernel, self.fc1.bias, self.fc2.kernel, self.fc2.bias))

    def __call__(self, x, eval_kernels: bool = False):
        """`eval_kernels`: the block runs eval mode in float32 with the C++ kernels (se_channel_scale)."""
        dtype = self.fc1.dtype or x.dtype
        scale = se_channel_scale(global_avg_pool(x).astype(dtype), self.weights(dtype),
                                 self.kernel_max_images if eval_kernels else 0)
        return x * scale[:, None, None, :].astype(x.dtype)


def se_channel_scale(pooled, weights, kernel_max_images: int = 0):
    """The SE's per-image channel scale from the globally pooled features; weights = (fc1 kernel, fc1 bias, fc2
    kernel, fc2 bias). For at most `kernel_max_images` images in float32 (eval mode with the C++ kernels), in one
    C++ call."""
    if pooled.dtype == jnp.float32 and static_at_most(pooled.shape[0], kernel_max_images):
        return se_scale_kernel(pooled, weights)
    return _se_channel_scale(pooled, weights)


def _se_channel_scale(pooled, weights):
    w1, b1, w2, b2 = weights
    return hard_sigmoid(jax.nn.relu(pooled @ w1 + b1) @ w2 + b2)


@kernel_with_reference_gradient(_se_channel_scale)
def se_scale_kernel(pooled, weights):
    """cpu_kernels.se_scale_forward in one C++ call."""
    return cpu_kernels.se_scale_forward(pooled, *weights)


def folded_for_kernel(layer: ConvBNAct) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(kernel, BN scale, BN shift) of a conv + eval-mode BN for the fused kernels: a 1x1 kernel as its (Cin, Cout)
    matrix, a k x k one as it is."""
    w, scale, shift = layer.folded()
    return (w.reshape(w.shape[-2:]) if w.shape[:2] == (1, 1) else w), scale, shift


# Eval mode fuses an inverted residual into C++ kernel calls where its expanded map is this big (bytes, float32):
# there the saved passes over memory win whatever the block's width.
FUSED_BLOCK_MIN_BYTES = 4 << 20
# Below that, from FUSED_SMALL_BLOCK_MIN_BATCH images on, blocks whose 1x1 weights are at most
# FUSED_BLOCK_MAX_WEIGHT_BYTES (every expansion up to 240 channels) on maps of at least FUSED_SMALL_BLOCK_MIN_PIXELS
# pixels an image run fused too (config.model.fuse_eval_small_blocks): the fused kernels' 1x1s take ~64 pixels of
# one image per call and read all their weights each time, cheap while the weights stay in L1/L2 and a call has
# enough pixels. Whole embed call under the entry points' settings, 2-core Zen 4 (benchmarks/SPEED.md): 64 px batch
# 32 V1 / V2 0.96-0.97x the time, batch 64 0.98x, 224 px batch 8 0.99x. Not for small batches (224 px batch 1 V2
# 1.02x), wider blocks (up to 1.10x there), or smaller maps (32 px batch 64: 1.01-1.02x).
FUSED_BLOCK_MAX_WEIGHT_BYTES = 128 << 10
FUSED_SMALL_BLOCK_MIN_BATCH = 8
FUSED_SMALL_BLOCK_MIN_PIXELS = 64


class InvertedResidual(nnx.Module):
    """MobileNetV3 block: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project (linear), residual if shape allows."""

    def __init__(
        self,
        spec: InvertedResidualSpec,
        *,
        depthwise_impl: DepthwiseImpl = "auto",
        pointwise_impl: PointwiseImpl = "matmul",
        batch_norm_impl: BatchNormImpl = "auto",
        fuse_eval_bn: bool = True,
        fuse_train_bn: bool = True,
        fuse_small_blocks: bool = True,
        se_kernel_max_images: int = SE_KERNEL_MAX_IMAGES,
        pointwise_kernel_max_pixels: int = POINTWISE_KERNEL_MAX_PIXELS,
        dtype=None,
        param_dtype=jnp.float32,
        rng: np.random.Generator,
    ):
        act = "hardswish" if spec.activation == "HS" else "relu"
        kw = dict(bn=MOBILENET_BN, pointwise_impl=pointwise_impl, batch_norm_impl=batch_norm_impl,
                  pointwise_kernel_max_pixels=pointwise_kernel_max_pixels, dtype=dtype, param_dtype=param_dtype,
                  rng=rng)
        self.spec = spec
        self.fuse_train_bn = fuse_train_bn
        self.fuse_small_blocks = fuse_small_blocks
        self.use_residual = spec.stride == 1 and spec.in_channels == spec.out_channels
        # torchvision adds the expand conv only when it changes the width (V2's block 1 gains one: 64 -> 16).
        self.expand = ConvBNAct(spec.in_channels, spec.expanded, 1, activation=act, **kw) if spec.expanded != spec.in_channels else None
        self.depthwise = ConvBNAct(
            spec.expanded, spec.expanded, spec.kernel, stride=spec.stride, depthwise=True, activation=act,
            depthwise_impl=depthwise_impl, fuse_eval_bn=fuse_eval_bn, **kw,
        )
        self.se = (
            SqueezeExcitation(spec.expanded, make_divisible(spec.expanded // 4, 8), kernel_max_images=se_kernel_max_images,
                              dtype=dtype, param_dtype=param_dtype, rng=rng)
            if spec.use_se
            else None
        )
        self.project = ConvBNAct(spec.expanded, spec.out_channels, 1, activation="identity", **kw)

    def runs_as_kernels(self, x) -> bool:
        """Eval mode with the C++ depthwise kernel: the whole block runs as one kernel call, or two around the SE's
        small matmuls (inverted_residual_kernel), on a big expanded map (FUSED_BLOCK_MIN_BYTES) and, with
        `fuse_small_blocks`, on smaller ones of narrow blocks from FUSED_SMALL_BLOCK_MIN_BATCH images and
        FUSED_SMALL_BLOCK_MIN_PIXELS pixels an image on."""
        if not self.depthwise.runs_as_one_kernel(self.depthwise.conv.dtype or x.dtype):
            return False
        spec = self.spec
        if x.size // x.shape[-1] * spec.expanded * 4 >= FUSED_BLOCK_MIN_BYTES:
            return True
        weight_bytes = 4 * spec.expanded * ((0 if self.expand is None else spec.in_channels) + spec.out_channels)
        return (self.fuse_small_blocks and x.shape[0] >= FUSED_SMALL_BLOCK_MIN_BATCH
                and x.shape[1] * x.shape[2] >= FUSED_SMALL_BLOCK_MIN_PIXELS
                and weight_bytes <= FUSED_BLOCK_MAX_WEIGHT_BYTES)

    def expansion_bn_in_depthwise(self, x) -> bool:
        """Training (batch statistics) with the C++ BN and depthwise kernels, and `fuse_train_bn`."""
        if not self.fuse_train_bn or self.expand is None:
            return False
        dtype = self.depthwise.conv.dtype or x.dtype
        return (jnp.dtype(dtype) == jnp.float32 and self.expand.bn.uses_cpu_kernel(x.ndim, dtype)
                and self.depthwise.conv.uses_cpu_kernel(dtype))

    def _expansion_bn_in_depthwise(self, x):
        """depthwise(act(BN(expand_conv(x)))): the depthwise kernels apply the expansion's BN + activation to each
        row as they read it (forward and kernel gradient), so the BN's output, the block's largest map, is never
        written and read back (cpu_kernels.batch_norm_act_depthwise). Then the depthwise layer's own BN + activation."""
        bn, conv = self.expand.bn, self.depthwise.conv
        z = self.expand.conv(x)
        d, mean, var = cpu_kernels.batch_norm_act_depthwise(z, bn.scale[...], bn.bias[...], bn.epsilon,
                                                            self.expand.activation, conv.kernel[...], conv.stride,
                                                            conv.padding)
        bn.update_running(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var), z.size // z.shape[-1])
        return self.depthwise.bn(d, self.depthwise.activation)

    def __call__(self, x):
        dtype = self.depthwise.conv.dtype or x.dtype
        if self.runs_as_kernels(x):
            expand = None if self.expand is None else folded_for_kernel(self.expand)
            project = folded_for_kernel(self.project)
            se = None if self.se is None else self.se.weights(jnp.float32)
            se_kernel_max_images = 0 if self.se is None else self.se.kernel_max_images
            return inverted_residual_kernel(self.depthwise.activation, self.spec.stride, self.depthwise.conv.padding,
                                            self.use_residual, se_kernel_max_images, x.astype(dtype), expand,
                                            self.depthwise.folded(), se, project)
        if self.expansion_bn_in_depthwise(x):
            y = self._expansion_bn_in_depthwise(x)
        else:
            y = x if self.expand is None else self.expand(x)
            y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y, eval_kernels=self.depthwise.runs_as_one_kernel(dtype))
        y = self.project(y)
        return y + x if self.use_residual else y


def _unfused_inverted_residual(activation, stride, padding, residual, _se_kernel_max_images, x, expand, depthwise, se,
                               project):
    """What inverted_residual_kernel computes, in XLA ops (its gradient's reference; the SE kernel limit is unused)."""
    act = ACTIVATIONS[activation]
    y = x
    if expand is not None:
        w, scale, shift = expand
        y = act(y @ w * scale + shift)
    y = unfused_conv_bn_act(True, activation, stride, padding, False, y, *depthwise)
    if se is not None:
        y = y * se_channel_scale(global_avg_pool(y), se)[:, None, None, :]
    w, scale, shift = project
    y = y @ w * scale + shift
    return y + x if residual else y


@kernel_with_reference_gradient(_unfused_inverted_residual, static_args=5)
def inverted_residual_kernel(activation: str, stride: int, padding: int, residual: bool, se_kernel_max_images: int, x,
                             expand, depthwise, se, project):
    """An eval-mode inverted residual in C++ kernel calls, so that its expanded map (and without SE its depthwise
    map: the block's largest) never goes to memory. Without SE one call (cpu_kernels.inverted_residual_forward);
    with SE (`se` = its weights, else None), whose global pool needs the whole depthwise output before the
    projection, two: expansion + depthwise (+ the pool's sums), then the SE's small matmuls here, then the projection
    with the SE scale folded into its weights (se_channel_scale, up to `se_kernel_max_images` images as a C++
    call). Each of `expand` (or None), `depthwise` and `project` is (kernel, BN scale, BN shift)."""
    if se is None:
        return cpu_kernels.inverted_residual_forward(x, expand, depthwise, project, activation, stride, padding,
                                                     residual)
    y, pooled = cpu_kernels.expand_depthwise_forward(x, expand, depthwise, activation, stride, padding)
    return cpu_kernels.se_project_forward(y, se_channel_scale(pooled, se, se_kernel_max_images), project,
                                          x if residual else None)


# Eval mode runs a bottleneck as one kernel call from this many images on: with fewer, XLA's ~6 small ops were as
# fast or faster (one 7x7x160 image: 0.13-0.15 vs 0.15-0.18 ms per block; four: even), with 8 and more the kernel
# wins (8 x 7x7: 0.53-0.60 vs 0.75 ms; 32 x 2x2, 64 px inputs: 0.39-0.52 vs 0.71-0.97 ms).
FUSED_BOTTLENECK_MIN_BATCH = 8


class Bottleneck(nnx.Module):
    """torchvision resnet.Bottleneck(inplanes, planes) without downsample: 1x1 -> 3x3 -> 1x1 (x4), + identity, ReLU."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, *, pointwise_impl: PointwiseImpl = "matmul",
        batch_norm_impl: BatchNormImpl = "auto", dense_conv_impl: StemConvImpl = "auto", fuse_eval_bn: bool = True,
        fuse_eval_block: bool = True, pointwise_kernel_max_pixels: int = POINTWISE_KERNEL_MAX_PIXELS, dtype=None,
        param_dtype=jnp.float32, rng: np.random.Generator,
    ):
        if inplanes != planes * self.expansion:
            raise ValueError(f"Bottleneck without downsample needs inplanes == 4 * planes, got {inplanes} and {planes}")
        kw = dict(bn=RESNET_BN, pointwise_impl=pointwise_impl, batch_norm_impl=batch_norm_impl,
                  pointwise_kernel_max_pixels=pointwise_kernel_max_pixels, dtype=dtype, param_dtype=param_dtype,
                  rng=rng)
        self.conv_bn1 = ConvBNAct(inplanes, planes, 1, activation="relu", **kw)
        # the 3x3 in eval mode: the C++ dense conv kernel with BN + ReLU unless dense_conv_impl is "xla"; with
        # fuse_eval_bn and fuse_eval_block the whole block is one kernel call (bottleneck_kernel)
        self.fuse_eval_block = fuse_eval_block
        self.conv_bn2 = ConvBNAct(planes, planes, 3, activation="relu", stem_conv_impl=dense_conv_impl,
                                  fuse_eval_bn=fuse_eval_bn, **kw)
        self.conv_bn3 = ConvBNAct(planes, inplanes, 1, activation="identity", **kw)

    def runs_as_one_kernel(self, x) -> bool:
        """`fuse_eval_block`, eval mode (all three BNs on running statistics: the kernel folds them), the 3x3 as a
        C++ kernel with `fuse_eval_bn`, and at least FUSED_BOTTLENECK_MIN_BATCH images."""
        return (self.fuse_eval_block and self.conv_bn2.runs_as_one_kernel(self.conv_bn2.conv.dtype or x.dtype)
                and self.conv_bn1.bn.use_running_average and self.conv_bn3.bn.use_running_average
                and x.shape[0] >= FUSED_BOTTLENECK_MIN_BATCH)

    def __call__(self, x):
        if self.runs_as_one_kernel(x):
            layers = (self.conv_bn1, self.conv_bn2, self.conv_bn3)
            return bottleneck_kernel(x.astype(jnp.float32), *map(folded_for_kernel, layers))
        return jax.nn.relu(self.conv_bn3(self.conv_bn2(self.conv_bn1(x))) + x)


def _unfused_bottleneck(x, conv1, conv2, conv3):
    (w1, s1, b1), (w3, s3, b3) = conv1, conv3
    y = jax.nn.relu(x @ w1 * s1 + b1)
    y = unfused_conv_bn_act(False, "relu", 1, 1, False, y, *conv2)
    return jax.nn.relu(y @ w3 * s3 + b3 + x)


@kernel_with_reference_gradient(_unfused_bottleneck)
def bottleneck_kernel(x, conv1, conv2, conv3):
    """An eval-mode bottleneck as one C++ kernel call (cpu_kernels.bottleneck_forward): on the tail's small maps
    XLA ran each of its ~6 ops as a separate short pass. Each conv is (kernel, BN scale, BN shift)."""
    return cpu_kernels.bottleneck_forward(x, conv1, conv2, conv3)
