"""python -m resmobile_jax.bench.depthwise_grad: ways to compute the depthwise kernel gradient, timed side by side.

The inverted residuals' backward pass dominates training time on XLA:CPU, and within it the kernel gradient of the
shifted depthwise convolution (bench.breakdown). This measures, per representative layer shape and in one run, the
forward pass, autodiff's gradient (what training uses) and the rewrites tried against it, each checked equal to
autodiff. Ratios above 1 mean slower than autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from resmobile_jax import cli
from resmobile_jax.models.kernels import cpu_kernels
from resmobile_jax.models.layers import depthwise_conv
from resmobile_jax.timing import time_jitted

FLAGS = flags.FLAGS

# (H = W, C, kernel, stride) of MobileNetV3-Large depthwise layers at 224 px
LAYERS = ((56, 72, 3, 1), (28, 120, 5, 1), (14, 480, 3, 1), (7, 960, 5, 1), (112, 64, 3, 2))


def _taps(x, k, s, p, ho, wo):
    n, _, _, c = x.shape
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return [jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1, c), (1, s, s, 1))
            for i in range(k) for j in range(k)]


def autodiff(x, g, k, s, p):
    w = jnp.zeros((k, k, 1, x.shape[-1]), x.dtype)  # the gradient does not depend on w
    return jax.vjp(lambda w: depthwise_conv(x, w, s, p, "shifted"), w)[1](g)[0]


def channel_major(x, g, k, s, p):
    """Per tap, a row reduction over (N, H, W) in a (C, N, H, W) layout: the reduced axis is contiguous."""
    n, _, _, c = x.shape
    ho, wo = g.shape[1:3]
    xt = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (p, p), (p, p)))
    gt = jnp.transpose(g, (3, 0, 1, 2))
    rows = [jnp.sum(jax.lax.slice(xt, (0, 0, i, j), (c, n, i + (ho - 1) * s + 1, j + (wo - 1) * s + 1), (1, 1, s, s))
                    * gt, axis=(1, 2, 3)) for i in range(k) for j in range(k)]
    return jnp.stack(rows).reshape(k, k, 1, c)


def two_stage(x, g, k, s, p):
    """Per tap, a (N*H, W*C) column sum (a long kept row), then a small sum over W."""
    n, _, _, c = x.shape
    ho, wo = g.shape[1:3]
    parts = [jnp.sum((t * g).reshape(n * ho, wo * c), axis=0) for t in _taps(x, k, s, p, ho, wo)]
    part = jax.lax.optimization_barrier(jnp.stack(parts))  # keeps XLA from merging the two sums back into one
    return part.reshape(k * k, wo, c).sum(1).reshape(k, k, 1, c)


def stacked_minor(x, g, k, s, p):
    """All taps stacked on the minor axis and reduced in one pass over the images."""
    c = x.shape[-1]
    ho, wo = g.shape[1:3]
    prod = jnp.stack(_taps(x, k, s, p, ho, wo), axis=-1) * g[..., None]
    return jnp.transpose(prod.sum(axis=(0, 1, 2))).reshape(k, k, 1, c)


def cpu_kernel(x, g, k, s, p):
    """The hand-written XLA:CPU kernel (models/kernels/cpu_kernels.cc), through its custom VJP."""
    w = jnp.zeros((k, k, 1, x.shape[-1]), x.dtype)
    return jax.vjp(lambda w: cpu_kernels.depthwise_conv(x, w, s, p), w)[1](g)[0]


REWRITES = {"channel-major": channel_major, "two-stage": two_stage, "stacked minor": stacked_minor,
            "cpu kernel": cpu_kernel}


def measure(batch: int, layers=LAYERS, budget_seconds: float = 2.0) -> list[dict]:
    cpu_kernels.require()
    rng = np.random.default_rng(0)
    records = []
    for h, c, k, s in layers:
        p = k // 2
        ho = (h + 2 * p - k) // s + 1
        x = jnp.asarray(rng.standard_normal((batch, h, h, c)), jnp.float32)
        g = jnp.asarray(rng.standard_normal((batch, ho, ho, c)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)
        timed = lambda f, *a: time_jitted(f, *a, budget_seconds=budget_seconds)["median_ms"]  # noqa: E731
        ref = jax.jit(lambda x, g: autodiff(x, g, k, s, p))(x, g)
        r = {"layer": f"{batch}x{h}x{h}x{c} k{k} s{s}",
             "forward_ms": timed(lambda x, w: depthwise_conv(x, w, s, p, "shifted"), x, w),
             "autodiff_ms": timed(lambda x, g: autodiff(x, g, k, s, p), x, g)}
        for name, fn in REWRITES.items():
            out = jax.jit(lambda x, g, fn=fn: fn(x, g, k, s, p))(x, g)
            r[f"{name}_rel_err"] = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
            r[f"{name}_ms"] = timed(lambda x, g, fn=fn: fn(x, g, k, s, p), x, g)
        records.append(r)
    return records


def format_table(records) -> str:
    rows = ["| layer | forward ms | autodiff dW ms | " + " | ".join(f"{n} ms (x autodiff)" for n in REWRITES) + " |",
            "|---|---:|---:|" + "---:|" * len(REWRITES)]
    for r in records:
        rows.append(f"| {r['layer']} | {r['forward_ms']:.1f} | {r['autodiff_ms']:.1f} | " + " | ".join(
            f"{r[f'{n}_ms']:.1f} ({r[f'{n}_ms'] / r['autodiff_ms']:.2f}x)" for n in REWRITES) + " |")
    return "\n".join(rows)


def main(argv):
    cli.start_command(argv)
    print(format_table(measure(FLAGS.batch, budget_seconds=FLAGS.budget_seconds)))


if __name__ == "__main__":  # flags defined only when run: the tests import measure() beside bench's own flags
    flags.DEFINE_integer("batch", 32, "batch size of every layer")
    flags.DEFINE_float("budget_seconds", 2.0, "timing budget per measurement")
    cli.run(main)
