"""python -m resmobile_jax.bench.ab: one model setting against another, in one process, calls interleaved.

    python -m resmobile_jax.bench.ab --option fuse_eval_bn --values False,True --mode eval --variant v1 --size 224

On a shared 2-core machine two separate runs of the same program differ by 20-40%; a few percent from one setting
shows only when both run in the same process, on the same inputs, alternating (A B, B A, ...). Both programs are
compiled first; then each round times `--calls` calls of each, and the medians are compared. `--option` is any
`config.model` key (fuse_eval_bn, depthwise_impl, stem_conv_impl, pointwise_impl, ...); XLA flags cannot differ
within one process (compare those with two `bench` runs).
"""

from __future__ import annotations

import ast

import numpy as np
from absl import flags

from resmobile_jax import cli
from resmobile_jax.timing import interleaved_times

FLAGS = flags.FLAGS


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a plain string such as shifted


def _config(variant: str, size: int, option: str, value):
    from resmobile_jax.bench.jax_side import bench_config

    config = bench_config(variant, size, "float32")
    if option not in config.model:
        raise ValueError(f"unknown model option {option!r}; config.model has {', '.join(sorted(config.model))}")
    config.model[option] = value
    return config


def eval_call(config, batch: int):
    """A function running one embed call (compiled here) to completion."""
    from resmobile_jax.models import build_model
    from resmobile_jax.timing import embed_calls

    model = build_model(config.model)
    model.eval()
    size = int(config.model.input_size)
    return embed_calls(model, (size, size), (batch,), config.model.dtype)[batch][0]


def train_call(config, batch: int):
    """A function running one train step (compiled here, state donated from step to step) to completion."""
    from resmobile_jax.bench.jax_side import train_step_call

    return train_step_call(config, batch)[0]


def report(option: str, times: dict[str, list[float]], title: str) -> str:
    names = list(times)
    base = float(np.median(times[names[0]]))
    lines = [f"{title}", "", f"| {option} | median ms | p10-p90 ms | calls | vs {names[0]} |", "|---|---:|---:|---:|---:|"]
    for name in names:
        t = np.asarray(times[name])
        lines.append(f"| {name} | {np.median(t):.2f} | {np.percentile(t, 10):.2f}-{np.percentile(t, 90):.2f} | "
                     f"{len(t)} | {np.median(t) / base:.3f}x |")
    return "\n".join(lines)


def main(argv):
    cli.start_command(argv)
    if len(FLAGS.values) != 2:
        raise ValueError(f"--values takes two values, got {FLAGS.values}")
    make = eval_call if FLAGS.mode == "eval" else train_call
    calls = {}
    for text in FLAGS.values:
        config = _config(FLAGS.variant, FLAGS.size, FLAGS.option, parse_value(text))
        print(f"compiling {FLAGS.option}={text} ...", flush=True)
        calls[text] = make(config, FLAGS.batch)
    times = interleaved_times(calls, min_rounds=FLAGS.rounds, max_rounds=FLAGS.rounds, per_round=FLAGS.calls, warmup=2)
    print(report(FLAGS.option, times, f"{FLAGS.variant}, {FLAGS.size} px, batch {FLAGS.batch}, {FLAGS.mode}, "
                                      f"float32, {FLAGS.rounds} interleaved rounds"))


def define_flags() -> None:
    """Only when run as a command: the tests import this module beside bench's own flags (same names)."""
    flags.DEFINE_string("option", "fuse_eval_bn", "the config.model key to vary")
    flags.DEFINE_list("values", ["False", "True"], "its two values (Python literals or plain strings), A then B")
    flags.DEFINE_enum("mode", "eval", ["eval", "train"], "eval: the embed function (uint8 images in); train: the train step")
    flags.DEFINE_string("variant", "v1", "v1 | v2")
    flags.DEFINE_integer("size", 224, "square input size")
    flags.DEFINE_integer("batch", 32, "batch size")
    flags.DEFINE_integer("rounds", 8, "A/B rounds (the order alternates each round)")
    flags.DEFINE_integer("calls", 3, "timed calls of each setting per round")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
