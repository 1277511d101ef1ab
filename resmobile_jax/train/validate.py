"""Config and workdir checks that run before any data loading or compilation, one clear message per mistake.

Unknown keys and wrong types are refused by ml_collections itself when the command line is parsed (the config is
locked); here are the checks on values and on how fields combine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import ml_collections

from resmobile_jax.data.protocols import PROTOCOLS
from resmobile_jax.losses import LOSSES, parse_hparams
from resmobile_jax.models import input_hw, output_stride
from resmobile_jax.models.architecture import check_variant
from resmobile_jax.models.kernels import cpu_kernels
from resmobile_jax.models.layers import BATCH_NORM_IMPLS, DEPTHWISE_IMPLS, POINTWISE_IMPLS, STEM_CONV_IMPLS

METRIC_NAMES = ("precision_at_1", "map", "map_at_r", "r_precision")


class ConfigError(ValueError):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_config(c: ml_collections.ConfigDict) -> None:
    m, d, o, t = c.model, c.data, c.optimizer, c.train
    try:
        check_variant(m.variant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(int(m.embedding_dim) >= 1, f"model.embedding_dim must be a positive integer, got {m.embedding_dim}")
    try:
        h, w = input_hw(m.input_size)
    except (TypeError, ValueError):
        raise ConfigError(f"model.input_size must be an int or (height, width), got {m.input_size!r}") from None
    stride = output_stride(m.variant, int(m.v2_output_stride))
    _require(min(h, w) >= stride, f"model.input_size {h}x{w} is smaller than ResMobileNet {m.variant}'s output stride "
             f"{stride}; use at least {stride}")
    for key in ("dtype", "param_dtype"):
        _require(m[key] in ("float32", "bfloat16", "float16"), f"model.{key} must be float32, bfloat16 or float16, got {m[key]!r}")
    for key, choices in (("depthwise_impl", DEPTHWISE_IMPLS), ("pointwise_impl", POINTWISE_IMPLS),
                         ("stem_conv_impl", STEM_CONV_IMPLS), ("batch_norm_impl", BATCH_NORM_IMPLS)):
        _require(m.get(key, choices[0]) in choices, f"model.{key} must be one of {', '.join(choices)}, got {m.get(key)!r}")
        if m.get(key) == "cpu_kernel":
            _require(m.dtype == "float32", f"model.{key}='cpu_kernel' computes in float32, but model.dtype is {m.dtype!r}; "
                     f"use 'auto'")
            try:
                cpu_kernels.require()
            except cpu_kernels.KernelUnavailable as e:
                raise ConfigError(f"model.{key}: {e}; use 'auto'") from None
    _require(c.loss.name in LOSSES, f"unknown loss.name {c.loss.name!r}; choose one of {', '.join(sorted(LOSSES))}")
    try:
        parse_hparams(c.loss.name, c.loss.hparams)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _require(d.protocol in PROTOCOLS, f"unknown data.protocol {d.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    _require(d.on_bad_file in ("skip", "error"), f"data.on_bad_file must be 'skip' or 'error', got {d.on_bad_file!r}")
    _require(int(d.batch_size) >= 2, f"data.batch_size must be at least 2, got {d.batch_size}")
    n_dev = jax.device_count()
    for key in ("batch_size", "eval_batch_size"):
        _require(int(d[key]) % n_dev == 0, f"data.{key} = {d[key]} does not split over the {n_dev} devices of this run; "
                 f"use a multiple of {n_dev}")
    if LOSSES[c.loss.name].wants_pk_batches:
        _require(int(d.p) * int(d.k) == int(d.batch_size),
                 f"loss {c.loss.name} uses P x K batches, but data.p x data.k = {d.p} x {d.k} = {int(d.p) * int(d.k)} is "
                 f"not data.batch_size = {d.batch_size}; set them so that P*K == batch size")
        _require(int(d.k) >= 2 and int(d.p) >= 2, f"P x K batches need P >= 2 classes and K >= 2 images each, got {d.p} x {d.k}")
    lo, hi = d.rrc_scale
    _require(0 < lo <= hi <= 1, f"data.rrc_scale must satisfy 0 < low <= high <= 1, got {tuple(d.rrc_scale)}")
    _require(0 < float(d.eval_crop_fraction) <= 1, f"data.eval_crop_fraction must be in (0, 1], got {d.eval_crop_fraction}")
    _require(o.name in ("adamw", "sgd"), f"optimizer.name must be 'adamw' or 'sgd', got {o.name!r}")
    _require(float(o.learning_rate) > 0, f"optimizer.learning_rate must be positive, got {o.learning_rate}")
    _require(0 <= float(o.ema_decay) < 1, f"optimizer.ema_decay must be in [0, 1), got {o.ema_decay}")
    _require(int(t.num_steps) > 0 or float(t.num_epochs) > 0, "set train.num_epochs or train.num_steps to a positive number")
    if int(t.num_steps) > 0:
        _require(int(o.warmup_steps) < int(t.num_steps), f"optimizer.warmup_steps = {o.warmup_steps} is not shorter than "
                 f"train.num_steps = {t.num_steps}; lower the warmup or train longer")
    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _require(int(t[key]) >= 1, f"train.{key} must be at least 1, got {t[key]}")
    _require(t.best_metric in METRIC_NAMES or str(t.best_metric).startswith("recall_at_"),
             f"train.best_metric must be one of {', '.join(METRIC_NAMES)} or recall_at_K, got {t.best_metric!r}")
    _require(t.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite must be 'stop' or 'skip', got {t.on_nonfinite!r}")
    _require(all(int(k) >= 1 for k in t.eval_ks), f"train.eval_ks must be positive, got {tuple(t.eval_ks)}")


def check_workdir(c: ml_collections.ConfigDict, workdir: Path) -> None:
    """A workdir belongs to one run: resuming it with another variant or embedding size would mix two models."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} exists and is not a directory")
    try:  # fail now, not after minutes of loading and compiling, when the workdir cannot take files
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_test_{jax.process_index()}_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir} is not writable ({e.strerror or e}); choose a directory you can write "
                          f"to (on a pod: storage every host reaches)") from None
    run_file = workdir / "run.json"
    if not run_file.is_file():
        return
    previous = json.loads(run_file.read_text()).get("config", {}).get("model", {})
    for key in ("variant", "embedding_dim", "v2_output_stride"):
        if key in previous and previous[key] != c.model[key]:
            raise ConfigError(
                f"--workdir {workdir} holds a run with model.{key} = {previous[key]!r}, but this config has "
                f"{c.model[key]!r}; use a new --workdir (or the matching config to resume that run)"
            )
