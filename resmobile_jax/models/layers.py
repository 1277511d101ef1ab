"""Building blocks with PyTorch/torchvision semantics, in NHWC.

Every layer here exists because the Flax default differs from torchvision in a way that changes the numbers:
padding is explicit and symmetric (XLA 'SAME' is asymmetric at stride 2), BatchNorm keeps PyTorch's unbiased
running variance, max-pool pads with -inf, and convolutions use torchvision's fan-out He init.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resmobile_jax.models.kernels import cpu_kernels

Array = jax.Array
DepthwiseImpl = Literal["auto", "xla", "shifted", "cpu_kernel"]
DEPTHWISE_IMPLS = ("auto", "xla", "shifted", "cpu_kernel")
PointwiseImpl = Literal["matmul", "conv"]
POINTWISE_IMPLS = ("matmul", "conv")
StemConvImpl = Literal["auto", "xla", "cpu_kernel"]
STEM_CONV_IMPLS = ("auto", "xla", "cpu_kernel")
BatchNormImpl = Literal["auto", "xla", "cpu_kernel"]
BATCH_NORM_IMPLS = ("auto", "xla", "cpu_kernel")

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


@jax.custom_jvp
def hard_sigmoid(x: Array) -> Array:
    """PyTorch's Hardsigmoid: relu6(x + 3) / 6, with PyTorch's derivative (1/6 strictly inside (-3, 3), else 0;
    autodiff of the clip would give 1/12 at the ends)."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


@hard_sigmoid.defjvp
def _hard_sigmoid_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    slope = jnp.where((x > -3.0) & (x < 3.0), 1.0 / 6.0, 0.0).astype(dx.dtype)
    return hard_sigmoid(x), slope * dx


@jax.custom_jvp
def hard_swish(x: Array) -> Array:
    """PyTorch's Hardswish: x * relu6(x + 3) / 6, with PyTorch's derivative written out: autodiff of the product
    and the clip keeps several map-sized intermediates alive, and XLA:CPU took 4x as long for V1's stem BN +
    Hardswish forward + backward (67 vs 17 ms at 112x112x16, batch 32)."""
    return x * (jnp.clip(x + 3.0, 0.0, 6.0) / 6.0)


@hard_swish.defjvp
def _hard_swish_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    slope = jnp.where(x <= -3.0, 0.0, jnp.where(x < 3.0, x / 3.0 + 0.5, 1.0)).astype(dx.dtype)  # torch 2.x: open interval
    return hard_swish(x), slope * dx


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "hardswish": hard_swish,
    "identity": lambda x: x,
}


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def static_at_most(size, limit: int) -> bool:
    """size <= limit for a size known at trace time; False for a symbolic one (a shape-polymorphic export's batch),
    which then takes the XLA form."""
    return isinstance(size, int) and size <= limit


def cpu_kernels_apply(dtype) -> bool:
    """Where "auto" uses the hand-written XLA:CPU kernels (models/kernels): float32 on a one-device CPU. With the
    batch sharded over several CPU devices XLA's partitioner would gather it onto each device around a custom call."""
    return (jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32 and jax.device_count() == 1
            and cpu_kernels.available())


def default_depthwise_impl(dtype=jnp.float32) -> str:
    """GPUs/TPUs have fast native depthwise kernels ("xla"). On CPU the hand-written kernel where it applies, else
    "shifted": XLA:CPU's grouped convolution is 3-5x slower than shifted multiply-adds (DESIGN.md §6)."""
    if jax.default_backend() != "cpu":
        return "xla"
    return "cpu_kernel" if cpu_kernels_apply(dtype) else "shifted"


def _max_pool_window(x: Array) -> Array:
    return jax.lax.reduce_window(
        x,
        -jnp.inf,  # a Python scalar, so JAX sees reduce_window_max
        jax.lax.max,
        window_dimensions=(1, 3, 3, 1),
        window_strides=(1, 2, 2, 1),
        padding=((0, 0), (1, 1), (1, 1), (0, 0)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_3x3_s2(x: Array, impl: str = "auto") -> Array:
    """ResNet's MaxPool2d(3, stride=2, padding=1): the padding is -inf, so it never wins the max.

    The forward pass is XLA's reduce_window, or on CPU ("auto" where the C++ kernels apply, or "cpu_kernel") the C++
    kernel: 2.5x faster on V2's stem output. The gradient is hand-written: XLA:CPU's select-and-scatter (the
    automatic one) is 4-8x slower than the whole forward pass; the XLA form below is the fallback, the C++ kernel
    `cpu_kernels.max_pool_backward` (one pass) the CPU path. Like PyTorch's kernel, each output's gradient goes to
    the first maximum of its window in row-major order, so ties route exactly as in torchvision."""
    if _max_pool_kernel(impl, x):
        return cpu_kernels.max_pool_forward(x)
    return _max_pool_window(x)


def _max_pool_kernel(impl: str, x: Array) -> bool:
    return impl == "cpu_kernel" or (impl == "auto" and cpu_kernels_apply(x.dtype))


def _max_pool_fwd(x, impl):
    y = max_pool_3x3_s2(x, impl)
    return y, (x, y)


def _max_pool_bwd(impl, residuals, g):
    x, y = residuals
    if _max_pool_kernel(impl, x):
        return (cpu_kernels.max_pool_backward(x, y, g),)
    n, h, w, c = x.shape
    ho, wo = y.shape[1:3]
    # NaN padding never equals the max: a window of -inf values routes its gradient to its first tap inside x, as
    # PyTorch's kernel does.
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=jnp.nan)
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), g.dtype)
    # Tap (i, j) of output (r, q) sits at padded input (2r + i, 2q + j). Split the padded input grid by row and column
    # parity: each parity grid is output-sized (+1), and a tap lands in grid (i % 2, j % 2) shifted by (i // 2, j // 2).
    # Summing there and interleaving the four grids once is far less memory traffic than nine full-size scatters.
    grids = [[None, None], [None, None]]
    for i in range(3):
        for j in range(3):
            tap = jax.lax.slice(xp, (0, i, j, 0), (n, i + 2 * (ho - 1) + 1, j + 2 * (wo - 1) + 1, c), (1, 2, 2, 1))
            hit = (tap == y) & ~taken  # the first maximum in row-major window order gets the gradient
            taken = taken | hit
            si, sj = i // 2, j // 2
            part = jnp.pad(jnp.where(hit, g, zero), ((0, 0), (si, 1 - si), (sj, 1 - sj), (0, 0)))
            a, b = i % 2, j % 2
            grids[a][b] = part if grids[a][b] is None else grids[a][b] + part
    rows = [jnp.stack(grids[a], axis=3) for a in (0, 1)]  # (n, ho+1, wo+1, 2, c) each
    full = jnp.stack(rows, axis=2).reshape(n, 2 * ho + 2, 2 * wo + 2, c)  # row 2r + a, column 2q + b
    return (full[:, 1:h + 1, 1:w + 1, :],)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


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

    `impl`: in training mode, "cpu_kernel" computes BN + the activation with batch statistics in C++ (and its
    gradient: 5 passes over the map where XLA's autodiff form takes ~7, half the time on the big maps); "auto"
    does so for NHWC maps where the C++ kernels apply (float32, one CPU device), "xla" never. Eval-mode BN is one
    multiply-add either way (or inside the conv kernels, ConvBNAct).
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
        impl: BatchNormImpl = "auto",
    ):
        check_choice("batch_norm_impl", impl, BATCH_NORM_IMPLS)
        if impl == "cpu_kernel":
            cpu_kernels.require()
        self.impl = impl
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

    def uses_cpu_kernel(self, ndim: int, dtype) -> bool:
        if self.use_running_average:
            return False
        return self.impl == "cpu_kernel" or (self.impl == "auto" and ndim == 4 and cpu_kernels_apply(dtype))

    def __call__(self, x: Array, activation: str = "identity") -> Array:
        """act(BN(x)), `activation` one of ACTIVATIONS (the BN output in the compute dtype, then the activation)."""
        dtype = self.dtype or x.dtype
        n = x.size // x.shape[-1]  # values per channel
        if self.uses_cpu_kernel(x.ndim, dtype):
            if dtype != jnp.float32:
                raise ValueError(f"batch_norm_impl='cpu_kernel' computes in float32, got {dtype}; use 'auto' or 'xla'")
            y, mean, var = cpu_kernels.batch_norm_act(x, self.scale[...], self.bias[...], self.epsilon, activation)
            self.update_running(jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var), n)
            return y
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            reduce_axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axis=reduce_axes)
            var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes)
            self.update_running(mean, var, n)
        inv, shift = self.folded_affine(mean, var)
        return ACTIVATIONS[activation]((x.astype(jnp.float32) * inv + shift).astype(dtype))

    def update_running(self, mean: Array, var: Array, n: int) -> None:
        """PyTorch's update: the running variance from the unbiased batch variance (n values per channel)."""
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1.0 - m) * mean
        self.var[...] = m * self.var[...] + (1.0 - m) * var * (n / max(n - 1, 1))
        self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1

    def folded_affine(self, mean: Array | None = None, var: Array | None = None) -> tuple[Array, Array]:
        """(scale, shift), float32, with BN(x) = x * scale + shift: one multiply-add, as PyTorch's CPU kernel does.
        Without arguments, from the running statistics (eval mode)."""
        mean = self.mean[...] if mean is None else mean
        var = self.var[...] if var is None else var
        inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(jnp.float32)
        return inv, self.bias[...].astype(jnp.float32) - mean * inv


def _conv(x: Array, w: Array, stride: int, padding: int) -> Array:
    p = padding
    return jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_im2col_weight_grad(x: Array, w: Array, stride: int, padding: int) -> Array:
    """A dense convolution whose kernel gradient is one (k*k*Cin, N*H*W) x (N*H*W, Cout) matmul over image patches.

    For the V2 stem (7x7, 3 input channels) XLA:CPU's own kernel-gradient convolution is 2.5x slower than this
    (measured: 1.7 s vs 0.66 s at 224 px, batch 32); the forward pass and the input gradient are XLA's."""
    return _conv(x, w, stride, padding)


def _conv_fwd(x, w, stride, padding):
    return _conv(x, w, stride, padding), (x, w)


def _conv_bwd(stride, padding, residuals, g):
    x, w = residuals
    k, s, p = w.shape[0], stride, padding
    n, _, _, c = x.shape
    ho, wo = g.shape[1:3]
    # Channel-major patches: the innermost axis is a long image row, not the 3 channels, so the copies vectorize.
    xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (p, p), (p, p)))
    taps = [jax.lax.slice(xt, (0, 0, i, j), (c, n, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1), (1, 1, s, s))
            for i in range(k) for j in range(k)]
    patches = jnp.stack(taps).reshape(k * k * c, -1)  # rows in HWIO order (i, j, c)
    dw = (patches @ g.reshape(-1, g.shape[-1]).astype(patches.dtype)).reshape(w.shape).astype(w.dtype)
    dx = jax.vjp(lambda x: _conv(x, w, s, p), x)[1](g)[0]  # dropped by XLA when x is the input images
    return dx, dw


conv_im2col_weight_grad.defvjp(_conv_fwd, _conv_bwd)


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
        pointwise_impl: PointwiseImpl = "matmul",
        stem_conv_impl: StemConvImpl = "auto",
        dtype=None,
        param_dtype=jnp.float32,
        rng: np.random.Generator,
    ):
        check_choice("pointwise_impl", pointwise_impl, POINTWISE_IMPLS)
        check_choice("stem_conv_impl", stem_conv_impl, STEM_CONV_IMPLS)
        if stem_conv_impl == "cpu_kernel":
            cpu_kernels.require()
        self.stride = stride
        self.padding = same_padding(kernel_size) if padding is None else padding
        self.dtype = dtype
        # 1x1 convs as (N*H*W, Cin) x (Cin, Cout) matmuls: XLA:CPU runs their kernel gradient 4-25x faster that way
        # (bench.breakdown); "conv" keeps conv_general_dilated.
        self.pointwise_matmul = kernel_size == 1 and self.padding == 0 and pointwise_impl == "matmul"
        # Few input channels (the stems): the hand-written XLA:CPU kernel where it applies ("auto") or is asked for;
        # otherwise, with a large kernel (V2's 7x7), XLA's conv with a patch-matmul kernel gradient. In eval mode
        # (ConvBNAct's fused call) the same kernel also runs wider dense convs (the tail's 3x3 40 -> 40 on 7x7 or 2x2
        # maps: 1.3-2.4x faster than XLA's conv there, which also reversed the kernel on every call); 1x1 convs
        # never (pointwise_impl="conv" keeps XLA's).
        self.eval_conv_impl = stem_conv_impl if in_channels <= 4 or kernel_size > 1 else "xla"
        self.stem_conv_impl = stem_conv_impl if in_channels <= 4 else "xla"
        self.im2col_weight_grad = in_channels <= 4 and kernel_size >= 5
        self.kernel = nnx.Param(conv_init(rng, (kernel_size, kernel_size, in_channels, out_channels), param_dtype))
        self.bias = nnx.Param(jnp.asarray(np.zeros((out_channels,)), param_dtype)) if use_bias else None

    def uses_cpu_kernel(self, dtype, fused_eval: bool = False) -> bool:
        impl = self.eval_conv_impl if fused_eval else self.stem_conv_impl
        return not self.pointwise_matmul and (impl == "cpu_kernel" or (impl == "auto" and cpu_kernels_apply(dtype)))

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        x, w = x.astype(dtype), self.kernel[...].astype(dtype)
        if self.pointwise_matmul:
            y = pointwise_matmul(x, w, self.stride)
        elif self.uses_cpu_kernel(dtype):
            if dtype != jnp.float32:
                raise ValueError(f"stem_conv_impl='cpu_kernel' computes in float32, got {dtype}; use 'auto' or 'xla'")
            y = cpu_kernels.dense_conv(x, w, self.stride, self.padding)
        else:
            conv = conv_im2col_weight_grad if self.im2col_weight_grad else _conv
            y = conv(x, w, self.stride, self.padding)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


def pointwise_matmul(x: Array, w: Array, stride: int) -> Array:
    """A 1x1 convolution without padding (kernel (1, 1, Cin, Cout)) as one matmul; stride s keeps every s-th pixel."""
    x = x[:, ::stride, ::stride, :] if stride > 1 else x
    n, h, wd, c = x.shape
    return (x.reshape(n * h * wd, c) @ w.reshape(c, w.shape[-1])).reshape(n, h, wd, w.shape[-1])


class DepthwiseConv(nnx.Module):
    """Depthwise k x k convolution (groups = channels), kernel (k, k, 1, C), no bias.

    Two implementations that compute the same function:
    - "xla": `conv_general_dilated(feature_group_count=C)`, fastest where XLA has a native depthwise kernel (GPU/TPU);
    - "shifted": a sum of k*k strided slices times per-channel weights, which XLA:CPU fuses into one loop and runs
      3-5x faster than its grouped convolution (but its kernel gradient 10-30x slower than the forward pass);
    - "cpu_kernel": hand-written XLA:CPU custom calls for all three passes (kernels/cpu_kernels.cc, float32),
      17-25x faster than "shifted" for the kernel gradient.
    "auto" picks per backend, dtype and device count at trace time (default_depthwise_impl).
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
        check_choice("depthwise_impl", impl, DEPTHWISE_IMPLS)
        if impl == "cpu_kernel":
            cpu_kernels.require()
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = same_padding(kernel_size)
        self.impl = impl
        self.dtype = dtype
        self.kernel = nnx.Param(conv_init(rng, (kernel_size, kernel_size, 1, channels), param_dtype))

    def resolved_impl(self, dtype) -> str:
        return default_depthwise_impl(dtype) if self.impl == "auto" else self.impl

    def uses_cpu_kernel(self, dtype, fused_eval: bool = False) -> bool:
        return self.resolved_impl(dtype) == "cpu_kernel"

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        x, w = x.astype(dtype), self.kernel[...].astype(dtype)
        return depthwise_conv(x, w, self.stride, self.padding, self.resolved_impl(dtype))


def depthwise_conv(x: Array, w: Array, stride: int, padding: int, impl: str) -> Array:
    p, s = padding, stride
    if impl == "cpu_kernel":
        if x.dtype != jnp.float32:
            raise ValueError(f"depthwise_impl='cpu_kernel' computes in float32, got {x.dtype}; use 'auto' or 'shifted'")
        return cpu_kernels.depthwise_conv(x, w, s, p)
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


def kernel_with_reference_gradient(reference: Callable, static_args: int = 0):
    """Decorator: a C++ forward kernel made differentiable with the gradient of `reference`, the same function in
    XLA ops (same signature; its first `static_args` arguments are hashable settings). The backward pass recomputes
    the reference from the kernel's saved inputs and takes its vjp, so the eval-mode kernels still train
    (frozen-BN fine-tuning) and their gradient is exactly the XLA form's."""

    def wrap(kernel: Callable) -> Callable:
        differentiable = jax.custom_vjp(kernel, nondiff_argnums=tuple(range(static_args)))

        def forward(*args):
            return differentiable(*args), args[static_args:]

        def backward(*args):
            *settings, saved, g = args
            return jax.vjp(functools.partial(reference, *settings), *saved)[1](g)

        differentiable.defvjp(forward, backward)
        return differentiable  # custom_vjp keeps the kernel's name and docstring

    return wrap


def unfused_conv_bn_act(depthwise, activation, stride, padding, max_pool, x, w, scale, shift):
    """What conv_bn_act_kernel computes, from the plain kernels and XLA ops (its gradient's reference)."""
    conv = cpu_kernels.depthwise_conv if depthwise else cpu_kernels.dense_conv
    y = ACTIVATIONS[activation](conv(x, w, stride, padding) * scale + shift)
    return max_pool_3x3_s2(y) if max_pool else y


@kernel_with_reference_gradient(unfused_conv_bn_act, static_args=5)
def conv_bn_act_kernel(depthwise: bool, activation: str, stride: int, padding: int, max_pool: bool, x, w, scale,
                       shift):
    """act(conv(x, w) * scale + shift) as one C++ kernel call (eval-mode BatchNorm folded into scale and shift),
    then with `max_pool` (dense only) ResNet's 3x3 stride-2 max pool. XLA cannot fuse into a custom call, so
    unfused each of these is one more pass over a feature map in memory."""
    return cpu_kernels.conv_bn_act_forward(x, w, scale, shift, activation, stride, padding, depthwise=depthwise,
                                           max_pool=max_pool)


# Eval mode runs a 1x1 conv + BN + activation over at most this many pixels (N*H*W) as one C++ call
# (pointwise_bn_act_kernel): a batch-1 embedding's 7x7 stage (49 pixels), where XLA's matmul of 49 rows by 160 ->
# 960 channels ran at ~90 GFLOP/s and the BN + activation was one more op (224 px batch-1 embed 0.95-0.97x the time
# on a 2-core Zen 4, benchmarks/SPEED.md). From 128 pixels on (64 px inputs at batch 32: 2x2 maps) XLA's matmuls were
# faster (1.025x, ad-hoc; `bench.ab --option pointwise_kernel_max_pixels --values 64,128 --size 64 --batch 32`
# reruns it). config.model.pointwise_kernel_max_pixels; 0 keeps every 1x1 on XLA.
POINTWISE_KERNEL_MAX_PIXELS = 64


def _unfused_pointwise_bn_act(activation, x, w, scale, shift):
    return ACTIVATIONS[activation](x @ w * scale + shift)


@kernel_with_reference_gradient(_unfused_pointwise_bn_act, static_args=1)
def pointwise_bn_act_kernel(activation: str, x, w, scale, shift):
    """act((x @ w) * scale + shift), w (Cin, Cout), as one C++ call (cpu_kernels.pointwise_forward_bn_act)."""
    return cpu_kernels.pointwise_forward_bn_act(x, w, scale, shift, activation)


class ConvBNAct(nnx.Module):
    """torchvision's Conv2dNormActivation: conv (dense or depthwise, no bias) -> BatchNorm -> activation.

    In eval mode with a C++ conv kernel (and `fuse_eval_bn`), the three run as one kernel call (conv_bn_act_kernel);
    in training mode BN + activation may run as one (BatchNorm's `impl`, `batch_norm_impl` here).
    """

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
        pointwise_impl: PointwiseImpl = "matmul",
        stem_conv_impl: StemConvImpl = "auto",
        batch_norm_impl: BatchNormImpl = "auto",
        fuse_eval_bn: bool = True,
        pointwise_kernel_max_pixels: int = POINTWISE_KERNEL_MAX_PIXELS,
        dtype=None,
        param_dtype=jnp.float32,
        rng: np.random.Generator,
    ):
        self.fuse_eval_bn = fuse_eval_bn
        self.pointwise_kernel_max_pixels = pointwise_kernel_max_pixels
        if depthwise:
            assert in_channels == out_channels, "depthwise convs keep the channel count"
            self.conv = DepthwiseConv(
                in_channels, kernel_size, stride=stride, impl=depthwise_impl, dtype=dtype, param_dtype=param_dtype, rng=rng
            )
        else:
            self.conv = Conv(
                in_channels, out_channels, kernel_size, stride=stride, pointwise_impl=pointwise_impl,
                stem_conv_impl=stem_conv_impl, dtype=dtype, param_dtype=param_dtype, rng=rng,
            )
        self.bn = BatchNorm(out_channels, dtype=dtype, param_dtype=param_dtype, impl=batch_norm_impl, **bn)
        self.activation = activation

    def runs_as_one_kernel(self, dtype) -> bool:
        """Eval mode, float32 (else the unfused path says what is wrong with "cpu_kernel"), a C++ conv kernel."""
        return (self.fuse_eval_bn and self.bn.use_running_average and jnp.dtype(dtype) == jnp.float32
                and self.conv.uses_cpu_kernel(dtype, fused_eval=True))

    def runs_as_pointwise_kernel(self, x) -> bool:
        """Eval mode, float32 on a CPU the C++ kernels apply to, a 1x1 convolution (as a matmul, stride 1) over at
        most `pointwise_kernel_max_pixels` pixels: conv, BN and activation as one call (pointwise_bn_act_kernel)."""
        dtype = self.conv.dtype or x.dtype
        return (isinstance(self.conv, Conv) and self.conv.pointwise_matmul and self.conv.stride == 1
                and self.fuse_eval_bn and self.bn.use_running_average and cpu_kernels_apply(dtype)
                and static_at_most(math.prod(x.shape[:-1]), self.pointwise_kernel_max_pixels))

    def folded(self, dtype=jnp.float32) -> tuple[Array, Array, Array]:
        """(kernel, scale, shift): the conv's kernel and its eval-mode BN, for a kernel that fuses more layers."""
        return (self.conv.kernel[...].astype(dtype), *self.bn.folded_affine())

    def __call__(self, x: Array, max_pool: bool = False) -> Array:
        """`max_pool`: ResNet's 3x3 stride-2 max pool after the activation (the V2 stem), inside the kernel when it
        runs as one."""
        dtype = self.conv.dtype or x.dtype
        if not max_pool and self.runs_as_pointwise_kernel(x):
            w, scale, shift = self.folded(dtype)
            return pointwise_bn_act_kernel(self.activation, x.astype(dtype), w.reshape(w.shape[-2:]), scale, shift)
        if self.runs_as_one_kernel(dtype):
            depthwise = isinstance(self.conv, DepthwiseConv)
            return conv_bn_act_kernel(depthwise, self.activation, self.conv.stride, self.conv.padding, max_pool,
                                      x.astype(dtype), *self.folded(dtype))
        y = self.bn(self.conv(x), self.activation)
        if not max_pool:
            return y
        # the pool follows the conv's implementation: portable exports ask for "xla", which has no custom calls
        return max_pool_3x3_s2(y, "cpu_kernel" if self.conv.uses_cpu_kernel(dtype) else "xla")


class Linear(nnx.Module):
    """nn.Linear with kernel (in, out) and a configurable init (the torch weight is the transpose)."""

    def __init__(self, in_features, out_features, *, kernel_init, dtype=None, param_dtype=jnp.float32, rng: np.random.Generator):
        self.dtype = dtype
        self.kernel = nnx.Param(kernel_init(rng, (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.asarray(np.zeros((out_features,)), param_dtype))

    def __call__(self, x: Array) -> Array:
        dtype = self.dtype or x.dtype
        return x.astype(dtype) @ self.kernel[...].astype(dtype) + self.bias[...].astype(dtype)
