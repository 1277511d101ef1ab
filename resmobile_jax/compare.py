"""V1 vs V2 on the same data with the same settings: `python -m resmobile_jax.compare --workdir runs/compare`.

Trains both variants with the same settings and seeds (or reuses finished runs in WORKDIR/v1, WORKDIR/v2, and
WORKDIR/v1_seedN... with --seeds; an interrupted run resumes), computes the raw-pixel baseline on the same evaluation
set, profiles and times both models, draws t-SNE pictures of the same images for both and retrieval grids of the same
queries, and writes WORKDIR/report.md, report.json and the PNGs: the measured version of the seed's table, with the
seed's predictions beside the measurements and a recommendation computed from them.
"""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from resmobile_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "directory for both runs and the report")
flags.DEFINE_string("preset", "cpu", "config preset for both variants (cpu | accel)")
flags.DEFINE_multi_string("set", [], "config override applied to both variants, e.g. --set train.num_epochs=3")
flags.DEFINE_integer("seeds", 1, "train each variant with this many seeds (config seed, +1, ...); report mean ± std")
flags.DEFINE_integer("tsne_points", 2000, "class-stratified evaluation subsample for t-SNE and cluster quality")
flags.DEFINE_integer("timing_size", 224, "second image size to time inference at (the seed's figures refer to 224)")
flags.DEFINE_bool("export", True, "export both models (LiteRT fp32/fp16/int8, ONNX where its extras are installed) at "
                  "the training size (size, fidelity, P@1) and LiteRT fp32/int8 at --timing_size (edge latency)")
flags.DEFINE_list("export_formats", None, "formats to export (default: all, onnx where its extras are installed)")
flags.DEFINE_integer("export_check_images", 1000, "evaluation images each export is checked on against JAX")
EDGE_FORMATS = ("tflite_fp32", "tflite_int8")  # timed again at --timing_size: the seed's latency budget is about that

BATCH_INPUT, BATCH_LARGE = 64, 32  # throughput batch sizes at the training input size and at --timing_size

# The seed note's predictions (shared/seed/resmobilenet_v1_vs_v2.en.md), quoted as written.
SEED = {
    "stem output": ("[B,16,H/2,W/2]", "[B,64,H/4,W/4]"),
    "inference time": ("~", "~10-15% slower"),
    "model size": ("~5 MB", "~7 MB"),
    "FLOPs": ("~300M", "~350M"),
    "accuracy": ("", "+1-2%"),
    "mobile": ("very good", "good (but heavier)"),
}
EDGE_BUDGET_MS = 50  # the seed: "latency matters (inference < 50 ms needed)"
METRICS = [("precision_at_1", "P@1"), ("recall_at_5", "Recall@5 (DML: >= 1 relevant in top 5)"),
           ("recall_at_10", "Recall@10"), ("map", "mAP (full ranking)"), ("map_at_r", "MAP@R"),
           ("r_precision", "R-Precision")]


def apply_overrides(config, overrides) -> None:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise app.UsageError(f"--set {item!r} is not key=value")
        *path, last = key.strip().split(".")
        node = config
        for p in path:
            node = node[p]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        node[last] = value


def raw_pixel_baseline(config, splits, sample: np.ndarray) -> dict:
    """Leave-one-out retrieval on the evaluation images' pixels (eval preprocessing, flattened, cosine), with the
    cluster quality of the same t-SNE sample the models are judged on."""
    from resmobile_jax.retrieval import retrieval_metrics
    from resmobile_jax.train.loop import _preprocess
    from resmobile_jax.visualize import cluster_quality

    pp = _preprocess(config)
    pixels = np.stack([pp.eval_image(x).astype(np.float32).ravel() for x in splits.eval.images])
    result = retrieval_metrics(pixels, splits.eval.labels, ks=tuple(config.train.eval_ks))
    result["cluster_quality"] = cluster_quality(pixels[sample], splits.eval.labels[sample], int(config.seed))
    return result


def run_or_reuse(config, workdir: Path) -> dict:
    from resmobile_jax.train import train_and_evaluate
    from resmobile_jax.train.loop import RESULT_FILE, RUN_FILE

    result_file, run_file = workdir / RESULT_FILE, workdir / RUN_FILE
    if result_file.is_file() and run_file.is_file():
        if json.loads(run_file.read_text())["config"] == json.loads(json.dumps(config.to_dict(), default=str)):
            print(f"reusing the finished run in {workdir}")
            return json.loads(result_file.read_text())
    started = time.time()
    result = train_and_evaluate(config, str(workdir))
    result["wall_seconds"] = round(time.time() - started, 1)
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_dir(workdir: Path, variant: str, index: int) -> Path:
    """Seed index 0 lives in WORKDIR/v1 (so one-seed and several-seed comparisons share it), the others beside it."""
    return workdir / (variant if index == 0 else f"{variant}_seed{index}")


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def difference_verdict(a: list[float], b: list[float]) -> str:
    """How b - a compares with seed-to-seed noise: 'within noise' when the mean difference is under two standard
    errors of the difference (about a 95% interval), which needs at least 2 seeds per model to say."""
    d = float(np.mean(b) - np.mean(a))
    if len(a) < 2 or len(b) < 2:
        return f"{d:+.4f} (one seed: noise not measured)"
    se = float(np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b)))
    verdict = "within noise" if abs(d) < 2 * se else "beyond noise"
    return f"{d:+.4f} ± {2 * se:.4f} (2 s.e.; {verdict})"


def recommendation(runs: list[list[dict]], profiles, timings) -> str:
    (r1, r2), (p1, p2) = runs, profiles
    vals = lambda runs, k: [r[k] for r in runs]  # noqa: E731
    d_map = np.mean(vals(r2, "map")) - np.mean(vals(r1, "map"))
    d_p1 = np.mean(vals(r2, "precision_at_1")) - np.mean(vals(r1, "precision_at_1"))
    cost = p2["total"]["macs"] / p1["total"]["macs"] - 1
    lat = [t["large"]["batch_1"]["median_ms"] for t in timings]
    slower = lat[1] / lat[0] - 1
    verdicts = {k: difference_verdict(vals(r1, k), vals(r2, k)) for k in ("precision_at_1", "map")}
    lines = [
        f"- V2 - V1: P@1 {verdicts['precision_at_1']}, mAP {verdicts['map']}.",
        f"- Cost of V2: {cost:+.0%} MACs, {p2['total']['params'] / p1['total']['params'] - 1:+.1%} parameters, "
        f"{slower:+.0%} batch-1 latency at {timings[0]['large']['input_hw'][0]} px on this machine ({lat[0]:.1f} vs "
        f"{lat[1]:.1f} ms).",
    ]
    noise = len(r1) > 1 and all("within noise" in v for v in verdicts.values())
    if noise or (len(r1) == 1 and abs(d_map) < 0.01 and abs(d_p1) < 0.01):
        lines.append("- The accuracy difference is within seed-to-seed noise"
                     + (" (or under 1 point with a single seed)" if len(r1) == 1 else "")
                     + ": on this data V1 gives the same retrieval quality for less compute; keep V1.")
    elif d_map > 0 and d_p1 > 0:
        lines.append(f"- V2 retrieves better here; whether {cost:+.0%} compute and {slower:+.0%} latency are worth "
                     f"{d_map:+.4f} mAP depends on the latency budget.")
    elif d_map < 0 and d_p1 < 0:
        lines.append("- V1 is both cheaper and better here: keep V1.")
    else:
        lines.append("- The metrics disagree on which model is better; V1 is cheaper, so keep V1 unless the metric "
                     "that favours V2 is the one that matters.")
    if len(r1) == 1:
        lines.append("- One seed per model: rerun with `--seeds 3` (or on the target data) before a final decision.")
    return "\n".join(lines)


def _cell(values, fmt="{:.4f}") -> str:
    m, s = mean_std(values)
    return fmt.format(m) + (f" ± {fmt.format(s)}" if len(values) > 1 else "")


def export_rows(exports) -> list[str]:
    """Per exported format: size, fidelity and P@1 at the training size, batch-1 latency in its runtime; then edge
    latency at --timing_size and the seed's Mobile-friendly row answered with the int8 LiteRT figures."""
    if not exports:
        return []
    (q1, e1), (q2, e2) = exports  # (export at the training size, LiteRT export at --timing_size) per variant
    hw, big = q1["input_hw"][0], e1["input_hw"][0]
    rows = []
    for fmt, r1 in q1["formats"].items():
        r2 = q2["formats"][fmt]
        cell = lambda r: (f"{r['size_mb']:.2f} MB, P@1 {r['precision_at_1']:.4f} (JAX {r['precision_at_1_jax']:.4f}), "  # noqa: E731
                          f"max diff {r['max_abs_diff']:.1e}, {r['batch_1']['median_ms']:.1f} ms")
        rows.append(f"| export {fmt} ({r1['runtime']}), {hw} px: size, P@1 on {r1['check_images']} eval images, "
                    f"max abs diff vs JAX, batch-1 latency | {cell(r1)} | {cell(r2)} | | |")
    for fmt, r1 in e1["formats"].items():
        r2 = e2["formats"][fmt]
        ms = lambda r: f"{r['batch_1']['median_ms']:.1f} ({r['batch_1']['p10_ms']:.1f}-{r['batch_1']['p90_ms']:.1f})"  # noqa: E731
        rows.append(f"| edge latency, {fmt} ({r1['runtime']}), batch 1, {big} px: ms median (p10-p90) | {ms(r1)} | "
                    f"{ms(r2)} | | |")
    if "tflite_int8" in e1["formats"]:
        mobile = lambda r: (f"int8 LiteRT: {r['size_mb']:.1f} MB, {r['batch_1']['median_ms']:.1f} ms at {big} px, "  # noqa: E731
                            f"{'under' if r['batch_1']['median_ms'] < EDGE_BUDGET_MS else 'OVER'} the seed's "
                            f"{EDGE_BUDGET_MS} ms")
        rows.append(f"| Mobile-friendly (measured on this CPU) | {mobile(e1['formats']['tflite_int8'])} | "
                    f"{mobile(e2['formats']['tflite_int8'])} | {SEED['mobile'][0]} / {SEED['mobile'][1]} | |")
    return rows


def write_report(workdir: Path, configs, runs, profiles, baseline, analyses, timings, exports=None) -> str:
    (p1, p2), (a1, a2), (t1, t2) = profiles, analyses, timings
    c = configs[0]
    n_seeds = len(runs[0])
    h, w = t1["input"]["input_hw"]
    ms = lambda t, key, b: f"{t[key][f'batch_{b}']['median_ms']:.2f} ({t[key][f'batch_{b}']['p10_ms']:.2f}-{t[key][f'batch_{b}']['p90_ms']:.2f})"  # noqa: E731
    ips = lambda t, key, b: f"{t[key][f'batch_{b}']['images_per_second']:.0f}"  # noqa: E731
    rows = [
        "| | V1 (MobileNet stem) | V2 (ResNet stem) | seed predicted V1 / V2 | raw pixels |",
        "|---|---:|---:|---|---:|",
        f"| stem output at 224 px (H, W, C) | {tuple(p1['parts']['stem']['output_shape'])} | "
        f"{tuple(p2['parts']['stem']['output_shape'])} | {SEED['stem output'][0]} / {SEED['stem output'][1]} | |",
        f"| inference, batch 1, {t1['large']['input_hw'][0]} px: ms median (p10-p90) | {ms(t1, 'large', 1)} | {ms(t2, 'large', 1)} | "
        f"{SEED['inference time'][0]} / {SEED['inference time'][1]} | |",
        f"| inference, batch 1, {h}x{w} px: ms median (p10-p90) | {ms(t1, 'input', 1)} | {ms(t2, 'input', 1)} | | |",
        f"| throughput, batch {BATCH_LARGE} at {t1['large']['input_hw'][0]} px (images/s) | {ips(t1, 'large', BATCH_LARGE)} | {ips(t2, 'large', BATCH_LARGE)} | | |",
        f"| throughput, batch {BATCH_INPUT} at {h}x{w} px (images/s) | {ips(t1, 'input', BATCH_INPUT)} | "
        f"{ips(t2, 'input', BATCH_INPUT)} | | |",
        f"| inference compile, batch 1, {t1['large']['input_hw'][0]} px (s) | {t1['large']['batch_1']['compile_seconds']:.1f} | "
        f"{t2['large']['batch_1']['compile_seconds']:.1f} | | |",
        f"| params | {p1['total']['params']:,} | {p2['total']['params']:,} | | |",
        f"| model size fp32 (MB) | {p1['total']['params_mb_fp32']:.2f} | {p2['total']['params_mb_fp32']:.2f} | "
        f"{SEED['model size'][0]} / {SEED['model size'][1]} | |",
        f"| MACs at 224 px | {p1['total']['macs'] / 1e6:.1f} M | {p2['total']['macs'] / 1e6:.1f} M | "
        f"\"FLOPs\" {SEED['FLOPs'][0]} / {SEED['FLOPs'][1]} | |",
        f"| XLA FLOPs at 224 px | {p1['total']['xla_flops'] / 1e6:.1f} M | {p2['total']['xla_flops'] / 1e6:.1f} M | | |",
        *export_rows(exports),
    ]
    for key, label in METRICS:
        seed = f"{SEED['accuracy'][0]} / {SEED['accuracy'][1]}" if key == "precision_at_1" else ""
        rows.append(f"| {label} | {_cell([r[key] for r in runs[0]])} | {_cell([r[key] for r in runs[1]])} | {seed} | "
                    f"{baseline[key]:.4f} |")
    q1, q2 = a1["cluster_quality"], a2["cluster_quality"]
    rows += [
        f"| t-SNE sample: silhouette (cosine) | {q1['silhouette_cosine']:.4f} | {q2['silhouette_cosine']:.4f} | | "
        f"{baseline['cluster_quality']['silhouette_cosine']:.4f} |",
        f"| t-SNE sample: k-means NMI | {q1['kmeans_nmi']:.4f} | {q2['kmeans_nmi']:.4f} | | "
        f"{baseline['cluster_quality']['kmeans_nmi']:.4f} |",
        f"| training wall time (s) | {_cell([_wall(r) for r in runs[0]], '{:.0f}')} | "
        f"{_cell([_wall(r) for r in runs[1]], '{:.0f}')} | | |",
        f"| train-step compile (s) | {runs[0][0]['train_step_compile_seconds']} | {runs[1][0]['train_step_compile_seconds']} | | |",
    ]
    r1 = runs[0][0]
    seeds = f"seed {c.seed}" if n_seeds == 1 else f"{n_seeds} seeds ({c.seed}..{c.seed + n_seeds - 1}), mean ± std"
    text = "\n".join([
        "# ResMobileNet V1 vs V2: measured",
        "",
        f"Command: `python -m resmobile_jax.compare {' '.join(sys.argv[1:])}`",
        "",
        f"Data: {r1['data']}. Both models: {c.model.input_size} px input, embedding {c.model.embedding_dim}, loss "
        f"{c.loss.name}, {r1['step']} steps of batch {c.data.batch_size}, optimizer {c.optimizer.name} "
        f"(peak LR {c.optimizer.learning_rate}), {seeds}. Retrieval: evaluation set queried leave-one-out, cosine. "
        f"Timing: {t1['large']['device']}, jitted, uint8 images in, embeddings out; "
        f"compile excluded. Pictures: the first seed's models, {q1['points']} class-stratified evaluation images."
        + (" Exports (`python -m resmobile_jax.export`, files in export_v1/, export_v2/ and *_edge/): uint8 images in, "
           "embeddings out, run and timed in their own runtime with all cores; max diff = the largest absolute "
           "difference of an embedding element from the JAX model's (float32)." if exports else ""),
        "",
        *rows,
        "",
        "## What the numbers say",
        "",
        recommendation(runs, profiles, timings),
        "",
        "## Pictures",
        "",
        "t-SNE of the same evaluation images for both models: ![t-SNE](tsne_v1_v2.png)",
        "",
        "Top-5 retrievals of the same queries (green = same class): [V1](retrieval_v1.png), [V2](retrieval_v2.png)",
        "",
    ])
    (workdir / "report.md").write_text(text)
    (workdir / "report.json").write_text(json.dumps(
        {"v1": {"runs": runs[0], "profile": p1, "timing": t1, "pictures": a1, "export": exports and exports[0]},
         "v2": {"runs": runs[1], "profile": p2, "timing": t2, "pictures": a2, "export": exports and exports[1]},
         "raw_pixel_baseline": baseline}, indent=2, default=str) + "\n")
    return text


def _wall(r: dict) -> float:
    return r.get("wall_seconds", r["train_seconds_this_session"])


def analyse(config, run: Path, out: Path, splits, sample, queries) -> tuple[dict, dict, np.ndarray]:
    """Pictures + cluster quality and inference timing of one trained model; also returns its t-SNE points."""
    from resmobile_jax.evaluate import embed_split, load_run, pictures
    from resmobile_jax.models import input_hw
    from resmobile_jax.timing import inference_timing
    from resmobile_jax.train.loop import _preprocess

    loaded = load_run(run)
    print(f"{config.model.variant}: embedding, t-SNE, retrieval grid ...", flush=True)
    emb = embed_split(loaded, splits.eval, progress=False)
    figs = pictures(out, config.model.variant, emb, splits.eval, _preprocess(config), sample, queries, int(config.seed))
    points = figs.pop("tsne_points")
    print(f"{config.model.variant}: timing inference ...", flush=True)
    dtype = config.model.dtype
    timing = {"input": inference_timing(loaded.model, input_hw(config.model.input_size), (1, BATCH_INPUT), dtype),
              "large": inference_timing(loaded.model, (FLAGS.timing_size,) * 2, (1, BATCH_LARGE), dtype)}
    return figs, timing, points


def export_model(workdir: Path, config) -> tuple[dict, dict]:
    """Exports at the training size, checked on evaluation images (size, fidelity, P@1, latency), and LiteRT again at
    --timing_size for the edge latency the seed's budget refers to. Earlier exports in WORKDIR are replaced."""
    from resmobile_jax.export.__main__ import run_export

    variant = config.model.variant
    run = run_dir(workdir, variant, 0)
    print(f"{variant}: exporting and checking the exports ...", flush=True)
    quality = run_export(run, workdir / f"export_{variant}", formats=FLAGS.export_formats,
                         check_images=FLAGS.export_check_images, progress=False, overwrite=True,
                         timing_budget_seconds=2.0)
    edge_formats = [f for f in EDGE_FORMATS if f in quality["formats"]]
    edge = run_export(run, workdir / f"export_{variant}_edge", formats=edge_formats, input_size=FLAGS.timing_size,
                      check_images=32, batch_size=32, progress=False, overwrite=True, timing_budget_seconds=2.0)
    return quality, edge


def main(argv):
    cli.start_command(argv)
    if FLAGS.seeds < 1:
        raise app.UsageError("--seeds must be at least 1")
    from configs import v1, v2
    from resmobile_jax.data.protocols import load_splits
    from resmobile_jax.evaluate import grid_queries_for
    from resmobile_jax.profile import profile_model
    from resmobile_jax.train.validate import ConfigError
    from resmobile_jax.visualize import save_tsne, stratified_sample

    workdir = Path(FLAGS.workdir).absolute()
    configs = [v1.get_config(FLAGS.preset), v2.get_config(FLAGS.preset)]
    for c in configs:
        apply_overrides(c, FLAGS.set)
    runs = [[], []]
    try:
        for i in range(FLAGS.seeds):  # seed-major order: an early stop still leaves a like-for-like pair
            for c, results in zip(configs, runs):
                seeded = c.copy_and_resolve_references()
                seeded.seed = c.seed + i
                results.append(run_or_reuse(seeded, run_dir(workdir, c.model.variant, i)))
    except ConfigError as e:
        sys.exit(f"error: {e}")
    c = configs[0]
    splits = load_splits(c.data, int(c.seed))
    sample = stratified_sample(splits.eval.labels, FLAGS.tsne_points, int(c.seed))
    queries = grid_queries_for(splits.eval.labels, 8, int(c.seed))
    print("raw-pixel baseline ...", flush=True)
    baseline = raw_pixel_baseline(c, splits, sample)
    analyses, timings, points = [], [], []
    for cfg in configs:
        figs, timing, pts = analyse(cfg, run_dir(workdir, cfg.model.variant, 0), workdir, splits, sample, queries)
        analyses.append(figs)
        timings.append(timing)
        points.append(pts)
    save_tsne(workdir / "tsne_v1_v2.png",
              [(f"{cfg.model.variant}: silhouette {a['cluster_quality']['silhouette_cosine']:.3f}, k-means NMI "
                f"{a['cluster_quality']['kmeans_nmi']:.3f}", p) for cfg, a, p in zip(configs, analyses, points)],
              splits.eval.labels[sample], splits.eval.class_names)
    profiles = [profile_model(cfg.model, 224, checkpoint_size=False) for cfg in configs]
    exports = [export_model(workdir, cfg) for cfg in configs] if FLAGS.export else None
    print(write_report(workdir, configs, runs, profiles, baseline, analyses, timings, exports))
    print(f"wrote {workdir / 'report.md'}, report.json and the PNGs")


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
