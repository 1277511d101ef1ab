"""The XLA ops of a jax.profiler trace, summed per op and per kind of op: what `bench.breakdown --trace_dir` prints,
and how the page-fault cost of XLA:CPU's per-step temporaries was found (README, Speed)."""

from __future__ import annotations

import collections
import glob
import os
import re


def op_events(directory: str) -> list[tuple[int, int, str]]:
    """(start ns, end ns, XLA op name) of every op in the newest jax.profiler trace under `directory`. On CPU, XLA's
    thunk executor records each op (fusion, dot, custom call) as an event carrying an `hlo_op` stat, on whichever
    thread ran it: XLA's pool threads, and the Python thread itself when computations run inline
    (cli.inline_cpu_execution). Python's own events, XLA's bookkeeping and its pools' region markers carry none."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb trace under {directory}")
    events = []
    for plane in ProfileData.from_file(files[-1]).planes:
        for line in plane.lines:
            for event in line.events:
                if any(name == "hlo_op" for name, _ in event.stats):
                    events.append((event.start_ns, event.start_ns + event.duration_ns, event.name))
    return events


def op_times(directory: str, steps: int, events=None) -> dict[str, float]:
    """{XLA op name: ms per step} (op_events, summed; `events` if already read)."""
    times: collections.Counter = collections.Counter()
    for start, end, name in op_events(directory) if events is None else events:
        times[name] += (end - start) / 1e6 / steps
    return dict(times)


def coverage(directory: str, steps: int, events=None) -> tuple[float, float]:
    """(ms per step from the first op's start to the last op's end, ms per step inside at least one op event). The
    difference is time no op event accounts for: XLA's own (Eigen) matmuls return at once and finish on the thread
    pool untraced, so with them the op table undercounts."""
    spans = sorted((start, end) for start, end, _ in (op_events(directory) if events is None else events))
    if not spans:
        return 0.0, 0.0
    covered, (lo, hi) = 0, spans[0]
    for start, end in spans[1:]:
        if start > hi:
            covered, lo, hi = covered + hi - lo, start, end
        else:
            hi = max(hi, end)
    covered += hi - lo
    wall = max(end for _, end in spans) - spans[0][0]
    return wall / 1e6 / steps, covered / 1e6 / steps


def custom_call_targets(hlo_text: str) -> dict[str, str]:
    """{op name: custom-call target} from a compiled program's HLO text (`compiled.as_text()`): the trace names the
    C++ kernels' ops `ffi_call.N`; the target says which kernel each is."""
    return dict(re.findall(r'%(\S+) = [^\n]*? custom-call\([^\n]*?custom_call_target="([^"]+)"', hlo_text))


def op_table(directory: str, steps: int, top: int = 15, targets: dict[str, str] | None = None) -> str:
    """The most expensive op kinds (ops named alike, e.g. every `broadcast_subtract_fusion.N`, or with `targets`
    (custom_call_targets) every call of one C++ kernel) and single ops."""
    targets = targets or {}
    events = op_events(directory)  # the trace file is read once
    times = collections.Counter(op_times(directory, steps, events))
    kinds: collections.Counter = collections.Counter()
    for name, ms in times.items():
        kinds[targets.get(name) or re.sub(r"\.\d+$", "", name)] += ms
    total = sum(times.values())
    wall, covered = coverage(directory, steps, events)
    lines = [f"XLA ops, ms per step (all threads; {total:.0f} ms in all). Step span {wall:.0f} ms, {wall - covered:.0f} ms "
             "of it inside no op event (XLA's Eigen matmuls run untraced on the thread pool)",
             "", "| op kind | ms | share |", "|---|---:|---:|"]
    lines += [f"| {k} | {ms:.1f} | {100 * ms / total:.1f}% |" for k, ms in kinds.most_common(top)]
    lines += ["", "| op | ms |", "|---|---:|"] + [f"| {k}{f' ({targets[k]})' if k in targets else ''} | {ms:.1f} |"
                                                 for k, ms in times.most_common(top)]
    return "\n".join(lines)
