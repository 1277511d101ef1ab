"""The XLA ops of a jax.profiler trace, summed per op and per kind of op: what `bench.breakdown --trace_dir` prints,
and how the page-fault cost of XLA:CPU's per-step temporaries was found (README, Speed)."""

from __future__ import annotations

import collections
import glob
import os
import re


def op_times(directory: str, steps: int) -> dict[str, float]:
    """{XLA op name: ms per step} from the newest jax.profiler trace under `directory`. On CPU, XLA's thunk executor
    records each op (fusion, dot, custom call) as an event on the thread that ran it; its own bookkeeping events and
    the region markers of its thread pools are left out."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb trace under {directory}")
    times: collections.Counter = collections.Counter()
    for plane in ProfileData.from_file(files[-1]).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):  # XLA's worker threads, not Python's or the client's
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool", "end: ")):
                    times[event.name] += event.duration_ns / 1e6 / steps
    return dict(times)


def op_table(directory: str, steps: int, top: int = 15) -> str:
    """The most expensive op kinds (ops named alike, e.g. every `broadcast_subtract_fusion.N`) and single ops."""
    times = collections.Counter(op_times(directory, steps))
    kinds: collections.Counter = collections.Counter()
    for name, ms in times.items():
        kinds[re.sub(r"\.\d+$", "", name)] += ms
    total = sum(times.values())
    lines = [f"XLA ops, ms per step (all threads; {total:.0f} ms in all)", "", "| op kind | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {ms:.1f} | {100 * ms / total:.1f}% |" for k, ms in kinds.most_common(top)]
    lines += ["", "| op | ms |", "|---|---:|"] + [f"| {k} | {ms:.1f} |" for k, ms in times.most_common(top)]
    return "\n".join(lines)
