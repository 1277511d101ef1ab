"""Numerical proof that the Flax model computes what the torchvision reference computes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from resmobile_jax.convert.core import flax_to_torch, torch_to_flax
from resmobile_jax.models import build_model, jit_stages

# fp32 on CPU. Stage outputs are not normalized (the tail reaches |x| ~ 10), so their bound scales with the
# largest reference value: |flax - torch| <= TOLERANCE * max(1, max|torch|). Embeddings are unit vectors.
TOLERANCE = 1e-5


def stage_diffs(torch_model, flax_model, images_nchw: np.ndarray) -> dict[str, dict[str, float]]:
    """Max abs difference of every stage output (stem, mid.i, tail.i, embedding) on the same images, eval mode."""
    import torch

    torch_model.eval()
    flax_model.eval()
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in torch_model.stages(torch.from_numpy(images_nchw)).items()}
    # On GPU/TPU, JAX would use TF32/bf16 passes for fp32 convs by default; parity is checked at full precision.
    with jax.default_matmul_precision("highest"):
        out = jit_stages(flax_model)(jnp.asarray(images_nchw.transpose(0, 2, 3, 1)))
    result = {}
    for name, r in ref.items():
        if r.ndim == 4:
            r = r.transpose(0, 2, 3, 1)
        f = np.asarray(out[name], dtype=np.float32)
        if f.shape != r.shape:
            raise AssertionError(f"stage {name}: Flax shape {f.shape} != torch shape {r.shape}")
        diff = float(np.max(np.abs(f - r)))
        scale = max(1.0, float(np.max(np.abs(r))))
        result[name] = {"max_abs_diff": diff, "max_abs_ref": float(np.max(np.abs(r))), "ok": diff <= TOLERANCE * scale}
    return result


def parity_check(
    variant: str,
    state_dict: dict[str, np.ndarray] | None = None,
    *,
    embedding_dim: int = 512,
    v2_output_stride: int = 32,
    image_size: tuple[int, int] = (224, 224),
    batch: int = 2,
    depthwise_impl: str = "auto",
    seed: int = 0,
) -> dict:
    """Builds the reference (random weights and BN statistics, or `state_dict`), converts it, compares every stage."""
    from resmobile_jax.convert.torch_reference import build_reference, randomize

    ref = build_reference(variant, embedding_dim, v2_output_stride, seed=seed)
    if state_dict is None:
        randomize(ref, seed)
        state_dict = {k: v.numpy() for k, v in ref.state_dict().items()}
    else:
        import torch

        ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    model = build_model(
        dict(variant=variant, embedding_dim=embedding_dim, v2_output_stride=v2_output_stride, depthwise_impl=depthwise_impl)
    )
    torch_to_flax(state_dict, model)
    images = np.random.default_rng(seed).standard_normal((batch, 3, *image_size)).astype(np.float32)
    stages = stage_diffs(ref, model, images)
    round_trip = flax_to_torch(model)
    bit_exact = set(round_trip) == set(state_dict) and all(np.array_equal(round_trip[k], state_dict[k]) for k in state_dict)
    return {
        "variant": variant,
        "v2_output_stride": v2_output_stride,
        "embedding_dim": embedding_dim,
        "input_shape_nchw": [batch, 3, *image_size],
        "depthwise_impl": depthwise_impl,
        "tolerance": TOLERANCE,
        "stages": stages,
        "max_abs_diff": max(s["max_abs_diff"] for s in stages.values()),
        "embedding_max_abs_diff": stages["embedding"]["max_abs_diff"],
        "round_trip_bit_exact": bool(bit_exact),
        "passed": bool(all(s["ok"] for s in stages.values()) and bit_exact),
    }


def format_report(result: dict) -> str:
    lines = [
        f"ResMobileNet {result['variant']} parity vs torchvision reference, input {tuple(result['input_shape_nchw'])} "
        f"NCHW, depthwise={result['depthwise_impl']}, tolerance {result['tolerance']:g} x max(1, max|ref|)",
        f"{'stage':<10} {'max abs diff':>13} {'max |ref|':>10}  ok",
    ]
    for name, s in result["stages"].items():
        lines.append(f"{name:<10} {s['max_abs_diff']:>13.3e} {s['max_abs_ref']:>10.3f}  {'yes' if s['ok'] else 'NO'}")
    lines.append(f"torch -> flax -> torch round trip bit-exact: {'yes' if result['round_trip_bit_exact'] else 'NO'}")
    lines.append(f"embedding max abs diff {result['embedding_max_abs_diff']:.3e}: {'PASS' if result['passed'] else 'FAIL'}")
    return "\n".join(lines)
