"""Building the C++ depthwise kernel: cached per source/CPU, concurrent-safe, clear errors without a compiler."""

import pytest

from resmobile_jax.bench.system import cpu_flags
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


@pytest.mark.slow
def test_another_version_of_the_kernels_runs_beside_this_one(tmp_path, monkeypatch):
    """bench.ab --kernels' mechanism: a changed cpu_kernels.cc (Hardswish as t * (u * (1/6)) instead of t * (u / 6))
    built and registered under a prefix; a function traced inside targets_prefixed calls it, one traced outside calls
    this checkout's. The change shows in Hardswish outputs (a rounding apart) and nowhere else."""
    import jax
    import numpy as np

    cpu_kernels.require()  # this checkout's library, from the usual cache
    monkeypatch.setenv("RESMOBILE_KERNEL_CACHE", str(tmp_path / "cache"))  # the changed one apart
    source = cpu_kernels.SOURCE.read_text()
    assert source.count("return t * (u / 6.0f);") == 1
    changed = tmp_path / "changed.cc"
    changed.write_text(source.replace("return t * (u / 6.0f);", "return t * (u * (1.0f / 6.0f));"))
    assert cpu_kernels.register_library(changed, "changed_") == []

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 12, 12, 16)).astype(np.float32)
    w = rng.normal(size=(3, 3, 1, 16)).astype(np.float32)
    scale, shift = rng.uniform(0.5, 2, 16).astype(np.float32), rng.normal(size=16).astype(np.float32)

    def compiled(activation, prefix):
        fn = jax.jit(lambda x: cpu_kernels.conv_bn_act_forward(x, w, scale, shift, activation, 1, 1, depthwise=True))
        with cpu_kernels.targets_prefixed(prefix) as traced:
            executable = fn.lower(x).compile()
        assert traced == {"resmobile_depthwise_forward_bn_act"}
        assert f'"{prefix}resmobile_depthwise_forward_bn_act"' in executable.as_text()
        return np.asarray(executable(x))

    for activation in ("relu", "hardswish"):  # traced without, with, without the prefix: it is restored after use
        ours, theirs = compiled(activation, ""), compiled(activation, "changed_")
        if activation == "relu":
            np.testing.assert_array_equal(ours, theirs)
        else:
            differing = ours != theirs
            assert 0 < differing.sum() < differing.size
            np.testing.assert_allclose(theirs, ours, rtol=3e-7, atol=1e-7)


# The native build against the same source at AVX2 width (on AVX-512 CPUs) and with the compiler free to fuse
# multiplies and adds on its own (GCC's default): both must change nothing.
OTHER_BUILD_FLAGS = (("-mno-avx512f",) if "avx512f" in cpu_flags() else ()) + ("-ffp-contract=fast",)


@pytest.mark.slow
@pytest.mark.skipif("-ffp-contract=off" not in cpu_kernels.COMPILE_FLAGS,
                    reason="only the x86-64 build turns the compiler's own contraction off")
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_builds_at_other_widths_and_contraction_embed_and_train_bit_identically(variant):
    """Every multiply-add in cpu_kernels.cc is an explicit FMA (its `Fma`) and each output channel's sum is the same
    chain of them whatever the vector width or block of pixels, so nothing may change by one bit against the same
    source built at AVX2 width (on an AVX-512 CPU; the 16-lane paths) and with -ffp-contract=fast (a multiply-add
    written without Fma would be fused there and not in the native build): the whole embedding at 224 px, batch 8
    (every fused eval path: stems, inverted residuals with and without SE, the tail's bottlenecks; every panel width,
    32, 16 and 8 channels and the widths 24, 40, 72, 120, 184, 200 leave; depthwise lines of 7 to 112 pixels, their
    edge pixels in pairs), and a train step's loss and gradient norm at 64 px, batch 8 (the depthwise, dense-conv and
    BatchNorm gradient kernels)."""
    import numpy as np

    from resmobile_jax.bench.ab import eval_call, kernel_calls, train_call

    calls = kernel_calls(eval_call, str(cpu_kernels.SOURCE), variant, 224, 8, compile_flags=OTHER_BUILD_FLAGS)
    other, native = (np.asarray(call()) for call in calls.values())
    assert native.shape == (8, 512) and np.all(np.isfinite(native))
    np.testing.assert_array_equal(native, other, err_msg=f"built with {OTHER_BUILD_FLAGS}")
    calls = kernel_calls(train_call, str(cpu_kernels.SOURCE), variant, 64, 8, compile_flags=OTHER_BUILD_FLAGS)
    other, native = (call() for call in calls.values())
    for key in ("loss", "grad_norm"):
        assert np.isfinite(float(native[key])) and float(native[key]) == float(other[key]), key
