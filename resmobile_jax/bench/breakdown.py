"""Where the train step's time goes: forward and forward+backward of each part of the network (stem, mid, tail,
head), in JAX (per depthwise implementation) and in the PyTorch reference, on the same input.

    python -m resmobile_jax.bench.breakdown --variant v2 --size 224 --batch 32 [--trace_dir DIR]

--trace_dir also writes a jax.profiler trace of a few full train steps (open it in TensorBoard's profile plugin or
Perfetto) and prints the XLA ops that took the most time in it (fusions, dots, the C++ kernels' custom calls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from resmobile_jax import cli
from resmobile_jax.bench.trace_ops import custom_call_targets, op_table
from resmobile_jax.models import build_model
from resmobile_jax.models.resmobilenet import PARTS
from resmobile_jax.timing import repeat_timing, time_jitted

FLAGS = flags.FLAGS
flags.DEFINE_string("variant", "v2", "v1 | v2")
flags.DEFINE_integer("size", 224, "square input size")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_list("impls", ["auto", "shifted"], "JAX depthwise implementations to compare (auto: what training uses)")
flags.DEFINE_float("budget", 3.0, "seconds of repeated calls per measurement")
flags.DEFINE_string("trace_dir", "", "also write a jax.profiler trace of 3 train steps here")


def jax_parts(variant: str, size: int, batch: int, impl: str, budget: float) -> dict[str, dict[str, float]]:
    """{part: {"forward_ms", "forward_backward_ms"}} in train mode (batch statistics); gradients w.r.t. params and
    the part's input, except the stem's (the images), as in training."""
    from resmobile_jax.bench.jax_side import bench_config

    model = build_model(bench_config(variant, size, "float32", impl).model)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32))
    out = {}
    for part in PARTS:
        def forward(p, x, part=part):
            return nnx.merge(graphdef, p, rest, copy=True).apply_part(part, x)

        y = jax.jit(forward)(params, x)
        cot = jnp.ones_like(y) / y.size

        def forward_backward(p, x, forward=forward, cot=cot, part=part):
            if part == "stem":  # as in training: no gradient for the input images
                return jax.vjp(lambda p: forward(p, x), p)[1](cot)
            return jax.vjp(forward, p, x)[1](cot)

        f = time_jitted(forward, params, x, budget_seconds=budget, min_repeats=3)
        fb = time_jitted(forward_backward, params, x, budget_seconds=budget, min_repeats=3)
        out[part] = {"forward_ms": f["median_ms"], "forward_backward_ms": fb["median_ms"]}
        x = y
    return out


def torch_parts(variant: str, size: int, batch: int, budget: float) -> dict[str, dict[str, float]]:
    import torch

    from resmobile_jax.convert.torch_reference import build_reference

    model = build_reference(variant).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    out = {}
    for part in PARTS:
        module = getattr(model, part)
        xin = x.detach().requires_grad_(part != "stem")

        def forward(module=module, xin=xin):
            with torch.no_grad():
                module(xin)

        def forward_backward(module=module, xin=xin):
            y = module(xin)
            y.backward(torch.ones_like(y) / y.numel())

        out[part] = {"forward_ms": repeat_timing(forward, budget_seconds=budget, min_repeats=3)["median_ms"],
                     "forward_backward_ms": repeat_timing(forward_backward, budget_seconds=budget, min_repeats=3)["median_ms"]}
        with torch.no_grad():
            x = module(x)
    return out


def table(results: dict[str, dict]) -> str:
    names = list(results)
    head = "| part | " + " | ".join(f"{n} fwd ms | {n} fwd+bwd ms" for n in names) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(names))]
    for part in [*PARTS, "total"]:
        cells = []
        for n in names:
            r = results[n]
            f = sum(v["forward_ms"] for v in r.values()) if part == "total" else r[part]["forward_ms"]
            fb = sum(v["forward_backward_ms"] for v in r.values()) if part == "total" else r[part]["forward_backward_ms"]
            cells += [f"{f:.1f}", f"{fb:.1f}"]
        lines.append(f"| {part} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TRACED_STEPS = 3


def trace_train_steps(variant: str, size: int, batch: int, directory: str) -> None:
    from resmobile_jax.bench import jax_side

    step, state, data = jax_side.train_setup(jax_side.bench_config(variant, size, "float32"), batch)
    leaves = step.leaves(state)
    compiled = step.on_leaves.lower(leaves, data).compile()  # outside the trace; its HLO names the traced ops
    leaves, metrics = compiled(leaves, data)
    jax.block_until_ready(metrics)
    with jax.profiler.trace(directory):
        for _ in range(TRACED_STEPS):
            leaves, metrics = compiled(leaves, data)
        jax.block_until_ready(metrics)
    print(f"trace written to {directory}\n")
    print(op_table(directory, TRACED_STEPS, targets=custom_call_targets(compiled.as_text())))


def main(argv):
    del argv
    cli.quiet_logging()
    results = {}
    for impl in FLAGS.impls:
        print(f"JAX ({impl} depthwise) ...", flush=True)
        results[f"JAX {impl}"] = jax_parts(FLAGS.variant, FLAGS.size, FLAGS.batch, impl, FLAGS.budget)
    print("PyTorch eager ...", flush=True)
    results["PyTorch"] = torch_parts(FLAGS.variant, FLAGS.size, FLAGS.batch, FLAGS.budget)
    print(f"\n{FLAGS.variant}, {FLAGS.size} px, batch {FLAGS.batch}, train mode, float32\n")
    print(table(results))
    if FLAGS.trace_dir:
        trace_train_steps(FLAGS.variant, FLAGS.size, FLAGS.batch, FLAGS.trace_dir)


if __name__ == "__main__":
    cli.run(main)
