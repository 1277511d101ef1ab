"""What the machine is and what a measurement cost it: peak memory while a function runs, peak FLOP/s (nominal
and measured)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from resmobile_jax.timing import cpuinfo_fields

FMA_LOOP = Path(__file__).with_name("fma_peak.c")


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak RSS of this process (VmHWM) to its current RSS: writing 5 to /proc/self/clear_refs
    (Linux >= 4.0). False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """The kernel's peak RSS of this process (VmHWM), 0 where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


class PeakRSS:
    """Peak resident memory above the level at entry. ru_maxrss cannot do this: it only grows, so in a process that
    runs JAX and PyTorch one after the other it would charge one with the other's peak. On Linux the kernel's own
    peak (VmHWM), reset at entry, counts every page; where that reset is not allowed, RSS is sampled every few ms on
    a thread, which can miss a short-lived peak (a sampled 300 MB allocation once read 218 MB under load)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        kernel_peak = _reset_peak_rss()
        self.base = self.peak = rss_bytes()
        if not kernel_peak:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, _peak_rss_bytes())
        self.peak = max(self.peak, rss_bytes())

    @property
    def megabytes(self) -> float:
        """Peak above the level at entry."""
        return (self.peak - self.base) / 1e6


def _cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def cpu_flags(info: str | None = None) -> set[str]:
    """The instruction-set flags /proc/cpuinfo lists for the first CPU (avx2, fma, avx512f, ...); empty without it."""
    info = _cpuinfo() if info is None else info
    return set(cpuinfo_fields(info or "").get("flags", "").split())


def fma_flops_per_cycle(info: str) -> tuple[int, str]:
    """fp32 FLOP per cycle and core of the widest FMA the CPU in `info` (/proc/cpuinfo's text) has: 2 FMA ports of
    its vector width. AMD's family 25 (Zen 4) runs AVX-512 on 256-bit units, so it peaks at the AVX2 rate."""
    flags = cpu_flags(info)
    field = cpuinfo_fields(info)
    if "avx512f" in flags:
        if field.get("vendor_id") == "AuthenticAMD" and field.get("cpu family") == "25":
            return 32, "AVX-512 on 256-bit units (AMD Zen 4)"
        return 64, "AVX-512"
    return (32, "AVX2+FMA") if "fma" in flags else (8, "SSE")


def cpu_peak_gflops(info: str | None = None) -> tuple[float | None, str]:
    """Nominal fp32 peak of the cores this process may use: cores x clock x FLOP/cycle (fma_flops_per_cycle). An
    upper bound for comparison, not a promise (turbo, 1 vs 2 FMA ports and VM clock reporting all move it)."""
    info = _cpuinfo() if info is None else info
    if info is None:
        return None, "unknown (no /proc/cpuinfo)"
    mhz = float(cpuinfo_fields(info).get("cpu MHz") or 0)
    if not mhz:
        return None, "unknown (no clock in /proc/cpuinfo)"
    per_cycle, isa = fma_flops_per_cycle(info)
    cores = usable_cores()
    return cores * mhz / 1e3 * per_cycle, f"{cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measured_peak_gflops(seconds: float = 0.3, cores: int | None = None) -> tuple[float | None, str]:
    """fp32 FMA throughput of the cores this process may use, measured with all of them busy at once (fma_peak.c:
    12 independent FMA chains per core), or of `cores` of them. The clock a VM shows in /proc/cpuinfo can be the
    base clock: this 2-core EPYC reports 2.45 GHz, i.e. 157 GFLOP/s nominal, and sustains ~200 under load. None (and
    why) without a C compiler or where the loop fails."""
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        return None, "not measured (no C compiler; set CC)"
    cores = usable_cores() if cores is None else cores
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "fma_peak"
        build = subprocess.run([compiler, "-O2", "-march=native", "-ffp-contract=fast", str(FMA_LOOP), "-o",
                                str(binary)], capture_output=True, text=True)
        if build.returncode != 0:
            return None, f"not measured ({compiler} failed: {build.stderr.strip()[-200:]})"
        runs = [subprocess.Popen([str(binary), str(seconds)], stdout=subprocess.PIPE, text=True)
                for _ in range(cores)]
        outputs = [run.communicate()[0] for run in runs]
    if any(run.returncode != 0 for run in runs):
        return None, "not measured (the FMA loop failed)"
    total = sum(float(out.split()[0]) for out in outputs)
    return total, f"FMA loop on {cores} core{'s' if cores != 1 else ''} at once, {total / cores:.0f} GFLOP/s each"

