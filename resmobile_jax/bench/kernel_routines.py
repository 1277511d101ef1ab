"""Times cpu_kernels.cc's inner routines on one thread, their data in cache, on V2's 224 px shapes: the fused blocks'
1x1 calls, the depthwise lines, the stem's conv rows. Each as GFLOP/s and as a share of one core's measured FMA peak:
what a whole call or a trace does not show is which routine has room left (benchmarks/SPEED.md, 2026-12-06 fourth
session). With --kernels (a file, or a git revision as for `bench.ab`) that version runs too, the two binaries
alternating, and the table adds the time ratio and whether the outputs are bit-identical.

    python -m resmobile_jax.bench.kernel_routines
    python -m resmobile_jax.bench.kernel_routines --kernels 64834b2 --rounds 5

The driver (kernel_routines.cc) includes the kernel source itself, so it builds with the same compiler and flags as
the library (cpu_kernels.COMPILE_FLAGS) but without JAX. Figures from one thread with the other core idle: a whole
call runs both cores, at ~1.8x (README, "Where the targets stand").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

DRIVER = Path(__file__).with_name("kernel_routines.cc")

FLAGS = flags.FLAGS


def compiler() -> str:
    """The C++ compiler the kernel library is built with (cpu_kernels.build: $CXX, default g++)."""
    return os.environ.get("CXX", "g++")


def program_flags() -> list[str]:
    """The library's compile flags (cpu_kernels.COMPILE_FLAGS) for a program instead of a shared library."""
    from resmobile_jax.models.kernels import cpu_kernels

    return [f for f in cpu_kernels.COMPILE_FLAGS if f not in ("-shared", "-fPIC")]


def build(source: Path, binary: Path) -> Path:
    """The driver compiled against `source` (a cpu_kernels.cc), like the library but as a program."""
    import jax

    if shutil.which(compiler()) is None:
        raise RuntimeError(f"no C++ compiler {compiler()!r} on PATH (install g++ or set CXX)")
    defines = [f'-DKERNEL_SOURCE="{source.resolve()}"']
    text = source.read_text()
    if "SumForwardLine(" in text and "SumInputGradLine(" in text:  # the driver calls both
        defines.append("-DHAVE_ROW_LINES")
    if "AddKernelRowByTaps(" in text:
        defines.append("-DHAVE_ROW_GRADIENT")
    cmd = [compiler(), *program_flags(), "-I", jax.ffi.include_dir(), *defines, str(DRIVER), "-o", str(binary)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"building the kernel-routine driver against {source} failed:\n{done.stderr[-3000:]}")
    return binary


def run(binary: Path, reps: int) -> dict[str, dict]:
    """{case: {"flop", "ns", "hash", "matches_generic"}} from one run of the driver."""
    done = subprocess.run([str(binary), str(reps)], capture_output=True, text=True, check=True)
    cases = {}
    for line in done.stdout.splitlines():
        name, flop, ns, digest, matches = line.split("\t")
        cases[name] = {"flop": float(flop), "ns": float(ns), "hash": digest, "matches_generic": matches}
    return cases


def best_of(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Each case's fastest run (outputs must agree between runs: the inputs are fixed)."""
    out = {}
    for cases in runs:
        for name, case in cases.items():
            if name in out and out[name]["hash"] != case["hash"]:
                raise RuntimeError(f"case {name!r}: two runs of one binary gave different outputs")
            if name not in out or case["ns"] < out[name]["ns"]:
                out[name] = case
    return out


def table(this: dict[str, dict], core_peak: float | None, other: dict[str, dict] | None = None,
          other_name: str = "") -> str:
    header = "| routine, shape | us | GFLOP/s | of one core's peak | equals the generic routine |"
    rule = "|---|---:|---:|---:|---|"
    if other is not None:
        header += f" {other_name} us | time vs {other_name} | outputs |"
        rule += "---:|---:|---|"
    lines = [header, rule]
    for name, case in this.items():
        gflops = case["flop"] / case["ns"]
        share = f"{100 * gflops / core_peak:.0f}%" if core_peak else "—"
        row = f"| {name} | {case['ns'] / 1e3:.1f} | {gflops:.1f} | {share} | {case['matches_generic']} |"
        if other is not None:
            theirs = other.get(name)
            if theirs is None:
                row += " — | — | — |"
            else:
                same = "identical" if theirs["hash"] == case["hash"] else "differ"
                row += f" {theirs['ns'] / 1e3:.1f} | {case['ns'] / theirs['ns']:.3f}x | {same} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv):
    del argv
    from resmobile_jax.bench.ab import kernel_source
    from resmobile_jax.bench.system import _cpuinfo, measured_peak_gflops
    from resmobile_jax.timing import cpu_model
    from resmobile_jax.models.kernels import cpu_kernels

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        binaries = {"this checkout": build(cpu_kernels.SOURCE, tmp / "this")}
        if FLAGS.kernels:
            other_dir = tmp / "other"
            other_dir.mkdir()
            binaries[FLAGS.kernels] = build(kernel_source(FLAGS.kernels, other_dir), tmp / "other_binary")
        runs = {name: [] for name in binaries}
        peaks = []  # one core's FMA peak before each round; the highest is the one with the machine quietest
        for r in range(FLAGS.rounds):
            peaks.append(measured_peak_gflops(cores=1))
            order = list(binaries) if r % 2 == 0 else list(reversed(binaries))
            for name in order:
                runs[name].append(run(binaries[name], FLAGS.reps))
    core_peak, how = max(peaks, key=lambda p: p[0] or 0.0)
    best = {name: best_of(r) for name, r in runs.items()}
    other = best.get(FLAGS.kernels) if FLAGS.kernels else None
    peak_text = f"{core_peak:.0f} GFLOP/s ({how})" if core_peak else how
    version = subprocess.run([compiler(), "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    text = "\n".join([
        "# cpu_kernels.cc's inner routines on one thread",
        "",
        f"- command: `python -m resmobile_jax.bench.kernel_routines {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu_model(_cpuinfo() or '')}; {' '.join(version) or compiler()}, the library's flags "
        f"({' '.join(program_flags())})",
        f"- one core's measured FMA peak (the best of {FLAGS.rounds}): {peak_text}",
        f"- each case: the best of {FLAGS.rounds} runs x 7 rounds of {FLAGS.reps} calls, data in cache"
        + (f"; {FLAGS.kernels}'s binary alternating with this checkout's ('outputs': this checkout's output bytes "
           f"against its)" if FLAGS.kernels else ""),
        "",
        table(best["this checkout"], core_peak, other, FLAGS.kernels),
    ])
    print(text)
    if FLAGS.out:
        Path(FLAGS.out).write_text(text + "\n")


def define_flags() -> None:
    """Only when run as a command: the tests import this module beside bench's own flags (same names)."""
    flags.DEFINE_string("kernels", "", "also time this cpu_kernels.cc (a file, or a git revision of this repository)")
    flags.DEFINE_integer("rounds", 3, "runs of each binary (alternating); each case keeps its best")
    flags.DEFINE_integer("reps", 20, "calls per timed round inside the driver (7 rounds, best kept)")
    flags.DEFINE_string("out", "", "also write the Markdown table here")


if __name__ == "__main__":
    define_flags()
    app.run(main)
