"""The shared body: MobileNetV3 inverted residuals (with squeeze-excitation) and ResNet bottlenecks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resmobile_jax.models.architecture import InvertedResidualSpec
from resmobile_jax.models.layers import (
    MOBILENET_BN,
    RESNET_BN,
    ConvBNAct,
    DepthwiseImpl,
    Linear,
    PointwiseImpl,
    conv_init,
    global_avg_pool,
    hard_sigmoid,
    make_divisible,
)


class SqueezeExcitation(nnx.Module):
    """torchvision's SqueezeExcitation as MobileNetV3 uses it: GAP -> fc1 -> ReLU -> fc2 -> Hardsigmoid -> scale.

    fc1/fc2 are biased 1x1 convs in torchvision; on a 1x1 map they are Linear layers (same init: fan-out He).
    """

    def __init__(self, channels: int, squeeze_channels: int, *, dtype=None, param_dtype=jnp.float32, rng: np.random.Generator):
        kw = dict(kernel_init=conv_init, dtype=dtype, param_dtype=param_dtype, rng=rng)
        self.fc1 = Linear(channels, squeeze_channels, **kw)
        self.fc2 = Linear(squeeze_channels, channels, **kw)

    def __call__(self, x):
        scale = hard_sigmoid(self.fc2(jax.nn.relu(self.fc1(global_avg_pool(x)))))
        return x * scale[:, None, None, :].astype(x.dtype)


class InvertedResidual(nnx.Module):
    """MobileNetV3 block: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project (linear), residual if shape allows."""

    def __init__(
        self,
        spec: InvertedResidualSpec,
        *,
        depthwise_impl: DepthwiseImpl = "auto",
        pointwise_impl: PointwiseImpl = "matmul",
        fuse_eval_bn: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        rng: np.random.Generator,
    ):
        act = "hardswish" if spec.activation == "HS" else "relu"
        kw = dict(bn=MOBILENET_BN, pointwise_impl=pointwise_impl, dtype=dtype, param_dtype=param_dtype, rng=rng)
        self.spec = spec
        self.use_residual = spec.stride == 1 and spec.in_channels == spec.out_channels
        # torchvision adds the expand conv only when it changes the width (V2's block 1 gains one: 64 -> 16).
        self.expand = ConvBNAct(spec.in_channels, spec.expanded, 1, activation=act, **kw) if spec.expanded != spec.in_channels else None
        self.depthwise = ConvBNAct(
            spec.expanded, spec.expanded, spec.kernel, stride=spec.stride, depthwise=True, activation=act,
            depthwise_impl=depthwise_impl, fuse_eval_bn=fuse_eval_bn, **kw,
        )
        self.se = (
            SqueezeExcitation(spec.expanded, make_divisible(spec.expanded // 4, 8), dtype=dtype, param_dtype=param_dtype, rng=rng)
            if spec.use_se
            else None
        )
        self.project = ConvBNAct(spec.expanded, spec.out_channels, 1, activation="identity", **kw)

    def __call__(self, x):
        if self.expand is not None and self.expand.bn.use_running_average and self.depthwise.runs_as_one_kernel(
                self.depthwise.conv.dtype or x.dtype):
            # eval mode, C++ depthwise kernel: the expansion's BN + activation run inside it, on its input rows
            y = self.depthwise(self.expand.conv(x), input_bn_act=self.expand.folded_bn_act())
        else:
            y = x if self.expand is None else self.expand(x)
            y = self.depthwise(y)
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return y + x if self.use_residual else y


class Bottleneck(nnx.Module):
    """torchvision resnet.Bottleneck(inplanes, planes) without downsample: 1x1 -> 3x3 -> 1x1 (x4), + identity, ReLU."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, *, pointwise_impl: PointwiseImpl = "matmul", dtype=None,
        param_dtype=jnp.float32, rng: np.random.Generator,
    ):
        if inplanes != planes * self.expansion:
            raise ValueError(f"Bottleneck without downsample needs inplanes == 4 * planes, got {inplanes} and {planes}")
        kw = dict(bn=RESNET_BN, pointwise_impl=pointwise_impl, dtype=dtype, param_dtype=param_dtype, rng=rng)
        self.conv_bn1 = ConvBNAct(inplanes, planes, 1, activation="relu", **kw)
        self.conv_bn2 = ConvBNAct(planes, planes, 3, activation="relu", **kw)
        self.conv_bn3 = ConvBNAct(planes, inplanes, 1, activation="identity", **kw)

    def __call__(self, x):
        return jax.nn.relu(self.conv_bn3(self.conv_bn2(self.conv_bn1(x))) + x)
