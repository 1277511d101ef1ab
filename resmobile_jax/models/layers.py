"""Building blocks with PyTorch/torchvision semantics, in NHWC.

Every layer here exists because the Flax default differs from torchvision in a way that changes the numbers:
padding is explicit and symmetric (XLA 'SAME' is asymmetric at stride 2), BatchNorm keeps PyTorch's unbiased
running variance, max-pool pads with -inf, and convolutions use torchvision's fan-out He init.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
DepthwiseImpl = Literal["auto", "xla", "shifted"]

# Initial weights are drawn on the host with NumPy from one seeded Generator (`rng` in every constructor).
# XLA:CPU spends ~0.3 s compiling each jax.random draw, 30 s for this model's ~200 tensors; NumPy takes 30 ms.


def conv_init(rng: np.random.Generator, shape, dtype):
    """torchvision's conv init (MobileNetV3 and ResNet): kaiming_normal_(mode="fan_out"), i.e. plain (untruncated)
    normal with std sqrt(2 / fan_out), fan_out = kh * kw * out_channels. Not `he_normal` (fan_in, truncated)."""
    fan_out = int(np.prod(shape[:-2])) * shape[-1]
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2.0 / fan_out), dtype)


def linear_init(rng: np.random.Generator, shape, dtype):
    """torchvision MobileNetV3's init for nn.Linear: normal(0, 0.01), bias 0. The embedding head uses it too."""
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.01, dtype)

# BatchNorm conventions of the two torchvision families. Flax momentum = 1 - torch momentum.
MOBILENET_BN = dict(epsilon=1e-3, momentum=0.99)  # torch: eps=0.001, momentum=0.01
RESNET_BN = dict(epsilon=1e-5, momentum=0.9)  # torch: BatchNorm2d/1d defaults, eps=1e-5, momentum=0.1


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, never dropping more than 10%."""
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """torchvision's Conv2dNormActivation padding: symmetric (k - 1) // 2 * dilation on every side."""
    return (kernel_size - 1) // 2 * dilation


def hard_sigmoid(x: Array) -> Array:
    """PyTorch's Hardsigmoid: relu6(x + 3) / 6 (jax.nn.hard_sigmoid is the same function; spelled out for parity)."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_swish(x: Array) -> Array:
    """PyTorch's Hardswish: x * relu6(x + 3) / 6."""
    return x * hard_sigmoid(x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "hardswish": hard_swish,
    "identity": lambda x: x,
}


def default_depthwise_impl() -> str:
    """XLA:CPU's grouped convolution is 3-5x slower than shifted multiply-adds (DESIGN.md §6); GPUs/TPUs have
    fast native depthwise kernels."""
    return "shifted" if jax.default_backend() == "cpu" else "xla"


def max_pool_3x3_s2(x: Array) -> Array:
    """ResNet's MaxPool2d(3, stride=2, padding=1): the padding is -inf, so it never wins the max."""
    return jax.lax.reduce_window(
        x,
        -jnp.inf,  # a Python scalar, so JAX sees reduce_window_max and can differentiate it
        jax.lax.max,
        window_dimensions=(1, 3, 3, 1),
        window_strides=(1, 2, 2, 1),
        padding=((0, 0), (1, 1), (1, 1), (0, 0)),
    )


def global_avg_pool(x: Array) -> Array:
    """AdaptiveAvgPool2d(1) + flatten, accumulated in float32 so bf16 runs do not lose the mean."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


class BatchNorm(nnx.Module):
    """BatchNorm over all axes but the last, with PyTorch's train/eval semantics.

    Differences from `nnx.BatchNorm`, each needed for parity with torchvision checkpoints:
    - the running variance is updated with the *unbiased* batch variance (PyTorch), while the batch itself is
      normalized with the biased one;
    - `num_batches_tracked` is kept, so torch -> Flax -> torch round trips are bit-exact;
    - statistics are computed in float32 whatever the compute dtype.
    Under `jax.jit` with a batch sharded over a mesh, the means are global-batch means (SyncBN for free).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float,
        momentum: float,
        dtype=None,
        param_dtype=jnp.float32,
        use_running_average: bool = False,
    ):
        self.num_features = num_features
        self.epsilon = epsilon
        self.momentum = momentum
        self.dtype = dtype
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.asarray(np.ones((num_features,)), param_dtype))
        self.bias = nnx.Param(jnp.asarray(np.zeros((num_features,)), param_dtype))
        self.mean = nnx.BatchStat(jnp.asarray(np.zeros((num_features,)), jnp.float32))
        self.var = nnx.BatchStat(jnp.asarray(np.ones((num_features,)), jnp.float32))
        self.num_batches_tracked = nnx.BatchStat(jnp.asarray(np.zeros((), np.int32)))

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        reduce_axes = tuple(range(x.ndim - 1))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axis=reduce_axes)
            var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes)
            n = x.size // x.shape[-1]
            unbiased_var = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1.0 - m) * mean
            self.var[...] = m * self.var[...] + (1.0 - m) * unbiased_var
            self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
        # Fold into one multiply-add, as PyTorch's CPU kernel does.
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(jnp.float32)
        shift = self.bias[...].astype(jnp.float32) - mean * inv
        return (x.astype(jnp.float32) * inv + shift).astype(dtype)


class Conv(nnx.Module):
    """A bias-free (by default) dense 2D convolution with explicit symmetric padding, HWIO kernel."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int | None = None,
        use_bias: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rng: np.random.Generator,
    ):
        self.stride = stride
        self.padding = same_padding(kernel_size) if padding is None else padding
        self.dtype = dtype
        self.kernel = nnx.Param(conv_init(rng, (kernel_size, kernel_size, in_channels, out_channels), param_dtype))
        self.bias = nnx.Param(jnp.asarray(np.zeros((out_channels,)), param_dtype)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class DepthwiseConv(nnx.Module):
    """Depthwise k x k convolution (groups = channels), kernel (k, k, 1, C), no bias.

    Two implementations that compute the same function:
    - "xla": `conv_general_dilated(feature_group_count=C)`, fastest where XLA has a native depthwise kernel (GPU/TPU);
    - "shifted": a sum of k*k strided slices times per-channel weights, which XLA:CPU fuses into one loop and runs
      3-5x faster than its grouped convolution.
    "auto" picks per backend at trace time.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        impl: DepthwiseImpl = "auto",
        dtype=None,
        param_dtype=jnp.float32,
        rng: np.random.Generator,
    ):
        if impl not in ("auto", "xla", "shifted"):
            raise ValueError(f"depthwise_impl must be 'auto', 'xla' or 'shifted', got {impl!r}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = same_padding(kernel_size)
        self.impl = impl
        self.dtype = dtype
        self.kernel = nnx.Param(conv_init(rng, (kernel_size, kernel_size, 1, channels), param_dtype))

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        x, w = x.astype(dtype), self.kernel[...].astype(dtype)
        impl = default_depthwise_impl() if self.impl == "auto" else self.impl
        return depthwise_conv(x, w, self.stride, self.padding, impl)


def depthwise_conv(x: Array, w: Array, stride: int, padding: int, impl: str) -> Array:
    p, s = padding, stride
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
        )
    k = w.shape[0]
    n, h, wd, c = x.shape
    h_out, w_out = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            tap = jax.lax.slice(xp, (0, i, j, 0), (n, i + (h_out - 1) * s + 1, j + (w_out - 1) * s + 1, c), (1, s, s, 1))
            term = tap * w[i, j, 0]
            out = term if out is None else out + term
    return out


class ConvBNAct(nnx.Module):
    """torchvision's Conv2dNormActivation: conv (dense or depthwise, no bias) -> BatchNorm -> activation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        depthwise: bool = False,
        activation: str = "relu",
        bn: dict = MOBILENET_BN,
        depthwise_impl: DepthwiseImpl = "auto",
        dtype=None,
        param_dtype=jnp.float32,
        rng: np.random.Generator,
    ):
        if depthwise:
            assert in_channels == out_channels, "depthwise convs keep the channel count"
            self.conv = DepthwiseConv(
                in_channels, kernel_size, stride=stride, impl=depthwise_impl, dtype=dtype, param_dtype=param_dtype, rng=rng
            )
        else:
            self.conv = Conv(
                in_channels, out_channels, kernel_size, stride=stride, dtype=dtype, param_dtype=param_dtype, rng=rng
            )
        self.bn = BatchNorm(out_channels, dtype=dtype, param_dtype=param_dtype, **bn)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        return ACTIVATIONS[self.activation](self.bn(self.conv(x)))


class Linear(nnx.Module):
    """nn.Linear with kernel (in, out) and a configurable init (the torch weight is the transpose)."""

    def __init__(self, in_features, out_features, *, kernel_init, dtype=None, param_dtype=jnp.float32, rng: np.random.Generator):
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rng, (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.asarray(np.zeros((out_features,)), param_dtype))

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        return x.astype(dtype) @ self.kernel[...].astype(dtype) + self.bias[...].astype(dtype)
