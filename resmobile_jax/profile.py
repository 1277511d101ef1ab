"""python -m resmobile_jax.profile --config configs/v1.py: parameters, MACs, XLA FLOPs, size and shapes per part.

MACs are counted analytically from the traced program: every convolution and matmul contributes
(output elements) x (multiply-accumulates per output), padded taps included, the convention of torchvision's
"GFLOPS" column (which is really GMACs). XLA's `cost_analysis()['flops']` is reported beside it, labelled: it
counts 2 per MAC, skips padded taps and adds elementwise work.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from resmobile_jax import cli
from resmobile_jax.models import PARTS, ResMobileNet, build_model, input_hw
from resmobile_jax.models.resmobilenet import XLA_ONLY

MB = 1e6  # sizes are in decimal megabytes (10^6 bytes)


def count_macs(jaxpr) -> int:
    """Multiply-accumulates of conv_general_dilated and dot_general equations, recursing into sub-programs."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape  # kernel, laid out per dimension_numbers
            dn = eqn.params["dimension_numbers"]
            out_features = rhs[dn.rhs_spec[0]]
            # kernel elements per output = in_features/groups * prod(window), i.e. all kernel elems / out_features
            total += math.prod(out) * (math.prod(rhs) // out_features)
        elif name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract_lhs)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += count_macs(sub)
    return total


def _xla_flops(fn, *args) -> float | None:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])


def _param_count(module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))))


def _checkpoint_bytes(model: ResMobileNet, model_config: dict) -> int:
    from resmobile_jax.checkpoint import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = save_model(Path(tmp) / "ckpt", model, model_config)
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def profile_model(model_config, input_size=None, *, xla_flops: bool = True, checkpoint_size: bool = True) -> dict:
    """Profiles one variant at batch 1. `input_size` defaults to `model_config.input_size`."""
    h, w = input_hw(input_size if input_size is not None else model_config["input_size"])
    # Count with XLA's own convolutions: the shifted depthwise form (elementwise ops) and the CPU kernels (custom
    # calls) compute the same functions in ways a conv/matmul MAC counter and XLA's cost analysis do not see.
    cfg = {**dict(model_config), **XLA_ONLY, "pointwise_impl": "conv", "dtype": "float32", "param_dtype": "float32"}
    model = build_model(cfg)
    model.check_input(jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
    graphdef, state = nnx.split(model)

    def part_fn(part):
        return lambda s, x: nnx.merge(graphdef, s).apply_part(part, x)

    x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    parts = {}
    for part in PARTS:
        fn = part_fn(part)
        macs = count_macs(jax.make_jaxpr(fn)(state, x).jaxpr)
        params = _param_count(getattr(model, part))
        out = jax.eval_shape(fn, state, x)
        parts[part] = {
            "params": params,
            "macs": macs,
            "xla_flops": _xla_flops(fn, state, x) if xla_flops else None,
            "params_mb_fp32": params * 4 / MB,
            "params_mb_bf16": params * 2 / MB,
            "output_shape": list(out.shape[1:]),
        }
        x = out
    total_params = sum(p["params"] for p in parts.values())
    batch_stats = int(sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))))
    total = {
        "params": total_params,
        "macs": sum(p["macs"] for p in parts.values()),
        "xla_flops": _xla_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32))
        if xla_flops
        else None,
        "params_mb_fp32": total_params * 4 / MB,
        "params_mb_bf16": total_params * 2 / MB,
        "batch_stats": batch_stats,
        "checkpoint_mb_on_disk": _checkpoint_bytes(model, cfg) / MB if checkpoint_size else None,
        "output_shape": parts["head"]["output_shape"],
    }
    return {
        "variant": cfg["variant"],
        "input_size": [h, w],
        "embedding_dim": int(cfg["embedding_dim"]),
        "v2_output_stride": int(cfg.get("v2_output_stride", 32)),
        "units": {"macs": "multiply-accumulates (analytic, convs + linears)", "xla_flops": "XLA cost_analysis flops",
                  "mb": "10^6 bytes"},
        "parts": parts,
        "total": total,
    }


def format_table(result: dict) -> str:
    h, w = result["input_size"]
    lines = [
        f"ResMobileNet {result['variant']} at {h}x{w}, embedding {result['embedding_dim']} (batch 1)",
        "",
        "| part | params | MACs (analytic) | XLA FLOPs (cost_analysis) | MB fp32 | MB bf16 | output shape (H, W, C) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    rows = list(result["parts"].items()) + [("total", result["total"])]
    for name, p in rows:
        xla = f"{p['xla_flops']:,.0f}" if p.get("xla_flops") is not None else "-"
        lines.append(
            f"| {name} | {p['params']:,} | {p['macs']:,} | {xla} | {p['params_mb_fp32']:.2f} | {p['params_mb_bf16']:.2f} "
            f"| {tuple(p['output_shape'])} |"
        )
    t = result["total"]
    if t.get("checkpoint_mb_on_disk") is not None:
        lines.append(f"\ncheckpoint on disk (orbax, params + BN statistics): {t['checkpoint_mb_on_disk']:.2f} MB")
    return "\n".join(lines)


def main(argv):
    from absl import flags

    del argv
    cli.quiet_logging()
    cfg = flags.FLAGS.config
    size = flags.FLAGS.input_size
    result = profile_model(cfg.model, None if size == "config" else cli.parse_size(size))
    print(json.dumps(result, indent=2) if flags.FLAGS.json else format_table(result))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "configs/v1.py or configs/v2.py (with :preset)", lock_config=True)
    flags.DEFINE_string("input_size", "224", "H or HxW to count at; 224 (default) is the resolution torchvision's and "
                        "the seed's figures refer to; 'config' uses config.model.input_size")
    flags.DEFINE_bool("json", False, "print JSON instead of a Markdown table")
    flags.mark_flags_as_required(["config"])
    cli.run(main)
