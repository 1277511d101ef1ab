"""python -m resmobile_jax.evaluate --workdir RUN | --checkpoint CONVERTED [--config configs/v1.py]: how good and how
fast one model is.

Embeds the evaluation split, computes the retrieval metrics (leave-one-out, cosine), measures inference time, and
draws a t-SNE picture and a retrieval grid. Writes OUT/eval.json (+ PNGs; default OUT = RUN/eval or
CONVERTED/eval) and prints a Markdown table.

--workdir reads the run's own config (run.json) and its best checkpoint (EMA weights and the precise-BN statistics
the training evaluation used), so it reproduces the run's final metrics. --checkpoint takes a converted torchvision
model (`python -m resmobile_jax.convert to-flax`) and evaluates it on the data of --config (default: the cpu preset).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags

from resmobile_jax import cli

FLAGS = flags.FLAGS
EVAL_FILE = "eval.json"


class EvaluationError(ValueError):
    """A user mistake (missing checkpoint, wrong variant, unusable data); printed as `error: ...`."""


@dataclasses.dataclass
class LoadedModel:
    model: object  # ResMobileNet in eval mode, weights loaded
    config: ml_collections.ConfigDict  # data and model settings to evaluate with
    source: str  # where the weights came from, for the report
    reestimate_bn: bool = False  # latest checkpoint of a run that evaluates with precise BN: recompute its statistics


def load_run(workdir: str | Path, config: ml_collections.ConfigDict | None = None, which: str = "best") -> LoadedModel:
    """A training run's weights: best/ (what the final evaluation measured) or checkpoints/ (the latest step).
    `config` may replace the run's data settings; its model must be the run's variant."""
    from resmobile_jax.models import build_model
    from resmobile_jax.train import checkpoints as ckpt_lib
    from resmobile_jax.train.loop import RUN_FILE
    from resmobile_jax.train.state import split_model

    workdir = Path(workdir).absolute()
    run_file = workdir / RUN_FILE
    if not run_file.is_file():
        raise EvaluationError(f"{workdir} is not a training run (no {RUN_FILE}); train one with "
                              f"`python train.py --config configs/v1.py --workdir {workdir}`, or pass a converted "
                              "model with --checkpoint")
    run_config = ml_collections.ConfigDict(json.loads(run_file.read_text())["config"])
    if config is not None and config.model.variant != run_config.model.variant:
        raise EvaluationError(f"{workdir} is a ResMobileNet {run_config.model.variant} run, but --config is "
                              f"{config.model.variant}; pass configs/{run_config.model.variant}.py or no --config")
    config = config or run_config
    config.model = run_config.model  # the network is the run's, whatever --config says about data
    best = which == "best" and (workdir / ckpt_lib.BEST_DIR).is_dir()
    model = build_model(config.model, run_config.seed)
    _, params, batch_stats = split_model(model)
    use_ema = float(run_config.optimizer.ema_decay) > 0
    key = "ema_params" if use_ema else "params"
    try:
        restored, step = ckpt_lib.read_run_weights(workdir, {key: params, "batch_stats": batch_stats}, best=best)
    except FileNotFoundError:
        raise EvaluationError(f"{workdir} has no finished checkpoint yet (neither {ckpt_lib.BEST_DIR}/ nor "
                              f"{ckpt_lib.LATEST_DIR}/ holds one); train first, or wait for the first save") from None
    from flax import nnx

    nnx.update(model, restored[key], restored["batch_stats"])
    reestimate = not best and bool(int(config.train.precise_bn_images))
    source = (f"run {workdir}, {'best' if best else 'latest'} checkpoint, step {step}"
              f"{', EMA weights' if use_ema else ''}{', BN statistics re-estimated' if reestimate else ''}")
    return LoadedModel(model, config, source, reestimate)


def load_converted(checkpoint: str | Path, config: ml_collections.ConfigDict | None = None) -> LoadedModel:
    """A converted model checkpoint; data settings from `config` (default: the cpu preset of its variant)."""
    from resmobile_jax.checkpoint import load_model, read_metadata

    try:
        meta = read_metadata(checkpoint)
    except FileNotFoundError as e:
        raise EvaluationError(str(e)) from None
    variant = meta["model"]["variant"]
    if config is None:
        from configs.base import get_base_config

        config = get_base_config(variant)
    if config.model.variant != variant:
        raise EvaluationError(f"{checkpoint} holds a ResMobileNet {variant} checkpoint, but --config is "
                              f"{config.model.variant}; pass configs/{variant}.py")
    model, meta = load_model(checkpoint)
    for k in ("embedding_dim", "v2_output_stride"):
        if k in meta["model"]:
            config.model[k] = meta["model"][k]
    sha = meta.get("source", {}).get("sha256", "")
    return LoadedModel(model, config, f"converted checkpoint {Path(checkpoint).absolute()}"
                                      + (f" (source sha256 {sha[:12]}...)" if sha else ""))


def load_checkpoint(path: str | Path, config: ml_collections.ConfigDict | None = None) -> LoadedModel:
    """Whatever `path` is: a training run (its best checkpoint) or a model checkpoint directory. For the commands
    that use a model (export, embed, search); a run's latest checkpoint gets its BN statistics re-estimated here."""
    from resmobile_jax.checkpoint import METADATA_FILE
    from resmobile_jax.train.loop import RUN_FILE

    path = Path(path)
    if (path / RUN_FILE).is_file():
        loaded = load_run(path, config)
    elif (path / METADATA_FILE).is_file():
        loaded = load_converted(path, config)
    else:
        raise EvaluationError(f"{path} is neither a training run (no {RUN_FILE}) nor a model checkpoint (no "
                              f"{METADATA_FILE}); pass the --workdir of a `python train.py` run or the --out of "
                              "`python -m resmobile_jax.convert to-flax`")
    if loaded.reestimate_bn:
        from flax import nnx

        from resmobile_jax.data.protocols import load_splits
        from resmobile_jax.train.state import split_model

        c = loaded.config
        _, params, batch_stats = split_model(loaded.model)
        nnx.update(loaded.model, recompute_bn(loaded, params, batch_stats, load_splits(c.data, int(c.seed)).train))
        loaded.reestimate_bn = False
    return loaded


def recompute_bn(loaded: LoadedModel, params, batch_stats, train_images, mesh=None):
    """BN statistics re-estimated on `train_images` with the current weights (what training's evaluation uses)."""
    from resmobile_jax import parallel
    from resmobile_jax.train.loop import _preprocess
    from resmobile_jax.train.precise_bn import make_batch_stats_fn, recompute_batch_stats

    c = loaded.config
    mesh = mesh or parallel.data_mesh()
    return recompute_batch_stats(make_batch_stats_fn(loaded.model, jnp.dtype(c.model.dtype), mesh), params,
                                 batch_stats, train_images, _preprocess(c), int(c.data.batch_size),
                                 int(c.train.precise_bn_images), int(c.seed), mesh)


def embed_split(loaded: LoadedModel, images, mesh=None, progress: bool = True, recompute_bn_from=None) -> np.ndarray:
    """(N, D) embeddings of an ImageSet with the eval preprocessing. `recompute_bn_from` (an ImageSet): re-estimate
    BN statistics on it first, as training's evaluation does for weights whose running averages lag."""
    from resmobile_jax import parallel
    from resmobile_jax.embed import embed_images, make_embed_fn
    from resmobile_jax.train.loop import _preprocess
    from resmobile_jax.train.state import split_model

    c = loaded.config
    mesh = mesh or parallel.data_mesh()
    dtype = jnp.dtype(c.model.dtype)
    graphdef, params, batch_stats = split_model(loaded.model)
    preprocess = _preprocess(c)
    if recompute_bn_from is not None:
        batch_stats = recompute_bn(loaded, params, batch_stats, recompute_bn_from, mesh)
    embed_fn = make_embed_fn(graphdef, dtype, mesh)
    return embed_images(embed_fn, params, batch_stats, images, preprocess, int(c.data.eval_batch_size), mesh, progress)


def pictures(out: Path, name: str, embeddings: np.ndarray, eval_set, preprocess, sample: np.ndarray,
             grid_queries: np.ndarray, seed: int) -> dict:
    """t-SNE PNG + cluster quality on `sample`, and a retrieval-grid PNG for `grid_queries`; returns the figures and
    the 2-D points (so a comparison can draw models side by side)."""
    from resmobile_jax import visualize
    from resmobile_jax.retrieval import knn

    labels = eval_set.labels
    quality = visualize.cluster_quality(embeddings[sample], labels[sample], seed)
    points = visualize.tsne_2d(embeddings[sample], seed)
    title = (f"{name}: t-SNE of {len(sample)} eval images | silhouette {quality['silhouette_cosine']:.3f}, "
             f"k-means NMI {quality['kmeans_nmi']:.3f}")
    tsne_png = visualize.save_tsne(out / f"tsne_{name}.png", [(title, points)], labels[sample], eval_set.class_names)
    scores, neighbours = knn(embeddings, k=5)
    shown = np.unique(np.concatenate([grid_queries, neighbours[grid_queries].ravel()]))
    crops = {int(i): preprocess.eval_image(eval_set.images[i]) for i in shown}
    grid_png = visualize.save_retrieval_grid(
        out / f"retrieval_{name}.png", crops, labels, grid_queries, neighbours[grid_queries], scores[grid_queries],
        eval_set.class_names, title=f"{name}: top-5 of each query (leave-one-out; green = same class)")
    return {"cluster_quality": quality, "tsne_png": tsne_png.name, "retrieval_grid_png": grid_png.name,
            "tsne_points": points}


def grid_queries_for(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` distinct queries, cycling through the classes, seeded: the same for every model compared."""
    rng = np.random.default_rng([seed, 11])
    classes = np.unique(labels)
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    picks = [members[i % len(classes)][i // len(classes)] for i in range(n)
             if i // len(classes) < len(members[i % len(classes)])]
    return np.asarray(picks, np.int64)


def evaluate(loaded: LoadedModel, out: Path, *, timing: bool = True, draw: bool = True, tsne_points: int = 2000,
             grid_rows: int = 8, timing_sizes=(1, 64), save_embeddings: bool = False) -> dict:
    """Everything `python -m resmobile_jax.evaluate` measures for one model; writes OUT/eval.json."""
    from resmobile_jax.data.protocols import load_splits
    from resmobile_jax.data.sources import DatasetError
    from resmobile_jax.models import input_hw
    from resmobile_jax.retrieval import retrieval_metrics
    from resmobile_jax.train.loop import _preprocess

    c = loaded.config
    out.mkdir(parents=True, exist_ok=True)
    try:
        splits = load_splits(c.data, int(c.seed), progress=True)
    except DatasetError as e:
        raise EvaluationError(str(e)) from None
    emb = embed_split(loaded, splits.eval, recompute_bn_from=splits.train if loaded.reestimate_bn else None)
    result = {
        "source": loaded.source,
        "variant": c.model.variant,
        "data": splits.description,
        "input_size": list(input_hw(c.model.input_size)),
        "metrics": retrieval_metrics(emb, splits.eval.labels, ks=tuple(c.train.eval_ks), progress=True),
    }
    if save_embeddings:
        np.savez_compressed(out / "embeddings.npz", embeddings=emb, labels=splits.eval.labels)
        result["embeddings_file"] = "embeddings.npz"
    if draw:
        from resmobile_jax.visualize import stratified_sample

        sample = stratified_sample(splits.eval.labels, tsne_points, int(c.seed))
        queries = grid_queries_for(splits.eval.labels, grid_rows, int(c.seed))
        figs = pictures(out, c.model.variant, emb, splits.eval, _preprocess(c), sample, queries, int(c.seed))
        figs.pop("tsne_points")
        result.update(figs)
    if timing:
        from resmobile_jax.timing import inference_timing

        result["timing"] = inference_timing(loaded.model, input_hw(c.model.input_size), timing_sizes, c.model.dtype)
    (out / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_result(r: dict) -> str:
    m = r["metrics"]
    lines = [f"ResMobileNet {r['variant']} | {r['source']}", f"data: {r['data']}", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in m.items() if not k.startswith("num_")]
    lines.append(f"| queries | {m['num_queries']} (without a match: {m['num_queries_without_match']}) |")
    if "cluster_quality" in r:
        q = r["cluster_quality"]
        lines.append(f"| silhouette (cosine, {q['points']} points) | {q['silhouette_cosine']:.4f} |")
        lines.append(f"| k-means NMI | {q['kmeans_nmi']:.4f} |")
    if "timing" in r:
        t = r["timing"]
        h, w = t["input_hw"]
        for key, v in t.items():
            if key.startswith("batch_"):
                b = key.split("_")[1]
                lines.append(f"| {h}x{w} batch {b}: ms/call median (p10-p90) | {v['median_ms']:.2f} "
                             f"({v['p10_ms']:.2f}-{v['p90_ms']:.2f}) |")
                lines.append(f"| {h}x{w} batch {b}: images/s, compile s | {v['images_per_second']:.0f}, "
                             f"{v['compile_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv):
    cli.start_command(argv)
    if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
        raise app.UsageError("pass exactly one of --workdir (a training run) or --checkpoint (a converted model)")
    config = FLAGS.config
    if config is not None:
        config = ml_collections.ConfigDict(config.to_dict())  # unlock: the run's model settings replace these
    try:
        if FLAGS.workdir:
            loaded = load_run(FLAGS.workdir, config, FLAGS.which)
            out = Path(FLAGS.out or Path(FLAGS.workdir) / "eval")
        else:
            loaded = load_converted(FLAGS.checkpoint, config)
            out = Path(FLAGS.out or Path(FLAGS.checkpoint) / "eval")
        print(f"evaluating {loaded.source}", flush=True)
        result = evaluate(loaded, out, timing=FLAGS.timing, draw=FLAGS.pictures, tsne_points=FLAGS.tsne_points,
                          timing_sizes=tuple(int(b) for b in FLAGS.timing_batches),
                          save_embeddings=FLAGS.save_embeddings)
    except (EvaluationError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(format_result(result))
    print(f"wrote {out / EVAL_FILE}" + (f", {result['tsne_png']}, {result['retrieval_grid_png']}" if FLAGS.pictures else ""))


if __name__ == "__main__":
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "a training run's workdir")
    flags.DEFINE_string("checkpoint", None, "a converted model checkpoint (python -m resmobile_jax.convert to-flax)")
    config_flags.DEFINE_config_file("config", None, "data settings to evaluate on (configs/v1.py[:preset]); default: "
                                    "the run's own config, or the cpu preset for --checkpoint", lock_config=False)
    flags.DEFINE_enum("which", "best", ["best", "latest"], "--workdir: the best checkpoint or the latest one")
    flags.DEFINE_string("out", None, "output directory (default: WORKDIR/eval or CHECKPOINT/eval)")
    flags.DEFINE_bool("pictures", True, "draw the t-SNE and retrieval-grid PNGs (and compute cluster quality)")
    flags.DEFINE_bool("timing", True, "measure inference time")
    flags.DEFINE_multi_string("timing_batches", ["1", "64"], "batch sizes to time")
    flags.DEFINE_integer("tsne_points", 2000, "class-stratified subsample for t-SNE and cluster quality")
    flags.DEFINE_bool("save_embeddings", False, "also write OUT/embeddings.npz (embeddings, labels)")
    cli.run(main)
