"""Where the time goes, part by part (stem, mid, tail, head), in JAX and in the PyTorch reference, on the same input.

    python -m resmobile_jax.bench.breakdown --variant v2 --size 224 --batch 32 [--trace_dir DIR]
    python -m resmobile_jax.bench.breakdown --mode eval --variant v2 --size 224 --batch 32 [--trace_dir DIR]

train (default): forward and forward+backward of each part in training mode, JAX per depthwise implementation
(`--impls`), each timed on its own. eval: each part's inference forward pass (running BN statistics, the fused
kernels embedding runs), JAX and PyTorch calls interleaved, with their ratio. --trace_dir also writes a jax.profiler
trace of a few full train steps or embed calls (open it in TensorBoard's profile plugin or Perfetto) and prints the
XLA ops that took the most time in it (fusions, dots, the C++ kernels' custom calls).
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
from resmobile_jax.models.architecture import MOBILENET_V3_LARGE_BLOCKS, NUM_BOTTLENECKS
from resmobile_jax.models.resmobilenet import PARTS
from resmobile_jax.timing import compile_jitted, interleaved_timing, repeat_timing, time_jitted

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train: training-mode parts, forward and backward; eval: "
                  "inference parts against PyTorch's, interleaved")
flags.DEFINE_bool("blocks", False, "eval mode: the mid and tail block by block")
flags.DEFINE_string("variant", "v2", "v1 | v2")
flags.DEFINE_integer("size", 224, "square input size")
flags.DEFINE_integer("batch", 32, "batch size")
flags.DEFINE_list("impls", ["auto", "shifted"], "JAX depthwise implementations to compare (auto: what training uses)")
flags.DEFINE_float("budget", 3.0, "seconds of repeated calls per measurement")
flags.DEFINE_string("trace_dir", "", "also write a jax.profiler trace of 3 train steps (--mode eval: embed calls) here")


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


def eval_units(blocks: bool) -> list[str]:
    """PARTS, or with `blocks` the mid and tail block by block (mid.0 .. mid.14, tail.0 .. tail.5)."""
    if not blocks:
        return list(PARTS)
    return ["stem", *[f"mid.{i}" for i in range(len(MOBILENET_V3_LARGE_BLOCKS))],
            *[f"tail.{i}" for i in range(NUM_BOTTLENECKS)], "head"]


def _unit(root, name: str):
    """root.stem for "stem", root.mid[3] for "mid.3": the same names in the Flax model and the PyTorch reference."""
    part, _, index = name.partition(".")
    return getattr(root, part)[int(index)] if index else getattr(root, part)


def eval_parts(variant: str, size: int, batch: int, budget: float, blocks: bool = False) -> dict[str, dict[str, float]]:
    """{part: {"jax_ms", "torch_ms"}}: each part's (or block's) inference forward pass in both frameworks on the same
    input (the previous one's output), calls alternating so the machine's drift hits both alike."""
    import torch

    from resmobile_jax.bench.jax_side import bench_config
    from resmobile_jax.convert.torch_reference import build_reference

    model = build_model(bench_config(variant, size, "float32").model)
    model.eval()
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)  # passing nnx.State flattens it in Python, ~1 ms per call
    reference = build_reference(variant).to(memory_format=torch.channels_last).eval()
    images = np.random.default_rng(0).standard_normal((batch, size, size, 3), dtype=np.float32)
    x, xt = jnp.asarray(images), torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    out = {}
    for part in eval_units(blocks):
        def forward(leaves, x, part=part):
            model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
            return model.apply_part(part, x) if part in PARTS else _unit(model, part)(x)

        compiled, _ = compile_jitted(forward, leaves, x)
        module = _unit(reference, part)

        def torch_call(module=module, xt=xt):
            with torch.inference_mode():
                return module(xt)

        calls = {"jax": lambda compiled=compiled, x=x: jax.block_until_ready(compiled(leaves, x)), "torch": torch_call}
        r = interleaved_timing(calls, min_rounds=5, max_rounds=200, budget_seconds=budget, warmup=2)
        out[part] = {"jax_ms": r["jax"]["median_ms"], "torch_ms": r["torch"]["median_ms"]}
        x, xt = compiled(leaves, x), torch_call()
    return out


def _ms(value: float) -> str:
    """Two decimals, three below 1 ms: small parts (64 px, small batches) take 0.02-0.5 ms, where two decimals
    showed times 20-50% off the ratio beside them."""
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def eval_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| part | JAX ms | PyTorch ms | speedup (PyTorch / JAX) |", "|---|---:|---:|---:|"]
    total = {k: sum(r[k] for r in results.values()) for k in ("jax_ms", "torch_ms")}
    for part, r in [*results.items(), ("total", total)]:
        lines.append(f"| {part} | {_ms(r['jax_ms'])} | {_ms(r['torch_ms'])} | {r['torch_ms'] / r['jax_ms']:.2f}x |")
    return "\n".join(lines)


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


def trace_and_print(call, hlo_text: str, directory: str) -> None:
    """Traces TRACED_STEPS calls of `call` (one compiled program run to completion, warmed up here) into `directory`
    and prints its op table, the C++ kernels named from the program's HLO (compiled outside the trace)."""
    call()
    with jax.profiler.trace(directory):
        for _ in range(TRACED_STEPS):
            call()
    print(f"trace written to {directory}\n")
    print(op_table(directory, TRACED_STEPS, targets=custom_call_targets(hlo_text)))


def trace_train_steps(variant: str, size: int, batch: int, directory: str) -> None:
    from resmobile_jax.bench import jax_side

    step, state, data = jax_side.train_setup(jax_side.bench_config(variant, size, "float32"), batch)
    holder = [step.leaves(state)]
    compiled = step.on_leaves.lower(holder[0], data).compile()

    def call():
        holder[0], metrics = compiled(holder[0], data)  # the state donated from step to step
        jax.block_until_ready(metrics)

    trace_and_print(call, compiled.as_text(), directory)


def trace_embed_calls(variant: str, size: int, batch: int, directory: str) -> None:
    from resmobile_jax import parallel
    from resmobile_jax.bench.jax_side import bench_config
    from resmobile_jax.embed import make_embed_fn
    from resmobile_jax.train.state import split_model

    model = build_model(bench_config(variant, size, "float32").model)
    model.eval()
    graphdef, params, batch_stats = split_model(model)
    bound = make_embed_fn(graphdef, jnp.float32, parallel.data_mesh()).bind(params, batch_stats)
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    compiled = bound.jitted.lower(bound.leaves, images).compile()
    trace_and_print(lambda: jax.block_until_ready(compiled(bound.leaves, images)), compiled.as_text(), directory)


def main(argv):
    del argv
    cli.quiet_logging()
    if FLAGS.mode == "eval":
        print("JAX and PyTorch eager, eval mode, part by part ...", flush=True)
        results = eval_parts(FLAGS.variant, FLAGS.size, FLAGS.batch, FLAGS.budget, FLAGS.blocks)
        print(f"\n{FLAGS.variant}, {FLAGS.size} px, batch {FLAGS.batch}, eval mode, float32, calls interleaved\n")
        print(eval_table(results))
        if FLAGS.trace_dir:
            trace_embed_calls(FLAGS.variant, FLAGS.size, FLAGS.batch, FLAGS.trace_dir)
        return
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
