"""Building the C++ depthwise kernel: cached per source/CPU, concurrent-safe, clear errors without a compiler."""

import pytest

from resmobile_jax.models.kernels import cpu_kernels


def test_build_is_cached_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("RESMOBILE_KERNEL_CACHE", str(tmp_path))
    path = cpu_kernels.build()
    assert path.parent == tmp_path and path.suffix == ".so" and path.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    assert cpu_kernels.build() == path and path.stat().st_mtime_ns == mtime  # not rebuilt


def test_missing_or_failing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("RESMOBILE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(cpu_kernels.KernelUnavailable, match="no C\\+\\+ compiler 'no-such-compiler'.*set CXX"):
        cpu_kernels.build()
    monkeypatch.setenv("CXX", "false")  # exists, fails
    with pytest.raises(cpu_kernels.KernelUnavailable, match="compiling cpu_kernels.cc failed"):
        cpu_kernels.build()
    assert list(tmp_path.iterdir()) == []
