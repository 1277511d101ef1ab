"""What the machine is and what a measurement cost it: peak memory while a function runs, nominal peak FLOP/s."""

from __future__ import annotations

import os
import threading
import time


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now (Linux), 0 where /proc is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:
        return 0


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every few ms on a thread. ru_maxrss cannot do this:
    it only grows, so in a process that runs JAX and PyTorch one after the other it would charge one with the other's
    peak."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def megabytes(self) -> float:
        """Peak above the level at entry."""
        return (self.peak - self.base) / 1e6


def cpu_peak_gflops() -> tuple[float | None, str]:
    """Nominal fp32 peak of the cores this process may use: cores x clock x FLOP/cycle of the widest FMA the CPU
    reports (AVX-512: 64, AVX2+FMA: 32, else 8). An upper bound for comparison, not a promise (turbo, 1 vs 2 FMA
    ports and VM clock reporting all move it)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return None, "unknown (no /proc/cpuinfo)"
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    mhz = next((float(line.split(":", 1)[1]) for line in info.splitlines() if line.startswith("cpu MHz")), None)
    if not mhz:
        return None, "unknown (no clock in /proc/cpuinfo)"
    per_cycle, isa = (64, "AVX-512") if "avx512f" in flags else (32, "AVX2+FMA") if "fma" in flags else (8, "SSE")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores * mhz / 1e3 * per_cycle, f"{cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} FLOP/cycle ({isa})"

