"""The two stems that distinguish V1 from V2."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from resmobile_jax.models.layers import MOBILENET_BN, RESNET_BN, BatchNormImpl, ConvBNAct, StemConvImpl


class MobileNetStem(nnx.Module):
    """V1: MobileNetV3-Large features[0], Conv 3x3 s2 3->16, BN(eps 1e-3), Hardswish. Output stride 2."""

    out_channels = 16
    stride = 2

    def __init__(self, *, conv_impl: StemConvImpl = "auto", batch_norm_impl: BatchNormImpl = "auto",
                 fuse_eval_bn: bool = True, dtype=None, param_dtype=jnp.float32, rng: np.random.Generator):
        self.conv_bn_act = ConvBNAct(
            3, 16, 3, stride=2, activation="hardswish", bn=MOBILENET_BN, stem_conv_impl=conv_impl, fuse_eval_bn=fuse_eval_bn, dtype=dtype,
            batch_norm_impl=batch_norm_impl, param_dtype=param_dtype, rng=rng,
        )

    def __call__(self, x):
        return self.conv_bn_act(x)


class ResNetStem(nnx.Module):
    """V2: ResNet conv1 7x7 s2 p3 3->64, bn1 (eps 1e-5), ReLU, MaxPool 3x3 s2 p1. Output stride 4."""

    out_channels = 64
    stride = 4

    def __init__(self, *, conv_impl: StemConvImpl = "auto", batch_norm_impl: BatchNormImpl = "auto",
                 fuse_eval_bn: bool = True, dtype=None, param_dtype=jnp.float32, rng: np.random.Generator):
        self.conv_bn_act = ConvBNAct(
            3, 64, 7, stride=2, activation="relu", bn=RESNET_BN, stem_conv_impl=conv_impl, fuse_eval_bn=fuse_eval_bn, dtype=dtype,
            batch_norm_impl=batch_norm_impl, param_dtype=param_dtype, rng=rng,
        )

    def __call__(self, x):
        return self.conv_bn_act(x, max_pool=True)
