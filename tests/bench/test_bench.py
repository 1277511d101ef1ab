"""python -m resmobile_jax.bench: the speedup convention, the memory meter, the JPEG-folder pipeline, and one tiny
end-to-end run whose JSON records are checked against the Markdown it prints."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resmobile_jax.bench import system
from resmobile_jax.bench.__main__ import record
from resmobile_jax.bench.data_and_search import knn_throughput, pipeline_images_per_second, write_jpeg_folder
from resmobile_jax.bench.system import PeakRSS, cpu_peak_gflops, measured_peak_gflops, usable_cores
from resmobile_jax.data.idx import DatasetError
from resmobile_jax.data.sources import fashion_mnist, folder


def test_speedup_is_how_many_times_better_jax_is():
    assert record("v1", 64, "latency", "ms", 2.0, 5.0)["speedup"] == pytest.approx(2.5)  # lower is better
    assert record("v1", 64, "throughput", "img/s", 300.0, 100.0)["speedup"] == pytest.approx(3.0)
    assert record("v1", 64, "memory", "MB", 400.0, 100.0)["speedup"] == pytest.approx(0.25)
    assert record("v1", 64, "compile", "s", 30.0, None)["speedup"] is None
    r = record("v2", 224, "throughput", "img/s", 50.0, 100.0, 25.0)
    assert r["speedup"] == pytest.approx(0.5) and r["speedup_vs_compile"] == pytest.approx(2.0)


def report_env(**overrides) -> dict:
    """The environment record `bench.markdown` reads, for reports built from hand-made records."""
    return {"command": "python -m resmobile_jax.bench", "device": "cpu", "peak_gflops": None, "peak_gflops_how": "",
            "python": "3.11", "jax": "0", "jaxlib": "0", "flax": "0", "torch": "0", "torch_threads": 2,
            "xla_flags": "", "glibc_tunables": "", "dtype": "float32", "jax_backend": "cpu", "torch_device": "cpu",
            **overrides}


def test_report_warns_when_pytorch_runs_on_other_hardware_than_jax():
    """On a TPU host PyTorch has no CUDA and runs on the host CPU: the report must say the ratios compare different
    hardware; on a CPU-only machine (both on the CPU) it must not."""
    from resmobile_jax.bench.__main__ import markdown

    tpu = markdown(report_env(device="TPU v5 lite (tpu)", dtype="bfloat16", jax_backend="tpu"), [], {})
    cpu = markdown(report_env(dtype="bfloat16"), [], {})
    assert "- PyTorch runs on: cpu -- NOT the device JAX runs on" in tpu
    assert "- PyTorch runs on: cpu\n" in cpu


def test_report_says_whether_training_would_wait_for_the_input_pipeline():
    """Each data source's pipeline rate against JAX's train step at the same image size, per variant: a verdict and
    the headroom; a variant without a train-step row at the JPEG folder's size says so instead of inventing one."""
    from resmobile_jax.bench.__main__ import markdown

    rows = [record("v1", 224, "training throughput, batch 32", "img/s", 40.0, 30.0),
            record("v1", 224, "inference throughput, batch 32", "img/s", 4000.0, 30.0)]  # not a training row
    extras = {"pipeline": {"fashion_mnist": {"size": 32, "batch": 128, "images_per_second": 1000.0},
                           "jpeg_folder": {"size": 224, "batch": 32, "source_pixels": 256, "images_per_second": 30.0}},
              "default_train": {"v1": {"images_per_second": 250.0}, "v2": {"images_per_second": 2000.0}}}
    report = markdown(report_env(), rows, extras)
    assert "| Fashion-MNIST (default run) | 32 | 128 | 1,000 | 250 (v1) | no (4.0x headroom) |" in report
    assert "| Fashion-MNIST (default run) | 32 | 128 | 1,000 | 2,000 (v2) | yes (0.5x headroom) |" in report
    assert "| folder of 256px JPEGs | 224 | 32 | 30.0 | 40.0 (v1) | yes (0.8x headroom) |" in report
    assert "| folder of 256px JPEGs | 224 | 32 | 30.0 | no 224 px training row in this run (v2) | — |" in report


def test_peak_rss_sees_an_allocation_that_is_freed_again():
    with PeakRSS() as mem:
        a = np.ones(300_000_000 // 8)  # 300 MB, touched
        del a
    assert 250 < mem.megabytes < 450


def test_peak_rss_samples_where_the_kernel_peak_cannot_be_reset(monkeypatch):
    monkeypatch.setattr(system, "_reset_peak_rss", lambda: False)
    with PeakRSS() as mem:
        a = np.ones(300_000_000 // 8)
        time.sleep(0.2)  # held long enough for the sampling thread to see it, even on a loaded machine
        del a
    assert mem._thread is not None and 250 < mem.megabytes < 450


def test_cpu_peak_estimate_names_its_inputs():
    peak, how = cpu_peak_gflops()
    assert peak is None or (peak > 1 and "GHz" in how)


CPUINFO = Path(__file__).parents[1] / "fixtures" / "cpuinfo_epyc_zen4.txt"  # the first CPU of a 2-core Zen 4 VM


def _cpuinfo(family: str, flags: str, vendor: str) -> str:
    """That real /proc/cpuinfo text as another CPU would print it: vendor, family and flags replaced."""
    text = CPUINFO.read_text()
    for key, value in (("vendor_id", vendor), ("cpu family", family), ("flags", flags)):
        text = re.sub(rf"^{key}\s*:.*$", f"{key}\t: {value}", text, count=1, flags=re.M)
    return text


@pytest.mark.parametrize("family, flags, vendor, per_cycle", [
    ("25", "avx2 fma avx512f avx512bw", "AuthenticAMD", 32),  # Zen 4: AVX-512 on 256-bit FMA units
    ("26", "avx2 fma avx512f avx512bw", "AuthenticAMD", 64),  # Zen 5: 512-bit units
    ("6", "avx2 fma avx512f", "GenuineIntel", 64),
    ("23", "avx2 fma", "AuthenticAMD", 32),  # the AVX2 EPYC
    ("6", "sse4_2", "GenuineIntel", 8),
])
def test_cpu_peak_estimate_knows_each_cpus_fma_width(family, flags, vendor, per_cycle):
    info = _cpuinfo(family, flags, vendor)
    assert f"cpu family\t: {family}\n" in info and info.count("\n") == CPUINFO.read_text().count("\n")
    peak, how = cpu_peak_gflops(info)
    assert f"x {per_cycle} FLOP/cycle" in how
    assert peak == pytest.approx(usable_cores() * 2.59613 * per_cycle)


def test_step_megabytes_counts_a_donated_buffer_once():
    import jax
    import jax.numpy as jnp

    from resmobile_jax.bench.jax_side import step_megabytes

    x, y = jnp.ones((1000, 1000)), jnp.ones((1000, 1000))  # 4 MB each
    donated = jax.jit(lambda x, y: x * 2 + y, donate_argnums=0).lower(x, y).compile()
    kept = jax.jit(lambda x, y: x * 2 + y).lower(x, y).compile()
    assert step_megabytes(donated) == pytest.approx(8.0, rel=0.01)  # the output lives in x's buffer
    assert step_megabytes(kept) == pytest.approx(12.0, rel=0.01)


def test_measured_peak_bounds_a_real_matmul():
    """The FMA loop's figure is a ceiling: numpy's BLAS matmul on all cores (an independent measurement) cannot beat
    it, and reaches a fair part of it (a loop the compiler had folded into adds, or that ran on one core, would be
    off by 2x or more)."""
    peak, how = measured_peak_gflops(seconds=0.2)
    if peak is None:
        pytest.skip(how)
    assert f"on {usable_cores()} cores" in how
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a  # warm-up: BLAS threads started
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ a
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t) / 1e9)
    assert 0.2 * peak < best < 1.1 * peak, (best, peak, how)


def test_pipeline_reads_a_folder_of_real_jpegs(tmp_path):
    train = fashion_mnist("train")
    root = write_jpeg_folder(tmp_path, train.subset(np.arange(200)), per_class=3, size=48)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 30
    with Image.open(files[0]) as im:
        assert im.format == "JPEG" and im.size == (48, 48) and im.mode == "RGB"
    images, bad = folder(root)
    assert len(images) == 30 and not bad and images.num_classes == 10
    assert pipeline_images_per_second(images, 32, 8, steps=2) > 0


def test_knn_throughput_extrapolates_to_the_whole_gallery():
    r = knn_throughput(3000, 500, dim=16)
    assert r["queries_per_second"] == pytest.approx(500 / r["seconds"])
    assert r["all_vs_all_seconds"] == pytest.approx(6 * r["seconds"])


def test_a_stage_that_fails_leaves_the_earlier_measurements_on_disk_marked_incomplete(tmp_path):
    """The bench saves after every stage: a partial save is a valid report and JSON that say the run is incomplete;
    the final save says nothing of the kind."""
    from resmobile_jax.bench.__main__ import save

    rows = [record("v1", 64, "inference latency, batch 1 (median)", "ms", 2.0, 6.0)]
    out, js = tmp_path / "r" / "b.md", tmp_path / "r" / "b.json"
    save(str(out), str(js), report_env(), rows, {}, {}, complete=False)
    assert "**incomplete run**" in out.read_text() and "| v1 | 64 | inference latency, batch 1 (median) | ms |" in out.read_text()
    data = json.loads(js.read_text())
    assert data["environment"]["complete"] is False and data["records"] == rows
    report = save(str(out), "", report_env(), rows, {}, {}, complete=True)
    assert report == out.read_text() and "incomplete" not in report


def test_missing_default_data_is_named_before_the_bench_starts(monkeypatch):
    """Without Fashion-MNIST the input-pipeline stage cannot run: the bench fails at its start (not after minutes of
    model timing) with the install command and the flag that skips that stage."""
    from resmobile_jax.bench import data_and_search
    from resmobile_jax.data import sources

    def tfds_has_none(*args, **kwargs):
        raise DatasetError("TFDS could not prepare 'fashion_mnist' (offline)")

    monkeypatch.setattr(sources, "DEBIAN_DIR", "/nonexistent/fashion-mnist")
    monkeypatch.setattr(sources, "tfds_split", tfds_has_none)
    with pytest.raises(DatasetError, match=r"apt-get install dataset-fashion-mnist.*--pipeline=false"):
        data_and_search.default_train_images()


def run_bench(tmp_path, *flags: str) -> tuple[dict, str]:
    """`python -m resmobile_jax.bench` on V1 at 32 px without the pipeline measurement: (its JSON, its Markdown)."""
    out = subprocess.run([sys.executable, "-m", "resmobile_jax.bench", "--variants", "v1", "--sizes", "32", "--nopipeline",
                          *flags, "--json", str(tmp_path / "b.json"), "--out", str(tmp_path / "b.md")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "b.json").read_text()), (tmp_path / "b.md").read_text()


@pytest.mark.slow
def test_bench_command_end_to_end(tmp_path):
    """V1 at 32 px, short budgets: both frameworks measured in alternation, every record consistent with the Markdown
    table."""
    data, md = run_bench(tmp_path, "--budget", "0.2", "--batch", "8", "--train_batch", "8", "--knn_gallery", "2000",
                         "--knn_queries", "500")
    rows = {r["measurement"]: r for r in data["records"]}
    lat, train = rows["inference latency, batch 1 (median)"], rows["training throughput, batch 8"]
    assert lat["jax"] > 0 and lat["pytorch"] > 0 and lat["speedup"] == pytest.approx(lat["pytorch"] / lat["jax"])
    assert train["speedup"] == pytest.approx(train["jax"] / train["pytorch"])
    detail = data["details"]["v1_32"]
    assert detail["train"]["jax"]["finite_loss"] and detail["train"]["pytorch"]["finite_loss"]
    for key in ("batch_1", "batch_8", "train"):  # interleaved: the same number of timed calls for both, 2 passes
        assert detail[key]["jax"]["repeats"] == detail[key]["pytorch"]["repeats"] >= 6
    per_pass = train["speedup_per_pass"]  # each pass's own ratio; the pooled one lies within their range (medians)
    assert len(per_pass) == 2 and per_pass == detail["speedup_per_pass"]["train"]
    assert min(per_pass) * 0.8 <= train["speedup"] <= max(per_pass) * 1.25
    assert f"{train['speedup']:.2f}x ({min(per_pass):.2f}-{max(per_pass):.2f}) |" in md
    assert f"| v1 | 32 | training throughput, batch 8 | img/s | {train['jax']:.1f}" in md or \
        f"| v1 | 32 | training throughput, batch 8 | img/s | {train['jax']:,.0f}" in md
    assert "2,000 x 512 gallery" in md and data["environment"]["jax"] in md and data["environment"]["complete"]
    memory = rows["device memory, training (JAX: the step's XLA buffer assignment; PyTorch: CUDA peak)"]
    # 3.1M parameters, their AdamW moments and EMA (~50 MB in float32) plus activations; no CUDA, no PyTorch figure
    assert 50 < memory["jax"] < 2000 and memory["pytorch"] is None
    peak = data["environment"]["measured_peak_gflops"]
    if peak is not None:  # the machine line and the share of each achieved-GFLOP/s row, from the same records
        share = rows["achieved GFLOP/s, training"]["jax"] / peak
        # (under 100 the report keeps a decimal: a busy machine, e.g. another test worker, measures ~100 on 2 cores)
        shown = re.search(r"peak ([\d,.]+) GFLOP/s measured", md)
        assert shown and float(shown.group(1).replace(",", "")) == pytest.approx(peak, abs=0.51)
        assert f"32 px training {100 * share:.0f}% /" in md


@pytest.mark.slow
def test_bench_runs_in_bfloat16_as_on_an_accelerator(tmp_path):
    """bfloat16 is the bench's default on GPU/TPU (JAX model dtype, PyTorch under autocast). Run on CPU here, so a
    rare accelerator session does not find that path broken: both frameworks train with a finite loss and the
    report states the dtype."""
    data, md = run_bench(tmp_path, "--budget", "0.1", "--batch", "4", "--train_batch", "4", "--knn_gallery", "0",
                         "--dtype", "bfloat16")
    assert data["environment"]["dtype"] == "bfloat16"
    train = data["details"]["v1_32"]["train"]
    assert train["jax"]["finite_loss"] and train["pytorch"]["finite_loss"]
    assert "- compute dtype: bfloat16 (JAX: the model's dtype; PyTorch: under torch.autocast)" in md


def test_depthwise_gradient_rewrites_equal_autodiff():
    """The rewrites the depthwise-gradient benchmark times compute autodiff's gradient (stride 1 and 2, k 3 and 5)."""
    from resmobile_jax.bench.depthwise_grad import REWRITES, format_table, measure

    records = measure(2, layers=((9, 8, 3, 1), (8, 4, 5, 2)), budget_seconds=0.05)
    for r in records:
        for name in REWRITES:
            assert r[f"{name}_rel_err"] < 1e-5, (r["layer"], name)
            assert r[f"{name}_ms"] > 0
    assert format_table(records).count("\n") == 3


def test_op_table_reads_the_ops_of_a_real_trace(tmp_path):
    """A traced program with one big op (sin over 16M values, then summed) and one cheap elementwise op: the big
    op is found, takes milliseconds per call, and tops the table. Not a matmul: with the XLA flags every command and
    the test suite set (cli.XLA_CPU_FLAGS), XLA's matmuls finish on the thread pool untraced."""
    import jax
    import jax.numpy as jnp

    from resmobile_jax.bench import trace_ops

    @jax.jit
    def program(a, c):
        return jnp.sum(jnp.sin(a)), c + 1.0

    a = jnp.ones((4096, 4096))
    c = jnp.ones((8,))
    jax.block_until_ready(program(a, c))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(program(a, c))
    times = trace_ops.op_times(str(tmp_path), steps=2)
    big = [ms for name, ms in times.items() if "sin" in name or "fusion" in name]  # XLA names it wrapped_sine
    assert big and max(big) > 1.0  # 16M sines take milliseconds on any CPU
    assert max(big) == max(times.values())
    table = trace_ops.op_table(str(tmp_path), steps=2)
    assert "| op kind | ms | share |" in table and "ms in all" in table
    with pytest.raises(FileNotFoundError, match="no .*xplane.pb trace"):
        trace_ops.op_times(str(tmp_path / "empty"), steps=1)


def test_interleaved_timing_alternates_the_calls_and_the_ab_report_gives_their_ratio():
    from resmobile_jax.bench.ab import parse_settings, parse_value, report
    from resmobile_jax.timing import interleaved_times, interleaved_timing

    order = []
    calls = {"A": lambda: order.append("A"), "B": lambda: order.append("B")}
    times = interleaved_times(calls, min_rounds=3, max_rounds=3, per_round=2, warmup=1)
    assert order == ["A", "B"] + ["A", "A", "B", "B", "B", "B", "A", "A", "A", "A", "B", "B"]  # warm-up, then alternating
    assert len(times["A"]) == len(times["B"]) == 6
    order.clear()
    interleaved_times(calls, min_rounds=2, max_rounds=2, per_round=2, warmup=0, untimed_per_round=1)
    assert order == ["A"] * 3 + ["B"] * 6 + ["A"] * 3  # each block starts with an untimed call
    # with a budget: rounds go on until it is spent, the same count for every call
    slow = {"A": lambda: time.sleep(0.01), "B": lambda: time.sleep(0.02)}
    stats = interleaved_timing(slow, min_rounds=2, max_rounds=100, budget_seconds=0.3, warmup=0)
    assert 2 <= stats["A"]["repeats"] == stats["B"]["repeats"] < 20
    assert stats["B"]["median_ms"] > stats["A"]["median_ms"] >= 10.0
    table = report("opt", {"A": [2.0, 2.0], "B": [1.0, 1.0]}, "title")
    assert "| B | 1.00 | 1.00-1.00 | 2 | 0.500x |" in table
    assert parse_value("True") is True and parse_value("shifted") == "shifted" and parse_value("3") == 3
    assert parse_settings(["fuse_eval_bn=False", " depthwise_impl = shifted"]) == {"fuse_eval_bn": False,
                                                                                  "depthwise_impl": "shifted"}
    with pytest.raises(ValueError, match="key=value items, got 'fuse_eval_bn'"):
        parse_settings(["fuse_eval_bn"])


def test_op_table_names_the_cpp_kernels_of_a_real_trace(tmp_path):
    """A traced program calling the depthwise C++ kernel: the trace names the op ffi_call.N, the compiled HLO says
    which kernel it is, and the table groups and labels it by that name."""
    import jax
    import jax.numpy as jnp

    from resmobile_jax.bench import trace_ops
    from resmobile_jax.models.kernels import cpu_kernels

    x, w = jnp.ones((8, 64, 64, 32)), jnp.ones((3, 3, 1, 32))
    compiled = jax.jit(lambda x, w: cpu_kernels.depthwise_conv(x, w, 1, 1)).lower(x, w).compile()
    targets = trace_ops.custom_call_targets(compiled.as_text())
    assert set(targets.values()) == {"resmobile_depthwise_forward"} and all(n.startswith("ffi_call") for n in targets)
    jax.block_until_ready(compiled(x, w))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(compiled(x, w))
    assert set(targets) <= set(trace_ops.op_times(str(tmp_path), steps=2))  # the same names in the trace
    table = trace_ops.op_table(str(tmp_path), steps=2, targets=targets)
    name = next(iter(targets))
    assert "| resmobile_depthwise_forward | " in table and f"| {name} (resmobile_depthwise_forward) | " in table


def test_ab_command_end_to_end():
    """Two depthwise implementations of V1 at 32 px: both compiled and timed in one process; a key config.model
    does not have is refused by name."""
    cmd = [sys.executable, "-m", "resmobile_jax.bench.ab", "--option", "depthwise_impl", "--values", "shifted,cpu_kernel",
           "--variant", "v1", "--size", "32", "--batch", "2", "--rounds", "2", "--calls", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| shifted |" in out.stdout and "| cpu_kernel |" in out.stdout and "1.000x" in out.stdout
    bad = subprocess.run(cmd[:4] + ["fuse_bn"] + cmd[5:], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "unknown model option 'fuse_bn'" in bad.stderr


def test_ab_command_compares_two_versions_of_the_kernels(tmp_path):
    """--kernels with a copy of this checkout's cpu_kernels.cc: both programs run (the copy's targets under other
    names) and give the same embeddings bit for bit; a spec that is neither a file nor a revision is refused."""
    from resmobile_jax.models.kernels import cpu_kernels

    copy = tmp_path / "copy.cc"
    copy.write_bytes(cpu_kernels.SOURCE.read_bytes())
    cmd = [sys.executable, "-m", "resmobile_jax.bench.ab", "--kernels", str(copy), "--variant", "v1", "--size", "32",
           "--batch", "2", "--rounds", "2", "--calls", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"| {copy} | " in out.stdout and "| this checkout | " in out.stdout
    assert "| output | 1024 | 0 | 0 | 0 |" in out.stdout  # 2 images x 512 dimensions, all equal
    bad = subprocess.run(cmd[:4] + ["no-such-revision"] + cmd[5:], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "'no-such-revision' is neither a file nor a git revision" in bad.stderr


@pytest.mark.slow
def test_ab_command_names_kernels_that_take_other_arguments(tmp_path):
    """A version whose dense conv + BN handlers call an attribute "strides" (this checkout passes "stride") builds,
    then fails on the first call with a message that says why."""
    from resmobile_jax.models.kernels import cpu_kernels

    source = cpu_kernels.SOURCE.read_text()
    old = '.Attr<int64_t>("stride")\n      .Attr<int64_t>("padding")\n      .Attr<int64_t>("activation");'
    assert source.count(old) == 1
    changed = tmp_path / "renamed.cc"
    changed.write_text(source.replace(old, old.replace('"stride"', '"strides"')))
    cmd = [sys.executable, "-m", "resmobile_jax.bench.ab", "--kernels", str(changed), "--variant", "v1", "--size", "32",
           "--batch", "2", "--rounds", "1", "--calls", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "kernels failed on this checkout's calls; the two versions must take the same buffers and attributes" in out.stderr
    assert "stride vs strides" in out.stderr  # XLA's own diagnosis, passed on


@pytest.mark.slow
def test_ab_command_names_kernels_the_other_version_lacks(tmp_path):
    """A version without the bottleneck kernel (its handler exported under another name): at 8 images the model
    calls that kernel, and the command says so and how to keep the model off it; with that setting both run."""
    from resmobile_jax.models.kernels import cpu_kernels

    source = cpu_kernels.SOURCE.read_text()
    old = "XLA_FFI_DEFINE_HANDLER_SYMBOL(ResmobileBottleneckForward,"
    assert source.count(old) == 1
    changed = tmp_path / "older.cc"
    changed.write_text(source.replace(old, "XLA_FFI_DEFINE_HANDLER_SYMBOL(SomethingElse,"))
    cmd = [sys.executable, "-m", "resmobile_jax.bench.ab", "--kernels", str(changed), "--variant", "v1", "--size", "64",
           "--batch", "8", "--rounds", "1", "--calls", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "has no resmobile_bottleneck_forward, which this checkout's model calls" in out.stderr
    assert "--set (fuse_eval_bottleneck=False" in out.stderr
    out = subprocess.run(cmd + ["--set", "fuse_eval_bottleneck=False"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| output | 4096 | 0 | 0 | 0 |" in out.stdout  # 8 x 512, the same kernels otherwise: bit for bit


def test_kernel_source_reads_a_file_or_a_revision_of_the_repository(tmp_path):
    """A real git repository: the revision's cpu_kernels.cc, not the working tree's."""
    from resmobile_jax.bench.ab import KERNEL_SOURCE, kernel_source

    repo = tmp_path / "repo"
    (repo / KERNEL_SOURCE).parent.mkdir(parents=True)
    (repo / KERNEL_SOURCE).write_text("// committed\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    (repo / KERNEL_SOURCE).write_text("// edited\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    assert kernel_source("HEAD", workdir, repo).read_text() == "// committed\n"
    assert kernel_source(str(repo / KERNEL_SOURCE), workdir, repo).read_text() == "// edited\n"
    with pytest.raises(ValueError, match="'HEAD~3' is neither a file nor a git revision"):
        kernel_source("HEAD~3", workdir, repo)


def test_compare_outputs_counts_differences_in_ulps_of_the_largest_value():
    """Hand-worked: 0.5 + 2^-23 differs from 0.5 by 2^-23, one ulp of the largest |value| 1.0 (two of 0.5's)."""
    from resmobile_jax.bench.ab import compare_outputs

    a = {"x": np.array([1.0, 0.5, -0.25], np.float32), "y": np.array(2.0, np.float32)}
    b = {"x": np.array([1.0, 0.5 + 2.0**-23, -0.25], np.float32), "y": np.array(2.0, np.float32)}
    table = compare_outputs(a, b, names=("A", "B"))
    assert "B against A" in table
    assert "| ['x'] | 3 | 1 | 1.19e-07 | 1 |" in table and "| ['y'] | 1 | 0 | 0 | 0 |" in table
    with pytest.raises(ValueError, match="shapes differ"):
        compare_outputs(a, {"x": a["x"][:2], "y": a["y"]}, names=("A", "B"))


def _table_rows(text: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


@pytest.mark.slow
def test_breakdown_command_in_both_modes(tmp_path):
    """Eval mode block by block (the same names index the Flax model and the PyTorch reference), with a ratio per
    row that is its two times' quotient, and a trace of embed calls whose op table names the C++ kernels; train
    mode part by part."""
    units = ["stem", *[f"mid.{i}" for i in range(15)], *[f"tail.{i}" for i in range(6)], "head"]
    base = [sys.executable, "-m", "resmobile_jax.bench.breakdown", "--variant", "v1", "--size", "32", "--batch", "2",
            "--budget", "0.05"]
    out = subprocess.run(base + ["--mode", "eval", "--blocks", "--trace_dir", str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"trace written to {tmp_path}" in out.stdout and "| resmobile_depthwise_forward_bn_act | " in out.stdout
    rows = _table_rows(out.stdout.split("trace written to")[0])
    assert [name for name in rows if name not in ("part", "---")] == [*units, "total"]
    for name in units:
        jax_ms, torch_ms, ratio = float(rows[name][0]), float(rows[name][1]), float(rows[name][2].rstrip("x"))
        assert jax_ms > 0 and torch_ms > 0 and ratio == pytest.approx(torch_ms / jax_ms, rel=0.1, abs=0.02)
    out = subprocess.run(base + ["--impls", "auto"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = _table_rows(out.stdout)
    assert {"stem", "mid", "tail", "head", "total"} <= set(rows) and len(rows["mid"]) == 4  # JAX and PyTorch, fwd and fwd+bwd


def test_trace_coverage_counts_overlapping_ops_once(tmp_path):
    """The step span and the time inside op events, from a real trace: covered never exceeds the span, and the
    table names both."""
    import jax
    import jax.numpy as jnp

    from resmobile_jax.bench import trace_ops

    program = jax.jit(lambda a: jnp.tanh(a @ a).sum())
    a = jnp.ones((512, 512))
    jax.block_until_ready(program(a))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(3):
            jax.block_until_ready(program(a))
    wall, covered = trace_ops.coverage(str(tmp_path), steps=3)
    assert 0 < covered <= wall
    assert f"Step span {wall:.0f} ms" in trace_ops.op_table(str(tmp_path), steps=3)


def test_depthwise_layers_follow_the_network_and_time_both_frameworks():
    """The layer list is the network's (MobileNetV3-Large's table after each stem), and a tiny run times every layer
    in both frameworks."""
    from resmobile_jax.bench.depthwise_layers import format_table, layer_shapes, measure

    v1 = layer_shapes("v1", 224)
    assert v1[:4] == [(112, 16, 3, 1), (112, 64, 3, 2), (56, 72, 3, 1), (56, 72, 5, 2)] and v1[-1] == (7, 960, 5, 1)
    v2 = layer_shapes("v2", 224)
    assert v2[:3] == [(56, 16, 3, 1), (56, 64, 3, 1), (56, 72, 3, 1)] and len(v1) == len(v2) == 15
    records = measure("v1", 32, 1, budget=0.01)
    assert len(records) == 15 and all(r[k] > 0 for r in records for k in r if k.endswith("_ms"))
    assert format_table(records).count("\n") == 15 + 2  # header, rule, 15 layers, total


def test_batch_norm_layers_follow_the_network_and_time_three_forms():
    """Every BatchNorm of the stem and the inverted residuals (V1: 1 + 15 blocks' 44, identical neighbours merged),
    and a tiny run times each in XLA's form, the C++ kernels and PyTorch."""
    from resmobile_jax.bench.batch_norm_layers import bn_maps, format_table, measure

    v1 = bn_maps("v1", 224)
    assert v1[:4] == [(112, 16, "hardswish", 1e-3, 1), (112, 16, "relu", 1e-3, 1), (112, 16, "identity", 1e-3, 1),
                      (112, 64, "relu", 1e-3, 1)]
    assert sum(m[-1] for m in v1) == 1 + 15 * 3 - 1  # block 1 has no expansion
    assert bn_maps("v2", 224)[0] == (112, 64, "relu", 1e-5, 1)
    records = measure("v1", 32, 2, budget=0.01)  # batch 2: torch refuses batch statistics of one value
    assert len(records) == len(bn_maps("v1", 32))
    assert all(r[k] > 0 for r in records for k in r if k.endswith("_ms"))
    assert format_table(records).count("\n") == len(records) + 2  # header, rule, maps, total
