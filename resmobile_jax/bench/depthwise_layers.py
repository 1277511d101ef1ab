"""python -m resmobile_jax.bench.depthwise_layers: every depthwise convolution of V1 or V2, JAX's C++ kernel against
PyTorch's (oneDNN, channels_last), same shapes and inputs, one process.

    python -m resmobile_jax.bench.depthwise_layers --variant v1 --size 224 --batch 32

Per layer: the forward pass, and forward + both gradients (input and kernel), as training runs them. Ratios above 1
mean JAX is faster. This is where the per-layer figures in README's Speed section come from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from resmobile_jax import cli
from resmobile_jax.models.architecture import mid_block_specs
from resmobile_jax.models.kernels import cpu_kernels
from resmobile_jax.models.stems import MobileNetStem, ResNetStem
from resmobile_jax.timing import repeat_timing, time_jitted

FLAGS = flags.FLAGS


def layer_shapes(variant: str, size: int) -> list[tuple[int, int, int, int]]:
    """(input H = W, channels, kernel, stride) of each inverted residual's depthwise conv, in network order."""
    h = -(-size // (MobileNetStem if variant == "v1" else ResNetStem).stride)
    shapes = []
    for spec in mid_block_specs(variant):
        shapes.append((h, spec.expanded, spec.kernel, spec.stride))
        p = spec.kernel // 2
        h = (h + 2 * p - spec.kernel) // spec.stride + 1
    return shapes


def jax_times(x, w, g, stride: int, budget: float) -> tuple[float, float]:
    padding = w.shape[0] // 2

    def forward(x, w):
        return cpu_kernels.depthwise_conv(x, w, stride, padding)

    def forward_backward(x, w, g):
        y, pullback = jax.vjp(forward, x, w)
        return y, pullback(g)

    f = time_jitted(forward, x, w, budget_seconds=budget, min_repeats=3)["median_ms"]
    fb = time_jitted(forward_backward, x, w, g, budget_seconds=budget, min_repeats=3)["median_ms"]
    return f, fb


def torch_times(x, w, g, stride: int, budget: float) -> tuple[float, float]:
    import torch

    c, padding = x.shape[-1], w.shape[0] // 2
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)  # an NHWC array viewed as NCHW: channels_last
    wt = torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1))).requires_grad_(True)
    gt = torch.from_numpy(g).permute(0, 3, 1, 2)

    def forward():
        with torch.no_grad():
            torch.nn.functional.conv2d(xt, wt, stride=stride, padding=padding, groups=c)

    def forward_backward():
        xt.grad = wt.grad = None
        torch.nn.functional.conv2d(xt, wt, stride=stride, padding=padding, groups=c).backward(gt)

    return (repeat_timing(forward, budget_seconds=budget, min_repeats=3)["median_ms"],
            repeat_timing(forward_backward, budget_seconds=budget, min_repeats=3)["median_ms"])


def measure(variant: str, size: int, batch: int, budget: float = 1.0) -> list[dict]:
    cpu_kernels.require()
    rng = np.random.default_rng(0)
    records = []
    for h, c, k, s in layer_shapes(variant, size):
        ho = (h + 2 * (k // 2) - k) // s + 1
        x = rng.standard_normal((batch, h, h, c), dtype=np.float32)
        w = rng.standard_normal((k, k, 1, c), dtype=np.float32)
        g = rng.standard_normal((batch, ho, ho, c), dtype=np.float32)
        jf, jfb = jax_times(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g), s, budget)
        tf, tfb = torch_times(x, w, g, s, budget)
        records.append({"layer": f"{h}x{h}x{c} k{k} s{s}", "jax_forward_ms": jf, "torch_forward_ms": tf,
                        "jax_forward_backward_ms": jfb, "torch_forward_backward_ms": tfb})
    return records


def format_table(records: list[dict]) -> str:
    keys = ("jax_forward_ms", "torch_forward_ms", "jax_forward_backward_ms", "torch_forward_backward_ms")
    total = {"layer": "all layers", **{k: sum(r[k] for r in records) for k in keys}}
    lines = ["| layer (input, channels, kernel, stride) | JAX fwd ms | PyTorch fwd ms | speedup | JAX fwd+bwd ms | "
             "PyTorch fwd+bwd ms | speedup |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in [*records, total]:
        lines.append(f"| {r['layer']} | {r['jax_forward_ms']:.2f} | {r['torch_forward_ms']:.2f} | "
                     f"{r['torch_forward_ms'] / r['jax_forward_ms']:.2f}x | {r['jax_forward_backward_ms']:.2f} | "
                     f"{r['torch_forward_backward_ms']:.2f} | "
                     f"{r['torch_forward_backward_ms'] / r['jax_forward_backward_ms']:.2f}x |")
    return "\n".join(lines)


def run_layer_command(measure, format_table, budget: float, mode: str = "") -> None:
    """The per-layer commands' flags and main (this one and bench.batch_norm_layers): one table of
    format_table(measure(variant, size, batch, budget)) under a line naming the setting. Flags are defined only
    when run: the tests import these modules beside bench's own flags (same names)."""
    flags.DEFINE_string("variant", "v1", "v1 | v2")
    flags.DEFINE_integer("size", 224, "square input size")
    flags.DEFINE_integer("batch", 32, "batch size")
    flags.DEFINE_float("budget", budget, "seconds of repeated calls per measurement")

    def main(argv):
        cli.start_command(argv)
        import torch

        print(f"{FLAGS.variant}, {FLAGS.size} px, batch {FLAGS.batch}, float32{mode}, PyTorch {torch.__version__} "
              f"({torch.get_num_threads()} threads)\n")
        print(format_table(measure(FLAGS.variant, FLAGS.size, FLAGS.batch, FLAGS.budget)))

    cli.run(main)


if __name__ == "__main__":
    run_layer_command(measure, format_table, budget=1.0)
