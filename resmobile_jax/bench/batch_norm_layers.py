"""python -m resmobile_jax.bench.batch_norm_layers: every training-mode BatchNorm + activation of V1's or V2's stem
and inverted residuals, in three forms on the same inputs, one process: autodiff through XLA's ops
(`batch_norm_impl="xla"`), the C++ kernels (`"cpu_kernel"`, what "auto" picks on a one-device float32 CPU), and
PyTorch's BatchNorm2d + activation (channels_last).

    python -m resmobile_jax.bench.batch_norm_layers --variant v1 --size 224 --batch 32

Per map: the forward pass (statistics, normalization, activation) and forward + backward. Identical consecutive
maps are timed once and counted. This is where the per-layer BatchNorm figures in README's Speed section come from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resmobile_jax.bench.depthwise_layers import layer_shapes, run_layer_command
from resmobile_jax.models.architecture import mid_block_specs
from resmobile_jax.models.layers import MOBILENET_BN, RESNET_BN, BatchNorm
from resmobile_jax.models.stems import MobileNetStem
from resmobile_jax.timing import repeat_timing, time_jitted

FORMS = ("xla", "cpu_kernel", "torch")


def bn_maps(variant: str, size: int) -> list[tuple[int, int, str, float, int]]:
    """(H = W, channels, activation, epsilon, count) of each BatchNorm's input in network order (stem, then per
    inverted residual its expansion, depthwise and projection), consecutive identical maps merged with a count."""
    eps = MOBILENET_BN["epsilon"]
    h = -(-size // MobileNetStem.stride)  # both stems' conv has stride 2 (V2's max pool follows its BN)
    maps = [(h, 16, "hardswish", eps)] if variant == "v1" else [(h, 64, "relu", RESNET_BN["epsilon"])]
    for (h, c, k, s), spec in zip(layer_shapes(variant, size), mid_block_specs(variant)):
        act = "hardswish" if spec.activation == "HS" else "relu"
        ho = (h + 2 * (k // 2) - k) // s + 1
        if spec.expanded != spec.in_channels:
            maps.append((h, c, act, eps))
        maps += [(ho, c, act, eps), (ho, spec.out_channels, "identity", eps)]
    merged: list[list] = []
    for m in maps:
        if merged and tuple(merged[-1][:4]) == m:
            merged[-1][4] += 1
        else:
            merged.append([*m, 1])
    return [tuple(m) for m in merged]


def jax_times(impl: str, x, g, activation: str, epsilon: float, budget: float) -> tuple[float, float]:
    bn = BatchNorm(x.shape[-1], epsilon=epsilon, momentum=0.9, impl=impl)
    graphdef, params, stats = nnx.split(bn, nnx.Param, ...)

    def forward(p, s, x):
        return nnx.merge(graphdef, p, s, copy=True)(x, activation)

    def forward_backward(p, s, x, g):
        y, pullback = jax.vjp(lambda p, x: forward(p, s, x), p, x)
        return y, pullback(g)

    f = time_jitted(forward, params, stats, x, budget_seconds=budget, min_repeats=3)["median_ms"]
    fb = time_jitted(forward_backward, params, stats, x, g, budget_seconds=budget, min_repeats=3)["median_ms"]
    return f, fb


def torch_times(x, g, activation: str, epsilon: float, budget: float) -> tuple[float, float]:
    import torch

    act = {"relu": torch.relu, "hardswish": torch.nn.functional.hardswish, "identity": lambda t: t}[activation]
    bn = torch.nn.BatchNorm2d(x.shape[-1], eps=epsilon).train()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)  # an NHWC array viewed as NCHW: channels_last
    gt = torch.from_numpy(g).permute(0, 3, 1, 2)

    def forward():
        with torch.no_grad():
            act(bn(xt))

    def forward_backward():
        xt.grad = None
        bn.zero_grad()
        act(bn(xt)).backward(gt)

    return (repeat_timing(forward, budget_seconds=budget, min_repeats=3)["median_ms"],
            repeat_timing(forward_backward, budget_seconds=budget, min_repeats=3)["median_ms"])


def measure(variant: str, size: int, batch: int, budget: float = 1.0) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for h, c, act, eps, count in bn_maps(variant, size):
        x = rng.standard_normal((batch, h, h, c), dtype=np.float32)
        g = rng.standard_normal((batch, h, h, c), dtype=np.float32)
        record = {"map": f"{h}x{h}x{c} {act}", "count": count}
        for form in FORMS:
            times = (torch_times(x, g, act, eps, budget) if form == "torch"
                     else jax_times(form, jnp.asarray(x), jnp.asarray(g), act, eps, budget))
            record[f"{form}_forward_ms"], record[f"{form}_forward_backward_ms"] = times
        records.append(record)
    return records


def format_table(records: list[dict]) -> str:
    """Per map and in total (each map times its count): ms of the three forms, forward and forward + backward."""
    keys = [f"{form}_{what}_ms" for what in ("forward", "forward_backward") for form in FORMS]
    total = {"map": "all maps (x count)", "count": sum(r["count"] for r in records),
             **{k: sum(r[k] * r["count"] for r in records) for k in keys}}
    lines = ["| map (H x W x C, activation) | count | fwd XLA | fwd C++ | fwd PyTorch | fwd+bwd XLA | fwd+bwd C++ | "
             "fwd+bwd PyTorch |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in [*records, total]:
        lines.append(f"| {r['map']} | {r['count']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_layer_command(measure, format_table, budget=0.5, mode=", train mode, ms")
