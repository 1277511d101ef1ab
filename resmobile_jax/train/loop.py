"""`train_and_evaluate(config, workdir)`: the whole run, from config checks to the final evaluation.

Order of events: check the config and the workdir (cheap, before anything compiles) -> load and check the data ->
build model, optimizers, train state -> resume from the workdir or initialize (optionally from `init_from`) ->
train with periodic logging, evaluation and checkpoints -> final evaluation and checkpoint. SIGTERM/SIGINT save a
checkpoint at the current step and exit; rerunning the same command resumes.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from resmobile_jax import parallel
from resmobile_jax.data.pipeline import TrainBatches
from resmobile_jax.data.preprocess import Preprocess
from resmobile_jax.data.protocols import Splits, load_splits
from resmobile_jax.embed import embed_images, make_embed_fn
from resmobile_jax.losses import get_loss, parse_hparams
from resmobile_jax.models import build_model, input_hw
from resmobile_jax.retrieval import retrieval_metrics
from resmobile_jax.train import checkpoints as ckpt_lib
from resmobile_jax.train.metrics import MetricWriter
from resmobile_jax.train.precise_bn import make_batch_stats_fn, recompute_batch_stats
from resmobile_jax.train.state import create_train_state, make_optimizers, split_model
from resmobile_jax.train.step import make_train_step
from resmobile_jax.train.validate import ConfigError, check_config, check_workdir

RUN_FILE = "run.json"
RESULT_FILE = "final_metrics.json"
BAD_FILES = "bad_files.txt"


class NonFiniteError(RuntimeError):
    pass


def _preprocess(config) -> Preprocess:
    h, w = input_hw(config.model.input_size)
    d = config.data
    return Preprocess(h, w, tuple(d.rrc_scale), flip=bool(d.flip), eval_crop_fraction=float(d.eval_crop_fraction))


def _report_bad_files(splits: Splits, workdir: Path, on_bad_file: str) -> None:
    if not splits.bad_files:
        return
    lines = [f"{path}\t{reason}" for path, reason in splits.bad_files]
    if jax.process_index() == 0:
        # surrogateescape: a file name that is not valid UTF-8 is written back as the bytes the filesystem holds
        (workdir / BAD_FILES).write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    msg = f"{len(lines)} file(s) in the dataset were not usable images; listed in {workdir / BAD_FILES}"
    if on_bad_file == "error":
        raise ValueError(msg + " (data.on_bad_file='error'; fix or remove them, or use 'skip')")
    print(f"warning: {msg}; skipped", file=sys.stderr)


def _initialize_from(path: str, model, expect_variant: str) -> str:
    """Copies weights into `model` from a converted checkpoint or from an earlier run's latest checkpoint."""
    from resmobile_jax.checkpoint import METADATA_FILE, load_model, load_state_dict, model_state_dict

    p = Path(path)
    if (p / METADATA_FILE).is_file():
        source, _ = load_model(p, expect_variant=expect_variant)
        load_state_dict(model, model_state_dict(source))
        return f"converted checkpoint {p}"
    if (p / ckpt_lib.LATEST_DIR).is_dir():
        run = json.loads((p / RUN_FILE).read_text()) if (p / RUN_FILE).is_file() else {}
        variant = run.get("config", {}).get("model", {}).get("variant", expect_variant)
        if variant != expect_variant:
            raise ValueError(f"init_from {p} is a ResMobileNet {variant} run, but this run trains {expect_variant}")
        _, params, batch_stats = split_model(model)
        try:
            restored, step = ckpt_lib.read_run_weights(p, {"params": params, "batch_stats": batch_stats})
        except FileNotFoundError:
            raise ValueError(f"init_from {p} has no checkpoint yet") from None
        nnx.update(model, restored["params"], restored["batch_stats"])
        return f"run {p} at step {step}"
    raise ValueError(
        f"init_from {p} is neither a converted checkpoint (no {METADATA_FILE}) nor a run workdir (no "
        f"{ckpt_lib.LATEST_DIR}/); convert PyTorch weights with `python -m resmobile_jax.convert to-flax`"
    )


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def evaluate_state(state, embed_fn, splits: Splits, preprocess, config, mesh, progress) -> dict:
    """Retrieval metrics of the current weights (EMA weights when kept) on the evaluation set, leave-one-out."""
    params = state.ema_params if state.ema_params is not None else state.params
    emb = embed_images(embed_fn, params, state.batch_stats, splits.eval, preprocess, int(config.data.eval_batch_size),
                       mesh, progress)
    return retrieval_metrics(emb, splits.eval.labels, ks=tuple(config.train.eval_ks),
                             sharding=parallel.batch_sharding(mesh), progress=progress)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, checkpoints and evaluates; returns the final evaluation metrics (also in WORKDIR/final_metrics.json)."""
    parallel.maybe_initialize_distributed()
    check_config(config)
    workdir = Path(workdir).absolute()
    check_workdir(config, workdir)  # also creates it, and proves it writable
    main = jax.process_index() == 0
    progress = bool(config.train.progress) and main
    t_start = time.time()

    splits = load_splits(config.data, config.seed, progress=progress)
    _report_bad_files(splits, workdir, config.data.on_bad_file)
    loss = get_loss(config.loss.name, **parse_hparams(config.loss.name, config.loss.hparams))
    pk = (int(config.data.p), int(config.data.k)) if loss.wants_pk_batches else None
    preprocess = _preprocess(config)
    try:  # settings that only fail against the data (P > classes, batch > images, warmup > run): the user's to fix
        batches = TrainBatches(splits.train, preprocess, int(config.data.batch_size), config.seed, pk,
                               jax.process_index(), jax.process_count(), int(config.data.workers))
        total_steps = int(config.train.num_steps) or int(round(float(config.train.num_epochs) * batches.steps_per_epoch))
        tx, loss_tx, schedule = make_optimizers(config, total_steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if main:
        print(f"ResMobileNet {config.model.variant} | {splits.description} | loss {config.loss.name} | "
              f"{total_steps} steps of {config.data.batch_size} ({batches.steps_per_epoch}/epoch) on "
              f"{jax.device_count()} {jax.default_backend()} device(s), {jax.process_count()} process(es)", flush=True)
        (workdir / RUN_FILE).write_text(json.dumps({"config": config.to_dict(), "data": splits.description}, indent=2, default=str) + "\n")

    model = build_model(config.model, config.seed)
    if config.train.init_from:
        try:
            origin = _initialize_from(config.train.init_from, model, config.model.variant)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"train.init_from: {e}") from None
        if main:
            print(f"initialized from {origin}")
    model.eval()
    graphdef_eval = split_model(model)[0]
    model.train()
    graphdef_train = split_model(model)[0]
    dtype = jnp.dtype(config.model.dtype)

    mesh = parallel.data_mesh()
    replicated = parallel.replicated(mesh)
    state = create_train_state(model, config, splits.train.num_classes, tx, loss_tx, loss.uses_proxies)
    state = jax.device_put(state, replicated)
    checkpoints = ckpt_lib.RunCheckpoints(workdir, int(config.train.keep_checkpoints), bool(config.train.async_checkpoints),
                                          config.train.best_metric)
    start_step = 0
    if checkpoints.latest_step() is not None:
        state, record = checkpoints.restore(ckpt_lib.abstract_like(state))
        start_step = int(jax.device_get(state.step))
        if main:
            print(f"resumed from {workdir / ckpt_lib.LATEST_DIR} at step {start_step} (epoch {record['epoch']})")

    train_step = make_train_step(
        replicated, state, graphdef=graphdef_train, loss_fn=loss.fn, tx=tx, loss_tx=loss_tx, schedule=schedule,
        ema_decay=float(config.optimizer.ema_decay), dtype=dtype, skip_nonfinite=config.train.on_nonfinite == "skip",
    )
    writer = MetricWriter(workdir)
    sharding = parallel.batch_sharding(mesh)

    def record(step: int, metrics: dict | None = None) -> dict:
        epoch, b = divmod(step, batches.steps_per_epoch)
        return {"step": step, "epoch": epoch, "batch_in_epoch": b, "model": config.model.to_dict(),
                "metrics": metrics or {}}

    embed_fn = make_embed_fn(graphdef_eval, dtype, mesh)  # built once: a new jit per evaluation would recompile
    stats_fn = make_batch_stats_fn(model, dtype, mesh) if int(config.train.precise_bn_images) else None

    def run_eval(step: int) -> dict:
        nonlocal leaves
        state = train_step.state(leaves)
        if stats_fn is not None:
            params = state.ema_params if state.ema_params is not None else state.params
            state = state.replace(batch_stats=recompute_batch_stats(
                stats_fn, params, state.batch_stats, splits.train, preprocess, int(config.data.batch_size),
                int(config.train.precise_bn_images), config.seed, mesh))
            leaves = train_step.leaves(state)
        metrics = evaluate_state(state, embed_fn, splits, preprocess, config, mesh, progress)
        writer.write(step, "eval", metrics)
        checkpoints.save_best(step, state, record(step, metrics), metrics)
        if main:
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("num_")), flush=True)
        return metrics

    def check_finite(step_metrics, step: int) -> dict:
        """Host copy of the step's metrics; raises (mode 'stop') if the loss or gradient went NaN/Inf. Runs before
        every checkpoint save too, so a NaN state is never saved."""
        values = jax.device_get(step_metrics)
        if not values.pop("finite") and config.train.on_nonfinite != "skip":
            checkpoints.wait()
            good = checkpoints.latest_step()
            where = (f"the last good checkpoint is step {good} in {workdir / ckpt_lib.LATEST_DIR}"
                     if good is not None else "no checkpoint was written before it")
            raise NonFiniteError(
                f"loss or gradient became NaN/Inf at step {step} (loss {values['loss']}); {where}. Lower "
                f"optimizer.learning_rate, set optimizer.grad_clip_norm, or train.on_nonfinite='skip'"
            )
        return values

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, unit="step", desc=f"train {config.model.variant}", dynamic_ncols=True)
    step, last_log, t_log, skipped = start_step, start_step, time.time(), 0
    compile_time = None
    metrics = None
    leaves = train_step.leaves(state)  # the loop carries the state as leaves (TrainStep says why)
    del state
    with _StopRequest() as stop:
        data = batches.iterate(start_step, total_steps)
        for local in data:
            t0 = time.time()
            leaves, step_metrics = train_step.on_leaves(leaves, parallel.global_batch(local, sharding))
            if compile_time is None:
                jax.block_until_ready(step_metrics)
                compile_time = time.time() - t0
            step += 1
            if config.train.on_nonfinite == "skip":  # counted on the device: exact, and no host sync per step
                skipped = skipped + jnp.logical_not(step_metrics["finite"]).astype(jnp.int32)
            last = step == total_steps
            logging_step = step % int(config.train.log_every_steps) == 0 or last or stop.signal
            if logging_step:
                values = check_finite(step_metrics, step)
                now = time.time()
                values["images_per_second"] = (step - last_log) * int(config.data.batch_size) / max(now - t_log, 1e-9)
                last_log, t_log = step, now
                writer.write(step, "train", values)
                if bar is not None:
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['learning_rate']:.2e}",
                                    img_s=f"{values['images_per_second']:.0f}")
            if bar is not None:
                # Wait for the step before counting it: counting at dispatch makes tqdm see 49 instant steps and one
                # long one per log interval, and its smoothed rate (hence the ETA) swings by 10x.
                jax.block_until_ready(step_metrics["loss"])
                bar.update(1)
            every_eval = int(config.train.eval_every_steps)
            if every_eval and step % every_eval == 0 and not last:
                run_eval(step)
            # stop.signal is read here, so a signal that arrived during this step's bookkeeping saves this step too.
            if step % int(config.train.checkpoint_every_steps) == 0 or last or stop.signal:
                if not logging_step:
                    check_finite(step_metrics, step)  # never checkpoint a state that went NaN since the last check
                checkpoints.save(step, train_step.state(leaves), record(step))
            if stop.signal:
                checkpoints.wait()
                if bar is not None:
                    bar.close()
                print(f"\n{stop.signal}: saved a checkpoint at step {step} in {workdir / ckpt_lib.LATEST_DIR}; rerun "
                      f"the same command to resume", file=sys.stderr)
                checkpoints.close()
                writer.close()
                sys.exit(128 + getattr(signal, stop.signal))
    if bar is not None:
        bar.close()
    metrics = run_eval(step)
    checkpoints.wait()
    result = {
        **metrics,
        "step": step,
        "train_seconds_this_session": round(time.time() - t_start, 1),
        "train_step_compile_seconds": None if compile_time is None else round(compile_time, 1),
        "skipped_nonfinite_steps": int(jax.device_get(skipped)),
        "variant": config.model.variant,
        "data": splits.description,
    }
    if main:
        (workdir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    checkpoints.close()
    writer.close()
    return result
