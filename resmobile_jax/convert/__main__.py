"""python -m resmobile_jax.convert {to-flax,to-torch,check}: move weights between PyTorch and Flax, and prove parity."""

from __future__ import annotations

import argparse
import json
import sys

from resmobile_jax.cli import parse_size
from resmobile_jax.convert.checkpoint_io import CheckpointError
from resmobile_jax.models.layers import DEPTHWISE_IMPLS


def cmd_to_flax(args) -> int:
    from resmobile_jax.checkpoint import save_model
    from resmobile_jax.convert.checkpoint_io import read_state_dict, sha256
    from resmobile_jax.convert.core import embedding_dim_of, torch_to_flax
    from resmobile_jax.models import build_model

    state = read_state_dict(args.src)
    embedding_dim = args.embedding_dim or embedding_dim_of(state) or 512
    model_config = dict(variant=args.variant, embedding_dim=embedding_dim, v2_output_stride=args.v2_output_stride)
    model = build_model(model_config, seed=args.seed)
    report = torch_to_flax(state, model, partial=args.partial)
    print(report.summary(verbose=args.partial or args.verbose))
    meta = {
        "source": {"path": str(args.src), "sha256": sha256(args.src), "format": report.source_format},
        "conversion": {"partial": args.partial, "loaded": len(report.loaded), "missing": report.missing},
    }
    if report.complete and report.source_format == "resmobilenet" and not args.no_verify:
        from resmobile_jax.convert.check import parity_check

        result = parity_check(args.variant, state, embedding_dim=embedding_dim, v2_output_stride=args.v2_output_stride,
                              image_size=(128, 128))
        meta["conversion"].update(max_abs_diff=result["max_abs_diff"], embedding_max_abs_diff=result["embedding_max_abs_diff"])
        print(f"verified against the torchvision reference: embedding max abs diff {result['embedding_max_abs_diff']:.2e}")
        if not result["passed"]:
            raise CheckpointError("converted model does not match the reference within tolerance; nothing written")
    out = save_model(args.out, model, model_config, meta)
    print(f"wrote Flax checkpoint {out}")
    return 0


def cmd_to_torch(args) -> int:
    from resmobile_jax.checkpoint import load_model
    from resmobile_jax.convert.checkpoint_io import write_state_dict
    from resmobile_jax.convert.core import flax_to_torch

    model, meta = load_model(args.src)
    state = flax_to_torch(model)
    try:
        import torch

        from resmobile_jax.convert.torch_reference import build_reference

        m = meta["model"]
        ref = build_reference(m["variant"], int(m["embedding_dim"]), int(m.get("v2_output_stride", 32)))
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    except ImportError:
        pass  # safetensors output needs no torch; the strict load is an extra check when torch is installed
    path = write_state_dict(state, args.out)
    print(f"wrote {len(state)} tensors to {path} (loads with strict=True into the {meta['model']['variant']} reference)")
    return 0


def cmd_check(args) -> int:
    from resmobile_jax.convert.check import format_report, parity_check
    from resmobile_jax.convert.checkpoint_io import read_state_dict
    from resmobile_jax.convert.core import embedding_dim_of

    state = read_state_dict(args.checkpoint) if args.checkpoint else None
    embedding_dim = args.embedding_dim or (embedding_dim_of(state) if state else None) or 512
    result = parity_check(
        args.variant, state, embedding_dim=embedding_dim, v2_output_stride=args.v2_output_stride,
        image_size=parse_size(args.image_size), batch=args.batch, depthwise_impl=args.depthwise_impl, seed=args.seed,
    )
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0 if result["passed"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m resmobile_jax.convert", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp, variant_required=True):
        sp.add_argument("--variant", choices=("v1", "v2"), required=variant_required)
        sp.add_argument("--embedding-dim", type=int, default=None, help="default: read from head.fc.weight, else 512")
        sp.add_argument("--v2-output-stride", type=int, choices=(32, 64), default=32)
        sp.add_argument("--seed", type=int, default=0)

    a = sub.add_parser("to-flax", help="a torchvision-style .pth/.pt/.safetensors -> an orbax model checkpoint")
    a.add_argument("src")
    a.add_argument("--out", required=True, help="new directory for the Flax checkpoint")
    a.add_argument("--partial", action="store_true",
                   help="load what matches (also torchvision mobilenet_v3_large / resnet checkpoints) and list the rest")
    a.add_argument("--no-verify", action="store_true", help="skip the parity check against the torch reference")
    a.add_argument("--verbose", action="store_true", help="list every tensor")
    model_args(a)
    a.set_defaults(fn=cmd_to_flax)

    b = sub.add_parser("to-torch", help="an orbax model checkpoint -> a .pth or .safetensors state_dict")
    b.add_argument("src")
    b.add_argument("--out", required=True, help="output file, .pth/.pt or .safetensors")
    b.set_defaults(fn=cmd_to_torch)

    c = sub.add_parser("check", help="run reference and converted Flax model on the same images, per-stage diffs")
    model_args(c)
    c.add_argument("--checkpoint", default=None, help="a torchvision-style checkpoint (default: random weights and BN stats)")
    c.add_argument("--image-size", default="224", help="H or HxW (default 224)")
    c.add_argument("--batch", type=int, default=2)
    c.add_argument("--depthwise-impl", choices=DEPTHWISE_IMPLS, default="auto")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_check)
    return p


def main(argv=None) -> int:
    from resmobile_jax.cli import quiet_logging

    args = build_parser().parse_args(argv)
    quiet_logging()
    try:
        return args.fn(args)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
