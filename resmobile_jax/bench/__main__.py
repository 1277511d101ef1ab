"""python -m resmobile_jax.bench: JAX vs the PyTorch reference model, side by side in one process on the same inputs.

    python -m resmobile_jax.bench [--variants v1,v2] [--sizes 64,224] [--batch 32] [--train_batch 32] [--passes 2]
                                  [--torch_compile] [--json FILE] [--out FILE.md]

For each variant and image size: batch-1 latency, batch throughput, train-step images/s, compile times, peak memory
and achieved FLOP/s, for this project's JAX model and for the torchvision-built reference (eager, channels_last; and
torch.compile with --torch_compile), their calls interleaved, in --passes timing passes over all of them (every model
is set up first, so that a slow phase of a shared machine lands in one pass). Then the input pipeline alone (is training input-bound at the default settings?)
and exact kNN over a 100k gallery. Prints a Markdown report; --json writes one record per (variant, size, measurement)
with `speedup` = how many times faster JAX is (above 1: JAX wins).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from absl import flags

from resmobile_jax import cli
from resmobile_jax.models.layers import DEPTHWISE_IMPLS

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["v1", "v2"], "model variants")
flags.DEFINE_list("sizes", ["64", "224"], "square input sizes")
flags.DEFINE_integer("batch", 32, "batch size of the inference-throughput measurement")
flags.DEFINE_integer("train_batch", 32, "batch size of the train-step measurement")
flags.DEFINE_float("budget", 8.0, "seconds of repeated calls per framework and timed measurement (after warm-up), "
                   "split over the passes")
flags.DEFINE_integer("passes", 2, "timing passes over all variants and sizes, spread over the run; each figure pools "
                     "its calls from all passes, and the report shows the passes' own speedups beside it", lower_bound=1)
flags.DEFINE_string("dtype", "", "compute dtype of both frameworks: float32 | bfloat16 (default: float32 on CPU, "
                    "bfloat16 on accelerators, where PyTorch runs under autocast)")
flags.DEFINE_enum("depthwise_impl", "auto", list(DEPTHWISE_IMPLS), "the JAX model's depthwise convolution")
flags.DEFINE_bool("torch_compile", False, "also time torch.compile'd PyTorch (compiles take minutes on a small CPU)")
flags.DEFINE_bool("pipeline", True, "measure the input pipeline and the train step at the default run's settings")
flags.DEFINE_integer("knn_gallery", 100_000, "gallery size of the kNN measurement (0: skip)")
flags.DEFINE_integer("knn_queries", 4096, "queries timed against that gallery (the all-vs-all time is extrapolated)")
flags.DEFINE_string("json", "", "write the records here")
flags.DEFINE_string("out", "", "write the Markdown report here")

LOWER_IS_BETTER = {"ms", "s", "MB"}


def record(variant, size, measurement, unit, jax_value, torch_value, compiled_value=None) -> dict:
    def ratio(t):
        if t is None or jax_value is None or not jax_value or not t:
            return None
        return t / jax_value if unit in LOWER_IS_BETTER else jax_value / t

    return {"variant": variant, "image_size": size, "measurement": measurement, "unit": unit, "jax": jax_value,
            "pytorch": torch_value, "speedup": ratio(torch_value), "pytorch_compile": compiled_value,
            "speedup_vs_compile": ratio(compiled_value)}


def set_up_model(variant: str, size: int, dtype: str) -> dict:
    """Both frameworks' inference calls (batch 1 and --batch) and train call for one variant and size, compiled and
    run once: compile and first-call times, the peak RSS growth of the training setup, device memory; and the
    model's MACs per image."""
    from resmobile_jax.bench import jax_side, torch_side
    from resmobile_jax.bench.system import PeakRSS
    from resmobile_jax.profile import profile_model

    config = jax_side.bench_config(variant, size, dtype, FLAGS.depthwise_impl)
    b, tb = FLAGS.batch, FLAGS.train_batch
    inference, train, rss, device_mb, first_seconds = {}, {}, {}, {}, {}

    def set_up(name, make_inference, make_train):
        """Inference calls, then the train call with the peak RSS growth of its setup, compile and one step, and its
        device memory (JAX: XLA's buffer assignment of the step; PyTorch: CUDA's peak, None on CPU)."""
        inference[name] = make_inference()
        with PeakRSS() as mem:
            train[name], first_seconds[name], device_mb[name] = make_train()
            train[name]()
        rss[name] = mem.megabytes

    print(f"[{variant} {size}px] JAX: compiling ...", flush=True)
    set_up("jax", lambda: jax_side.inference_calls(config, (1, b)), lambda: jax_side.train_step_call(config, tb))
    print(f"[{variant} {size}px] PyTorch eager: first calls ...", flush=True)
    set_up("pytorch", lambda: torch_side.inference_calls(variant, size, (1, b), dtype),
           lambda: torch_side.train_call(variant, size, tb, config, dtype))
    if FLAGS.torch_compile:
        print(f"[{variant} {size}px] torch.compile: compiling ...", flush=True)
        _try(lambda: set_up("torch_compile",
                            lambda: torch_side.inference_calls(variant, size, (1, b), dtype, compile_model=True),
                            lambda: torch_side.train_call(variant, size, tb, config, dtype, compile_model=True)))
    macs = profile_model(config.model.to_dict(), size, xla_flops=False, checkpoint_size=False)["total"]["macs"]
    return {"variant": variant, "size": size, "inference": inference, "train": train, "rss": rss, "macs": macs,
            "device_mb": device_mb, "first_seconds": first_seconds, "frameworks": list(rss)}  # torch_compile if set up


def time_model(model: dict, budget_seconds: float) -> dict[str, dict[str, list[float]]]:
    """{measurement: {framework: call times in ms}}: each measurement with the frameworks' calls interleaved
    (timing.interleaved_times; inference in blocks whose first call is untimed: warm caches, as repeated calls have
    them), `budget_seconds` per framework and measurement."""
    from resmobile_jax.timing import interleaved_times

    frameworks, inference, b = model["frameworks"], model["inference"], FLAGS.batch
    print(f"[{model['variant']} {model['size']}px] timing {', '.join(frameworks)}, interleaved ...", flush=True)
    budget = budget_seconds * len(frameworks)
    times = {f"batch_{bs}": interleaved_times({n: inference[n][bs][0] for n in frameworks}, min_rounds=3,
                                              max_rounds=20, budget_seconds=budget, per_round=5 if bs == 1 else 3,
                                              untimed_per_round=1)
             for bs in (1, b)}
    times["train"] = interleaved_times({n: model["train"][n] for n in frameworks}, min_rounds=3, max_rounds=30,
                                       budget_seconds=budget)
    return times


def model_rows(model: dict, passes: list[dict]) -> tuple[list[dict], dict]:
    """The records of one variant and size from the timing passes (time_model's), each framework's calls of all
    passes pooled into one median; the details keep each pass's JAX / PyTorch speedup, the spread between passes."""
    from resmobile_jax.bench import torch_side
    from resmobile_jax.timing import per_image, summary

    variant, size, frameworks = model["variant"], model["size"], model["frameworks"]
    b, tb = FLAGS.batch, FLAGS.train_batch
    pooled = {key: {n: [t for p in passes for t in p[key][n]] for n in frameworks} for key in passes[0]}
    timed = {}
    for bs in (1, b):
        key = f"batch_{bs}"
        timed[key] = {n: per_image({"first_call_seconds": model["inference"][n][bs][1], **summary(pooled[key][n])}, bs)
                      for n in frameworks}
    timed["train"] = {n: {**per_image(summary(pooled["train"][n]), tb), "first_call_seconds": model["first_seconds"][n],
                          "peak_rss_mb": model["rss"][n], "device_mb": model["device_mb"][n]} for n in frameworks}
    timed["train"]["jax"]["finite_loss"] = bool(np.isfinite(float(model["train"]["jax"]()["loss"])))
    timed["train"]["pytorch"]["finite_loss"] = torch_side.loss_is_finite(model["train"]["pytorch"]())
    timed["speedup_per_pass"] = {key: [float(np.median(p[key]["pytorch"]) / np.median(p[key]["jax"])) for p in passes]
                                 for key in passes[0]}
    macs = model["macs"]
    gflop_inf, gflop_train = 2 * macs / 1e9, 6 * macs / 1e9  # per image; backward ~2x forward

    def values(key, field, scale=1.0):
        """(JAX, PyTorch eager, torch.compile or None) of one field."""
        got = [timed[key].get(n, {}).get(field) for n in ("jax", "pytorch", "torch_compile")]
        return [None if v is None else v * scale for v in got]

    bk = f"batch_{b}"
    train_compile, inference_compile = values("train", "first_call_seconds"), values("batch_1", "first_call_seconds")
    rows = [
        record(variant, size, "inference latency, batch 1 (median)", "ms", *values("batch_1", "median_ms")),
        record(variant, size, f"inference throughput, batch {b}", "img/s", *values(bk, "images_per_second")),
        record(variant, size, f"training throughput, batch {tb}", "img/s", *values("train", "images_per_second")),
        record(variant, size, "train step compile", "s", train_compile[0], None, train_compile[2]),
        record(variant, size, "inference compile, batch 1", "s", inference_compile[0], None, inference_compile[2]),
        record(variant, size, "peak RSS growth, training (setup, compile, first step)", "MB", *values("train", "peak_rss_mb")),
        record(variant, size, "device memory, training (JAX: the step's XLA buffer assignment; PyTorch: CUDA peak)",
               "MB", *values("train", "device_mb")),
        record(variant, size, f"achieved GFLOP/s, inference batch {b}", "GFLOP/s",
               *values(bk, "images_per_second", gflop_inf)[:2], None),
        record(variant, size, "achieved GFLOP/s, training", "GFLOP/s", *values("train", "images_per_second", gflop_train)[:2],
               None),
    ]
    for r, key in zip(rows[:3], ("batch_1", bk, "train")):
        r["speedup_per_pass"] = timed["speedup_per_pass"][key]
    return rows, {**timed, "macs_per_image": macs}


def _try(fn):
    try:
        return fn()
    except Exception as e:  # torch.compile needs a working C++ toolchain and may not support every op
        print(f"  torch.compile failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def environment() -> dict:
    import flax
    import jax
    import jaxlib
    import torch

    from resmobile_jax.bench.system import cpu_peak_gflops, measured_peak_gflops
    from resmobile_jax.bench.torch_side import torch_device_description
    from resmobile_jax.timing import device_description

    on_cpu = jax.default_backend() == "cpu"
    peak, how = cpu_peak_gflops() if on_cpu else (None, "see the accelerator's data sheet")
    measured, measured_how = measured_peak_gflops() if on_cpu else (None, "not measured on accelerators")
    return {"device": device_description(), "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "flax": flax.__version__, "torch": torch.__version__,
            "torch_device": torch_device_description(), "jax_backend": jax.default_backend(),
            "torch_threads": torch.get_num_threads(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "peak_gflops": peak, "peak_gflops_how": how, "measured_peak_gflops": measured,
            "measured_peak_gflops_how": measured_how, "command": "python -m resmobile_jax.bench " + " ".join(sys.argv[1:])}


def _fmt(x, unit=None) -> str:
    if x is None:
        return "—"
    if unit == "ms":
        return f"{x:.2f}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}"


def _pipeline_row(data: str, p: dict, variant: str, train_images_per_second: float | None) -> str:
    """One row of the input-pipeline table: the pipeline alone against JAX's train step at the same image size."""
    head = f"| {data} | {p['size']} | {p['batch']} | {_fmt(p['images_per_second'])} | "
    if train_images_per_second is None:
        return head + f"no {p['size']} px training row in this run ({variant}) | — |"
    headroom = p["images_per_second"] / train_images_per_second
    return head + (f"{_fmt(train_images_per_second)} ({variant}) | {'yes' if headroom < 1 else 'no'} "
                   f"({headroom:.1f}x headroom) |")


def markdown(env: dict, rows: list[dict], extras: dict) -> str:
    compiled = any(r["pytorch_compile"] is not None for r in rows)
    head = "| variant | size | measurement | unit | JAX | PyTorch eager | speedup |" + (
        " torch.compile | speedup vs compile |" if compiled else "")
    lines = [
        "# JAX vs PyTorch reference — `python -m resmobile_jax.bench`", "",
        f"- command: `{env['command']}`",
        *([] if env.get("complete", True) else ["- **incomplete run**: the measurements made before the run stopped"]),
        f"- machine: {env['device']}; peak {_fmt(env.get('measured_peak_gflops'))} GFLOP/s measured "
        f"({env.get('measured_peak_gflops_how', 'not measured')}), nominal {_fmt(env['peak_gflops'])} "
        f"({env['peak_gflops_how']})",
        f"- versions: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}, "
        f"torch {env['torch']} ({env['torch_threads']} threads); XLA_FLAGS='{env['xla_flags']}'",
        f"- PyTorch runs on: {env.get('torch_device', 'cpu')}"
        + (" -- NOT the device JAX runs on (no CUDA for PyTorch here, e.g. a TPU host): the ratios compare different "
           "hardware" if env.get("jax_backend", "cpu") != "cpu" and env.get("torch_device", "cpu") == "cpu" else ""),
        f"- compute dtype: {env.get('dtype', 'float32')}"
        + (" (JAX: the model's dtype; PyTorch: under torch.autocast)" if env.get("dtype") == "bfloat16" else ""),
        f"- malloc (the same for both frameworks, one process): GLIBC_TUNABLES='{env['glibc_tunables']}'",
        "- speedup = how many times faster (or smaller) JAX is; above 1 means JAX wins. Medians of repeated calls "
        "after warm-up, the frameworks' calls interleaved (JAX, PyTorch, then PyTorch, JAX, ...) so that the "
        "machine's drift hits both alike; both get the same uint8 images and normalize them inside the timed call."
        + (f" Timed in {env['passes']} passes over all variants and sizes, spread over the run; each figure pools "
           "the calls of all passes, and (a-b) after a speedup is the range of the passes' own speedups (each "
           "pass's medians): what a phase of this machine's speed moves a ratio by. The pooled ratio can fall "
           "outside that range when the passes ran at different speeds." if env.get("passes", 1) > 1 else ""), "",
        head, "|" + "---|" * (head.count("|") - 1),
    ]
    for r in rows:
        speedup = "—" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        if len(per_pass := r.get("speedup_per_pass", [])) > 1:
            speedup += f" ({min(per_pass):.2f}-{max(per_pass):.2f})"
        cells = [r["variant"], str(r["image_size"]), r["measurement"], r["unit"], _fmt(r["jax"], r["unit"]),
                 _fmt(r["pytorch"], r["unit"]), speedup]
        if compiled:
            cells += [_fmt(r["pytorch_compile"], r["unit"]),
                      "—" if r["speedup_vs_compile"] is None else f"{r['speedup_vs_compile']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    if peak := env.get("measured_peak_gflops"):
        shares = [f"{r['variant']} {r['image_size']} px {r['measurement'].split(', ')[1]} "
                  f"{100 * r['jax'] / peak:.0f}% / {100 * r['pytorch'] / peak:.0f}%"
                  for r in rows if r["unit"] == "GFLOP/s" and r["jax"] is not None and r["pytorch"] is not None]
        lines += ["", f"Achieved GFLOP/s as a share of the measured peak ({peak:,.0f}), JAX / PyTorch eager: "
                  + "; ".join(shares) + "."]
    if "pipeline" in extras:
        p, d = extras["pipeline"], extras["default_train"]
        lines += ["", "## Input pipeline (decode + augment, nothing else running)", "",
                  "| data | size | batch | pipeline img/s | train step img/s (JAX) | input-bound? |", "|---|---|---|---|---|---|"]
        fm = p["fashion_mnist"]
        for variant, t in d.items():
            lines.append(_pipeline_row("Fashion-MNIST (default run)", fm, variant, t["images_per_second"]))
        jp = p["jpeg_folder"]
        for variant in d:
            train = next((r["jax"] for r in rows if r["variant"] == variant and r["image_size"] == jp["size"]
                          and r["measurement"].startswith("training throughput")), None)
            lines.append(_pipeline_row(f"folder of {jp['source_pixels']}px JPEGs", jp, variant, train))
    if "knn" in extras:
        k = extras["knn"]
        lines += ["", "## Exact kNN (evaluation and search)", "",
                  f"{k['queries']:,} queries against a {k['gallery']:,} x {k['dim']} gallery, top-{k['k']}: "
                  f"{k['seconds']:.1f} s, {k['queries_per_second']:,.0f} queries/s; all {k['gallery']:,} items as queries "
                  f"(leave-one-out evaluation of the whole gallery): ~{k['all_vs_all_seconds'] / 60:.1f} min, plus embedding "
                  f"the gallery (see the inference throughput rows: {k['gallery']:,} / img/s)."]
    return "\n".join(lines) + "\n"


def save(out: str, json_path: str, env: dict, rows: list[dict], details: dict, extras: dict, complete: bool) -> str:
    """Writes the Markdown report to `out` and the records to `json_path` (either may be ""), and returns the report.
    Called after every stage, so that a stage that fails (a kNN run out of memory, a killed run) leaves the
    measurements made before it on disk, marked incomplete."""
    env = {**env, "complete": complete}
    report = markdown(env, rows, extras)
    for path, text in ((out, report), (json_path, json.dumps({"environment": env, "records": rows, "details": details,
                                                              "extras": extras}, indent=1, default=float) + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    return report


def main(argv):
    del argv
    cli.quiet_logging()
    import jax

    pipeline_images = None
    if FLAGS.pipeline:  # before minutes of model timing: missing data fails now, not at the end
        from resmobile_jax.bench import data_and_search

        pipeline_images = data_and_search.default_train_images()
    dtype = FLAGS.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    env = environment()
    env["dtype"] = dtype
    print(f"bench on {env['device']} ({dtype})", flush=True)
    env["passes"] = FLAGS.passes
    rows, details, extras = [], {}, {}
    models = [set_up_model(variant, int(size), dtype) for variant in FLAGS.variants for size in FLAGS.sizes]
    passes = [[] for _ in models]
    for p in range(FLAGS.passes):  # spread over the run: a phase of the machine's speed lands in one pass, not all
        print(f"timing pass {p + 1} of {FLAGS.passes}", flush=True)
        for model, done in zip(models, passes):
            done.append(time_model(model, FLAGS.budget / FLAGS.passes))
        rows, details = [], {}
        for model, done in zip(models, passes):
            r, d = model_rows(model, done)
            rows += r
            details[f"{model['variant']}_{model['size']}"] = d
        save(FLAGS.out, FLAGS.json, env, rows, details, extras, complete=False)
    if FLAGS.pipeline:
        from configs.base import get_base_config
        from resmobile_jax.bench import jax_side

        base = get_base_config("v1", "cpu")
        size, batch = int(base.model.input_size), int(base.data.batch_size)
        print("input pipeline ...", flush=True)
        extras["pipeline"] = data_and_search.input_pipeline(pipeline_images, size, batch, jpeg_size=224,
                                                            jpeg_batch=FLAGS.train_batch)
        extras["default_train"] = {}
        for variant in FLAGS.variants:
            print(f"[{variant}] train step at the default run's settings ({size} px, batch {batch}) ...", flush=True)
            extras["default_train"][variant] = jax_side.train(jax_side.bench_config(variant, size, dtype), batch, FLAGS.budget)
        save(FLAGS.out, FLAGS.json, env, rows, details, extras, complete=False)
    if FLAGS.knn_gallery:
        from resmobile_jax.bench import data_and_search

        print(f"kNN over {FLAGS.knn_gallery:,} items ...", flush=True)
        extras["knn"] = data_and_search.knn_throughput(FLAGS.knn_gallery, min(FLAGS.knn_queries, FLAGS.knn_gallery))
    print("\n" + save(FLAGS.out, FLAGS.json, env, rows, details, extras, complete=True))

if __name__ == "__main__":
    cli.run(main)
