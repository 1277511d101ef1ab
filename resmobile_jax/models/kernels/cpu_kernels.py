"""Hand-written XLA:CPU convolution kernels (custom calls), built on first use: the depthwise convolution (forward,
input and kernel gradients) and the stems' few-input-channel dense convolution (forward and kernel gradient); both
forward passes also with eval-mode BatchNorm and the activation applied in the same pass (`conv_bn_act_forward`,
for the V2 stem with ResNet's max pool too); the max pool alone and its gradient (`max_pool_forward`,
`max_pool_backward`); and eval-mode inverted residuals fused whole (`inverted_residual_forward`; with
squeeze-excitation `expand_depthwise_forward` and `se_project_forward` around the SE's matmuls) and eval-mode ResNet
bottlenecks (`bottleneck_forward`).

XLA:CPU spends 10-30x the forward pass on a depthwise convolution's kernel gradient whatever form it is written in
(`python -m resmobile_jax.bench.depthwise_grad`), which made JAX training ~3.5x slower than PyTorch at 224 px, and
runs the 3-input-channel stem convolutions 2-8x slower than PyTorch. `cpu_kernels.cc` does each pass as one loop
nest with channels innermost, on XLA's own thread pool.

The C++ file is compiled once per machine with the system C++ compiler (`$CXX`, default `g++`) against the XLA FFI
headers that ship with jaxlib, and cached under `$RESMOBILE_KERNEL_CACHE` (default `~/.cache/resmobile_jax/kernels`),
keyed by the source, jaxlib version and CPU. Without a compiler the model falls back to pure JAX ("auto" in
`model.depthwise_impl` / `model.stem_conv_impl`), with a warning; asking for "cpu_kernel" explicitly then fails with the
compiler's message.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
TARGETS = {  # FFI target name -> exported symbol in the built library
    "resmobile_depthwise_forward": "ResmobileDepthwiseForward",
    "resmobile_depthwise_input_grad": "ResmobileDepthwiseInputGrad",
    "resmobile_depthwise_kernel_grad": "ResmobileDepthwiseKernelGrad",
    "resmobile_dense_conv_forward": "ResmobileDenseConvForward",
    "resmobile_dense_conv_kernel_grad": "ResmobileDenseConvKernelGrad",
    "resmobile_depthwise_forward_bn_act": "ResmobileDepthwiseForwardBnAct",
    "resmobile_dense_conv_forward_bn_act": "ResmobileDenseConvForwardBnAct",
    "resmobile_inverted_residual_forward": "ResmobileInvertedResidualForward",
    "resmobile_dense_conv_forward_bn_act_max_pool": "ResmobileDenseConvForwardBnActMaxPool",
    "resmobile_max_pool_forward": "ResmobileMaxPoolForward",
    "resmobile_max_pool_backward": "ResmobileMaxPoolBackward",
    "resmobile_expand_depthwise_forward": "ResmobileExpandDepthwiseForward",
    "resmobile_se_project_forward": "ResmobileSeProjectForward",
    "resmobile_se_scale_forward": "ResmobileSeScaleForward",
    "resmobile_pointwise_forward_bn_act": "ResmobilePointwiseForwardBnAct",
    "resmobile_batch_norm_act_forward": "ResmobileBatchNormActForward",
    "resmobile_batch_norm_act_backward": "ResmobileBatchNormActBackward",
    "resmobile_batch_norm_statistics": "ResmobileBatchNormStatistics",
    "resmobile_bn_act_depthwise_forward": "ResmobileBnActDepthwiseForward",
    "resmobile_bn_act_depthwise_kernel_grad": "ResmobileBnActDepthwiseKernelGrad",
    "resmobile_bottleneck_forward": "ResmobileBottleneckForward",
}
ACTIVATION_CODES = {"identity": 0, "relu": 1, "hardswish": 2}  # cpu_kernels.cc's enum Activation
# -march=native: the library is cached per CPU (see _cpu_signature); -O3 vectorizes the channel loops.
# -ffp-contract=off on x86-64: the multiply-adds are explicit FMAs (cpu_kernels.cc's Fma), and the compiler fusing
# others on its own made outputs depend on how a loop is blocked.
COMPILE_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"] + (
    ["-ffp-contract=off"] if platform.machine().lower() in ("x86_64", "amd64") else [])


class KernelUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "resmobile_jax" / "kernels"
    return Path(os.environ.get("RESMOBILE_KERNEL_CACHE", default))


def _cpu_signature() -> str:
    """The CPU model and feature flags, so a cache shared by different machines (NFS home on a pod) keeps one
    library per kind of CPU."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "|" + "|".join(lines)


def library_path(compiler: str, source: Path = SOURCE, extra_flags: tuple[str, ...] = ()) -> Path:
    import jaxlib

    key = hashlib.sha256()
    for part in (source.read_bytes(), jaxlib.__version__.encode(), compiler.encode(),
                 " ".join(COMPILE_FLAGS + list(extra_flags)).encode(), _cpu_signature().encode()):
        key.update(part)
    return cache_dir() / f"cpu_kernels_{key.hexdigest()[:16]}.so"


def build(source: Path = SOURCE, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the library unless a matching one is cached; returns its path. Concurrent builders (pytest workers,
    processes of one host) each write a private temporary file and rename it into place. `extra_flags` follow
    COMPILE_FLAGS (e.g. -mno-avx512f: the AVX2 build on an AVX-512 CPU, for `bench.ab --kernel_flags`)."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C++ compiler {compiler!r} on PATH (install g++ or set CXX)")
    target = library_path(compiler, source, tuple(extra_flags))
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *COMPILE_FLAGS, *extra_flags, "-I", jax.ffi.include_dir(), str(source), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(f"compiling {source.name} failed ({' '.join(cmd)}):\n{result.stderr[-2000:]}")
    os.replace(tmp, target)
    return target


@functools.cache
def _load() -> str | None:
    """Build, load and register the FFI targets once per process; returns why not, or None on success."""
    if platform.system() not in ("Linux", "Darwin"):
        return f"the CPU kernels are built for Linux/macOS, not {platform.system()}"
    try:
        library = ctypes.cdll.LoadLibrary(str(build()))
    except (KernelUnavailable, OSError) as e:
        logging.warning("CPU convolution kernels unavailable, using the slower pure-JAX forms: %s", e)
        return str(e)
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None


def register_library(source: Path, prefix: str, extra_flags: tuple[str, ...] = ()) -> list[str]:
    """Builds another version of cpu_kernels.cc (`bench.ab --kernels`), or this one with other compiler flags, and
    registers its targets as prefix + name, beside this checkout's, so both libraries run in one process; returns
    the targets that version lacks."""
    library = ctypes.cdll.LoadLibrary(str(build(source, extra_flags)))
    missing = []
    for name, symbol in TARGETS.items():
        if hasattr(library, symbol):
            jax.ffi.register_ffi_target(prefix + name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        else:
            missing.append(name)
    return missing


_target_prefix = ""  # what `_call` puts before a target's name while tracing; set by `targets_prefixed`
_traced_targets: set[str] | None = None


@contextlib.contextmanager
def targets_prefixed(prefix: str):
    """Functions traced inside call the targets `register_library` registered under `prefix`; yields the set of
    (unprefixed) targets traced, so a caller can tell that tracing happened (a cached trace would call none)."""
    global _target_prefix, _traced_targets
    saved = _target_prefix, _traced_targets
    _target_prefix, _traced_targets = prefix, set()
    try:
        yield _traced_targets
    finally:
        _target_prefix, _traced_targets = saved


def unavailable_reason() -> str | None:
    return _load()


def available() -> bool:
    return _load() is None


def require() -> None:
    if (reason := _load()) is not None:
        raise KernelUnavailable(f"the 'cpu_kernel' implementation is not available: {reason}")


def _output_hw(x_shape, k: int, stride: int, padding: int) -> tuple[int, int]:
    h, w = x_shape[1:3]
    return (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1


def _call(target: str, out_shape, *args, **attributes: int | float):
    """`out_shape`: one shape, or a list of shapes for a kernel with several outputs (then a list of arrays).
    Integer attributes travel as int64, float ones as float32 (what the C++ handlers bind)."""
    if isinstance(out_shape, list):
        result = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in out_shape]
    else:
        result = jax.ShapeDtypeStruct(out_shape, jnp.float32)
    # "sequential": under vmap, one call per example (correct, not fast; the model is never vmapped).
    if _traced_targets is not None:
        _traced_targets.add(target)
    call = jax.ffi.ffi_call(_target_prefix + target, result, vmap_method="sequential")
    return call(*args, **{k: np.float32(v) if isinstance(v, float) else np.int64(v) for k, v in attributes.items()})


def _forward(x, w, stride, padding):
    k, c = w.shape[0], x.shape[-1]
    ho, wo = _output_hw(x.shape, k, stride, padding)
    return _call("resmobile_depthwise_forward", (x.shape[0], ho, wo, c), x, w.reshape(k, k, c),
                 stride=stride, padding=padding)


def depthwise_conv(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise conv, x (N, H, W, C) float32, w (K, K, 1, C), symmetric zero padding, on XLA:CPU."""
    require()  # builds and registers the custom calls on first use
    return _depthwise_conv(x, w, stride, padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_conv(x, w, stride, padding):
    return _forward(x, w, stride, padding)


def _fwd(x, w, stride, padding):
    return _forward(x, w, stride, padding), (x, w)


def _bwd(stride, padding, residuals, g):
    x, w = residuals
    k, c = w.shape[0], x.shape[-1]
    g = g.astype(jnp.float32)
    dx = _call("resmobile_depthwise_input_grad", x.shape, g, w.reshape(k, k, c), x, stride=stride, padding=padding)
    dw = _call("resmobile_depthwise_kernel_grad", (k, k, c), x, g, stride=stride, padding=padding)
    return dx, dw.reshape(w.shape)


_depthwise_conv.defvjp(_fwd, _bwd)


def dense_conv(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """Dense conv for few input channels (the stems), x (N, H, W, Cin) float32, w (K, K, Cin, Cout), on XLA:CPU.
    The input gradient is XLA's (and dropped by XLA when x is the input images, as in training)."""
    require()
    return _dense_conv(x, w, stride, padding)


def _dense_forward(x, w, stride, padding):
    ho, wo = _output_hw(x.shape, w.shape[0], stride, padding)
    return _call("resmobile_dense_conv_forward", (x.shape[0], ho, wo, w.shape[-1]), x, w, stride=stride, padding=padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_conv(x, w, stride, padding):
    return _dense_forward(x, w, stride, padding)


def _dense_fwd(x, w, stride, padding):
    return _dense_forward(x, w, stride, padding), (x, w)


def _dense_bwd(stride, padding, residuals, g):
    x, w = residuals
    g = g.astype(jnp.float32)
    dw = _call("resmobile_dense_conv_kernel_grad", w.shape, x, g, stride=stride, padding=padding)

    def xla_conv(x):
        p = ((padding, padding), (padding, padding))
        return jax.lax.conv_general_dilated(x, w, (stride, stride), p, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    dx = jax.vjp(xla_conv, x)[1](g)[0]
    return dx, dw


_dense_conv.defvjp(_dense_fwd, _dense_bwd)


def max_pool_forward(x):
    """ResNet's MaxPool2d(3, stride=2, padding=1), x (N, H, W, C) float32. Its gradient: `max_pool_backward`."""
    require()
    return _call("resmobile_max_pool_forward", (x.shape[0], *_output_hw(x.shape, 3, 2, 1), x.shape[-1]), x)


def max_pool_backward(x, y, g):
    """dx of max_pool_forward: each output's g to its window's first maximum (row-major), as PyTorch routes it."""
    require()
    return _call("resmobile_max_pool_backward", x.shape, x, y, g)


def conv_bn_act_forward(x, w, scale, shift, activation: str, stride: int, padding: int, *, depthwise: bool,
                        max_pool: bool = False):
    """act(conv(x, w) * scale + shift) in one kernel call: eval-mode BatchNorm (scale and shift per output channel,
    float32) and the activation applied to each output row as it is produced. `max_pool`, dense only: then ResNet's
    MaxPool2d(3, stride=2, padding=1). Forward only; its gradient is layers.conv_bn_act_kernel's."""
    require()
    k, cout = w.shape[0], w.shape[-1]
    ho, wo = _output_hw(x.shape, k, stride, padding)
    if depthwise:
        if max_pool:
            raise ValueError("max_pool is implemented for the dense kernel only")
        target, w = "resmobile_depthwise_forward_bn_act", w.reshape(k, k, cout)
    elif max_pool:
        target, (ho, wo) = "resmobile_dense_conv_forward_bn_act_max_pool", _output_hw((0, ho, wo), 3, 2, 1)
    else:
        target = "resmobile_dense_conv_forward_bn_act"
    return _call(target, (x.shape[0], ho, wo, cout), x, w, scale.astype(jnp.float32), shift.astype(jnp.float32),
                 stride=stride, padding=padding, activation=ACTIVATION_CODES[activation])


def pointwise_forward_bn_act(x, w, scale, shift, activation: str):
    """act((x @ w) * scale + shift) over x's last axis, w (Cin, Cout): an eval-mode 1x1 convolution with its
    BatchNorm and activation in one call, for maps of few pixels. Forward only; its gradient is
    layers.pointwise_bn_act_kernel's."""
    require()
    f32 = jnp.float32
    return _call("resmobile_pointwise_forward_bn_act", (*x.shape[:-1], w.shape[-1]), x.astype(f32), w.astype(f32),
                 scale.astype(f32), shift.astype(f32), activation=ACTIVATION_CODES[activation])


def _expand_depthwise_args(x, expand, depthwise):
    empty = jnp.zeros((0,), jnp.float32)
    we, e_scale, e_shift = (empty, empty, empty) if expand is None else expand
    wd, d_scale, d_shift = depthwise
    k, c = wd.shape[0], wd.shape[-1]
    return [a.astype(jnp.float32) for a in (x, we, e_scale, e_shift, wd.reshape(k, k, c), d_scale, d_shift)]


def inverted_residual_forward(x, expand, depthwise, project, activation: str, stride: int, padding: int,
                              residual: bool):
    """A whole eval-mode inverted residual without squeeze-excitation in one kernel call:
    [act(x @ We * s + b)] -> act(depthwise(., Wd) * s + b) -> (. @ Wp) * s + b [+ x], each BatchNorm folded into
    (scale, shift). `expand` = (We (Cin, C), scale, shift) or None, `depthwise` = (Wd (K, K, 1, C), scale, shift),
    `project` = (Wp (C, Cout), scale, shift). Forward only; its gradient is blocks.inverted_residual_kernel's."""
    require()
    wp, p_scale, p_shift = project
    ho, wo = _output_hw(x.shape, depthwise[0].shape[0], stride, padding)
    args = [*_expand_depthwise_args(x, expand, depthwise), *(a.astype(jnp.float32) for a in project)]
    return _call("resmobile_inverted_residual_forward", (x.shape[0], ho, wo, wp.shape[-1]), *args,
                 stride=stride, padding=padding, activation=ACTIVATION_CODES[activation], residual=int(residual))


def expand_depthwise_forward(x, expand, depthwise, activation: str, stride: int, padding: int):
    """The first half of an eval-mode inverted residual with squeeze-excitation: y = act(depthwise([act(x @ We * s
    + b)], Wd) * s + b) and its global average pool (N, C), the expanded map never written. Arguments as for
    inverted_residual_forward."""
    require()
    n, c = x.shape[0], depthwise[0].shape[-1]
    ho, wo = _output_hw(x.shape, depthwise[0].shape[0], stride, padding)
    y, row_sums = _call("resmobile_expand_depthwise_forward", [(n, ho, wo, c), (n * ho, c)],
                        *_expand_depthwise_args(x, expand, depthwise), stride=stride, padding=padding,
                        activation=ACTIVATION_CODES[activation])
    return y, row_sums.reshape(n, ho, c).sum(axis=1) / (ho * wo)


def se_scale_forward(pooled, w1, b1, w2, b2):
    """The eval-mode squeeze-excitation's channel scale, hardsigmoid(relu(pooled @ w1 + b1) @ w2 + b2), in one call
    that splits each product over both cores (blocks.se_channel_scale; no gradient)."""
    require()
    f32 = jnp.float32
    return _call("resmobile_se_scale_forward", pooled.shape, *(a.astype(f32) for a in (pooled, w1, b1, w2, b2)))


def se_project_forward(d, se_scale, project, residual_input=None):
    """The second half: ((d * se_scale[:, None, None, :]) @ Wp) * s + b [+ residual_input], `project` = (Wp (C,
    Cout), scale, shift), the SE scale folded into Wp per image."""
    require()
    f32 = jnp.float32
    wp = project[0]
    res = jnp.zeros((0,), f32) if residual_input is None else residual_input.astype(f32)
    return _call("resmobile_se_project_forward", (*d.shape[:3], wp.shape[-1]), d.astype(f32), se_scale.astype(f32),
                 *(a.astype(f32) for a in project), res)


def bottleneck_forward(x, conv1, conv2, conv3):
    """An eval-mode ResNet bottleneck without downsample in one kernel call: relu(bn3(conv3(relu(bn2(conv2(relu(
    bn1(conv1(x)))))))) + x); each conv is (kernel, BN scale, BN shift), conv1 / conv3 kernels (Cin, Cout), conv2's
    (3, 3, P, P) with padding 1."""
    require()
    args = [x, *conv1, *conv2, *conv3]
    return _call("resmobile_bottleneck_forward", x.shape, *[a.astype(jnp.float32) for a in args])


def batch_norm_act(x, gamma, beta, epsilon: float, activation: str):
    """Training-mode BatchNorm (statistics of this batch over all axes but the last) + activation, x (..., W, C)
    float32: (act(x * inv + shift), batch mean, biased batch variance), inv = rsqrt(var + eps) * gamma and shift =
    beta - mean * inv as layers.BatchNorm computes them. Differentiable in x, gamma and beta through y (the full
    BatchNorm gradient, statistics included); the returned statistics are for the running averages and carry no
    gradient (wrap them in stop_gradient)."""
    require()
    f32 = jnp.float32
    return _batch_norm_act(x.astype(f32), gamma.astype(f32), beta.astype(f32), float(epsilon), activation)


def _bn_forward(x, gamma, beta, epsilon, activation):
    c = x.shape[-1]
    return _call("resmobile_batch_norm_act_forward", [x.shape, (c,), (c,)], x, gamma, beta, epsilon=epsilon,
                 activation=ACTIVATION_CODES[activation])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_act(x, gamma, beta, epsilon, activation):
    return tuple(_bn_forward(x, gamma, beta, epsilon, activation))


def _bn_fwd(x, gamma, beta, epsilon, activation):
    y, mean, var = _bn_forward(x, gamma, beta, epsilon, activation)
    return (y, mean, var), (x, gamma, beta, mean, var)


def _bn_bwd(epsilon, activation, residuals, cotangents):
    g = cotangents[0]  # the statistics' cotangents are ignored: they only feed the running averages
    x, gamma, beta, mean, var = residuals
    dx, dgamma, dbeta = _call("resmobile_batch_norm_act_backward", [x.shape, gamma.shape, gamma.shape], x,
                              g.astype(jnp.float32), gamma, beta, mean, var, epsilon=epsilon,
                              activation=ACTIVATION_CODES[activation])
    return dx, dgamma, dbeta


_batch_norm_act.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_act_depthwise(x, gamma, beta, epsilon: float, activation: str, w, stride: int, padding: int):
    """depthwise_conv(act(BN(x)), w) with batch statistics, x (N, H, W, C) float32, w (K, K, 1, C): (output, batch
    mean, biased batch variance), as batch_norm_act then depthwise_conv compute them. The depthwise kernels apply
    the BN + activation to each input row as they read it (forward and kernel gradient), so act(BN(x)) is never
    written. Differentiable in x, gamma, beta and w; the statistics are for the running averages (no gradient)."""
    require()
    f32 = jnp.float32
    return _bn_act_depthwise(x.astype(f32), gamma.astype(f32), beta.astype(f32), w.astype(f32), float(epsilon),
                             activation, stride, padding)


def _bn_act_depthwise_forward(x, gamma, beta, w, epsilon, activation, stride, padding):
    c = x.shape[-1]
    k = w.shape[0]
    mean, var = _call("resmobile_batch_norm_statistics", [(c,), (c,)], x)
    ho, wo = _output_hw(x.shape, k, stride, padding)
    y = _call("resmobile_bn_act_depthwise_forward", (x.shape[0], ho, wo, c), x, gamma, beta, mean, var,
              w.reshape(k, k, c), stride=stride, padding=padding, epsilon=epsilon,
              activation=ACTIVATION_CODES[activation])
    return y, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _bn_act_depthwise(x, gamma, beta, w, epsilon, activation, stride, padding):
    return _bn_act_depthwise_forward(x, gamma, beta, w, epsilon, activation, stride, padding)


def _bn_act_depthwise_fwd(x, gamma, beta, w, epsilon, activation, stride, padding):
    y, mean, var = _bn_act_depthwise_forward(x, gamma, beta, w, epsilon, activation, stride, padding)
    return (y, mean, var), (x, gamma, beta, w, mean, var)


def _bn_act_depthwise_bwd(epsilon, activation, stride, padding, residuals, cotangents):
    g = cotangents[0].astype(jnp.float32)  # the statistics' cotangents are ignored, as in _bn_bwd
    x, gamma, beta, w, mean, var = residuals
    k, c = w.shape[0], x.shape[-1]
    code = ACTIVATION_CODES[activation]
    dw = _call("resmobile_bn_act_depthwise_kernel_grad", (k, k, c), x, gamma, beta, mean, var, g, stride=stride,
               padding=padding, epsilon=epsilon, activation=code)
    dy = _call("resmobile_depthwise_input_grad", x.shape, g, w.reshape(k, k, c), x, stride=stride, padding=padding)
    dx, dgamma, dbeta = _call("resmobile_batch_norm_act_backward", [x.shape, gamma.shape, gamma.shape], x, dy,
                              gamma, beta, mean, var, epsilon=epsilon, activation=code)
    return dx, dgamma, dbeta, dw.reshape(w.shape)


_bn_act_depthwise.defvjp(_bn_act_depthwise_fwd, _bn_act_depthwise_bwd)
