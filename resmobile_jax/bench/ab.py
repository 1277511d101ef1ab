"""python -m resmobile_jax.bench.ab: one model setting, or one version of the C++ kernels, against another, in one
process, calls interleaved.

    python -m resmobile_jax.bench.ab --option fuse_eval_bn --values False,True --mode eval --variant v1 --size 224
    python -m resmobile_jax.bench.ab --kernels c5a1ee9 --mode eval --variant v2 --size 224   # a commit's cpu_kernels.cc
    python -m resmobile_jax.bench.ab --kernels resmobile_jax/models/kernels/cpu_kernels.cc --kernel_flags=-mno-avx512f

On a shared 2-core machine two separate runs of the same program differ by 20-40%; a few percent from one setting
shows only when both run in the same process, on the same inputs, alternating (A B, B A, ...). Both programs are
compiled first and their first outputs compared value by value (the same inputs and initial state); then each round
times `--calls` calls of each, and the medians are compared. `--option` is any `config.model` key (fuse_eval_bn,
depthwise_impl, stem_conv_impl, pointwise_impl, ...). `--kernels` (a file, or a git revision of this repository)
builds that cpu_kernels.cc beside this checkout's and registers its FFI targets under other names: A runs them, B
this checkout's; the Python side is this checkout's for both, so the two versions must take the same arguments
(`--set fuse_eval_bottleneck=False` keeps the model off a kernel an older version lacks). XLA flags cannot differ
within one process (compare those with two `bench` runs).
"""

from __future__ import annotations

import ast
import subprocess
import tempfile
from pathlib import Path

import jax
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


def _config(variant: str, size: int, option: str | None = None, value=None, fixed: dict | None = None):
    """The bench's config with `fixed` (--set, for both programs) and then option = value applied to config.model."""
    from resmobile_jax.bench.jax_side import bench_config

    config = bench_config(variant, size, "float32")
    settings = dict(fixed or {})
    if option is not None:
        settings[option] = value
    for key, v in settings.items():
        if key not in config.model:
            raise ValueError(f"unknown model option {key!r}; config.model has {', '.join(sorted(config.model))}")
        config.model[key] = v
    return config


def parse_settings(items: list[str]) -> dict:
    """--set's key=value items as {key: value}."""
    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value items, got {item!r}")
        settings[key.strip()] = parse_value(text.strip())
    return settings


def eval_call(config, batch: int):
    """A function running one embed call (compiled here) to completion; it returns the embeddings."""
    from resmobile_jax.models import build_model
    from resmobile_jax.timing import embed_calls

    model = build_model(config.model)
    model.eval()
    size = int(config.model.input_size)
    return embed_calls(model, (size, size), (batch,), config.model.dtype)[batch][0]


def train_call(config, batch: int):
    """A function running one train step (compiled here, state donated from step to step) to completion; it
    returns the step's metrics (loss, gradient norm, ...)."""
    from resmobile_jax.bench.jax_side import train_step_call

    return train_step_call(config, batch)[0]


KERNEL_SOURCE = "resmobile_jax/models/kernels/cpu_kernels.cc"
REPOSITORY = Path(__file__).resolve().parents[2]


def kernel_source(spec: str, workdir: Path, repository: Path = REPOSITORY) -> Path:
    """The cpu_kernels.cc `--kernels` names: a file, or a git revision of `repository` (written into `workdir`)."""
    if Path(spec).is_file():
        return Path(spec)
    shown = subprocess.run(["git", "-C", str(repository), "show", f"{spec}:{KERNEL_SOURCE}"], capture_output=True)
    if shown.returncode != 0:
        raise ValueError(f"--kernels {spec!r} is neither a file nor a git revision of {repository} holding "
                         f"{KERNEL_SOURCE} (git: {shown.stderr.decode().strip()}); give a cpu_kernels.cc path or a "
                         f"commit, tag or branch")
    path = workdir / "cpu_kernels.cc"
    path.write_bytes(shown.stdout)
    return path


def compare_outputs(a, b, names: tuple[str, str]) -> str:
    """A Markdown table of how far output pytree `b` is from `a`, leaf by leaf: values that differ, the largest
    absolute difference, and that in float32 ulps of the leaf's largest |value| (a difference near 0 measured in
    ulps of its own value would look huge)."""
    lines = [f"Outputs of the first call, {names[1]} against {names[0]}:", "",
             "| output | values | differing | max abs diff | in ulps of max abs value |", "|---|---:|---:|---:|---:|"]
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    if len(leaves_a) != len(leaves_b):
        raise ValueError(f"the two settings return different outputs ({len(leaves_a)} vs {len(leaves_b)} arrays)")
    for (path, x), y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        if x.shape != y.shape:
            raise ValueError(f"output {jax.tree_util.keystr(path)}: shapes differ, {x.shape} vs {y.shape}")
        name = jax.tree_util.keystr(path) or "output"
        diff = float(np.max(np.abs(x - y), initial=0))
        ulp = float(np.spacing(np.float32(np.max(np.abs(x), initial=0))))
        lines.append(f"| {name} | {x.size} | {int(np.sum(x != y))} | {diff:.3g} | {diff / ulp:.3g} |")
    return "\n".join(lines)


def report(option: str, times: dict[str, list[float]], title: str) -> str:
    names = list(times)
    base = float(np.median(times[names[0]]))
    lines = [f"{title}", "", f"| {option} | median ms | p10-p90 ms | calls | vs {names[0]} |", "|---|---:|---:|---:|---:|"]
    for name in names:
        t = np.asarray(times[name])
        lines.append(f"| {name} | {np.median(t):.2f} | {np.percentile(t, 10):.2f}-{np.percentile(t, 90):.2f} | "
                     f"{len(t)} | {np.median(t) / base:.3f}x |")
    return "\n".join(lines)


def option_calls(make, option: str, values: list[str], variant: str, size: int, batch: int,
                 fixed: dict | None = None) -> dict:
    """{value: call} for two values of one config.model key."""
    calls = {}
    for text in values:
        config = _config(variant, size, option, parse_value(text), fixed)
        print(f"compiling {option}={text} ...", flush=True)
        calls[text] = make(config, batch)
    return calls


KERNELS_PREFIX = "ab_"  # the other library's FFI targets are registered as ab_resmobile_...


def kernel_calls(make, spec: str, variant: str, size: int, batch: int, fixed: dict | None = None,
                 compile_flags: tuple[str, ...] = ()) -> dict:
    """{spec: call running the kernels `spec` names (built with `compile_flags` added), "this checkout": call
    running this checkout's}."""
    from resmobile_jax.models.kernels import cpu_kernels

    cpu_kernels.require()
    with tempfile.TemporaryDirectory() as workdir:
        source = kernel_source(spec, Path(workdir))
        print(f"building {spec}'s cpu_kernels.cc {' '.join(compile_flags)}...", flush=True)
        missing = cpu_kernels.register_library(source, KERNELS_PREFIX, compile_flags)
    config = _config(variant, size, fixed=fixed)
    calls, traced = {}, {}
    for name, prefix in ((spec, KERNELS_PREFIX), ("this checkout", "")):
        print(f"compiling with {name}'s kernels ...", flush=True)
        jax.clear_caches()  # nothing traced for one library may be reused for the other
        with cpu_kernels.targets_prefixed(prefix) as traced[name]:
            try:
                calls[name] = make(config, batch)
            except Exception as e:  # XLA refuses to compile a call of an unregistered target
                if lacking := sorted(traced[name] & set(missing)) if prefix else []:
                    raise ValueError(
                        f"{spec}'s cpu_kernels.cc has no {', '.join(lacking)}, which this checkout's model calls; "
                        f"compare versions with the same FFI targets, or keep the model off the newer kernel with "
                        f"--set (fuse_eval_bottleneck=False for resmobile_bottleneck_forward)") from e
                raise
    if not traced[spec] or traced[spec] != traced["this checkout"]:
        raise RuntimeError(f"the two programs call different kernels ({sorted(traced[spec])} vs "
                           f"{sorted(traced['this checkout'])}): with these settings the model uses no C++ kernel, "
                           f"or a trace was reused")
    return calls


def first_outputs(calls: dict, kernels: bool) -> dict:
    outputs = {}
    for name, call in calls.items():
        try:
            outputs[name] = jax.device_get(call())
        except Exception as e:  # XLA reports an FFI argument mismatch as a runtime error of the call
            if not kernels:
                raise
            raise RuntimeError(f"{name}'s kernels failed on this checkout's calls; the two versions must take the "
                               f"same buffers and attributes: {e}") from e
    return outputs


def main(argv):
    cli.start_command(argv)
    make = eval_call if FLAGS.mode == "eval" else train_call
    fixed = parse_settings(FLAGS.set)
    if FLAGS.kernels:
        calls = kernel_calls(make, FLAGS.kernels, FLAGS.variant, FLAGS.size, FLAGS.batch, fixed,
                             tuple(FLAGS.kernel_flags))
        option = "kernels"
    else:
        if len(FLAGS.values) != 2:
            raise ValueError(f"--values takes two values, got {FLAGS.values}")
        calls = option_calls(make, FLAGS.option, FLAGS.values, FLAGS.variant, FLAGS.size, FLAGS.batch, fixed)
        option = FLAGS.option
    outputs = first_outputs(calls, kernels=bool(FLAGS.kernels))
    times = interleaved_times(calls, min_rounds=FLAGS.rounds, max_rounds=FLAGS.rounds, per_round=FLAGS.calls, warmup=2)
    print(report(option, times, f"{FLAGS.variant}, {FLAGS.size} px, batch {FLAGS.batch}, {FLAGS.mode}, "
                                f"float32, {FLAGS.rounds} interleaved rounds"))
    print()
    print(compare_outputs(*outputs.values(), names=tuple(outputs)))


def define_flags() -> None:
    """Only when run as a command: the tests import this module beside bench's own flags (same names)."""
    flags.DEFINE_string("option", "fuse_eval_bn", "the config.model key to vary")
    flags.DEFINE_list("values", ["False", "True"], "its two values (Python literals or plain strings), A then B")
    flags.DEFINE_string("kernels", "", "instead of --option: A runs this cpu_kernels.cc (a file, or a git revision of "
                                       "this repository), B this checkout's")
    flags.DEFINE_list("kernel_flags", [], "compiler flags added to --kernels' build (e.g. -mno-avx512f: that version "
                                         "at AVX2 width on an AVX-512 CPU)")
    flags.DEFINE_list("set", [], "config.model settings for both programs, key=value,... (e.g. "
                                 "fuse_eval_bottleneck=False to compare with kernels older than that kernel)")
    flags.DEFINE_enum("mode", "eval", ["eval", "train"], "eval: the embed function (uint8 images in); train: the train step")
    flags.DEFINE_string("variant", "v1", "v1 | v2")
    flags.DEFINE_integer("size", 224, "square input size")
    flags.DEFINE_integer("batch", 32, "batch size")
    flags.DEFINE_integer("rounds", 8, "A/B rounds (the order alternates each round)")
    flags.DEFINE_integer("calls", 3, "timed calls of each setting per round")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
