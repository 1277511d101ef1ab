"""Shared configuration of every ResMobileNet run; `v1.py` and `v2.py` differ from it only in `model.variant`.

Presets (the string after the colon in `--config configs/v2.py:PRESET`):
  cpu    (default) the embedded Fashion-MNIST run, sized for a 2-core CPU (32 px, 2.5 epochs, ~9-11 minutes per model)
  accel  224 px ImageNet-style resolution and bf16 compute, for a GPU or TPU (point data.* at your dataset)
Any field can be overridden: `--config.model.embedding_dim=256 --config.loss.name=triplet`.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("cpu", "accel")


def get_base_config(variant: str, preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "cpu"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)} (configs/v2.py:cpu)")
    cpu = preset == "cpu"
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.variant = variant
    c.model.embedding_dim = 512
    c.model.input_size = 32 if cpu else 224  # int (square) or (height, width); Fashion-MNIST is 28x28
    c.model.v2_output_stride = 32  # 32: V2 block 2 at stride 1, like V1; 64: keep MobileNetV3's stride 2
    # "auto": xla on GPU/TPU; on CPU cpu_kernel (float32, one device) else shifted | "xla" | "shifted" | "cpu_kernel"
    c.model.depthwise_impl = "auto"
    c.model.pointwise_impl = "matmul"  # 1x1 convs as matmuls (faster gradients on XLA:CPU) | "conv"
    # the stems' convs (and in eval mode the tail's 3x3s): "auto" = cpu_kernel where depthwise gets it, else xla
    c.model.stem_conv_impl = "auto"
    c.model.batch_norm_impl = "auto"  # training-mode BN + activation: "auto" cpu_kernel where it applies | "xla" | "cpu_kernel"
    c.model.fuse_eval_bn = True  # eval mode, C++ kernels: BN, activations, 1x1 convs, SE scale, max pool fused into them
    c.model.fuse_eval_bottleneck = True  # eval mode, C++ kernels, with fuse_eval_bn: each tail bottleneck as one kernel call (8+ images)
    c.model.fuse_eval_small_blocks = True  # eval mode, C++ kernels, 8+ images: narrow inverted residuals (1x1 weights <= 128 KiB) on 64+ pixel maps as kernel calls under 4 MiB too
    c.model.fuse_train_bn = True  # training, C++ kernels: each expansion's BN + activation run inside the depthwise kernels
    c.model.se_kernel_max_images = 4  # eval mode, C++ kernels: SE scale of at most this many images as one C++ call (0: never)
    c.model.pointwise_kernel_max_pixels = 64  # eval mode, C++ kernels: 1x1 conv + BN + act over at most this many pixels as one C++ call (0: never)
    c.model.dtype = "float32" if cpu else "bfloat16"  # compute dtype; params stay param_dtype
    c.model.param_dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "fashion_mnist"  # built in (offline) | "folder" (uses data.folder) | any TFDS catalog name
    c.data.folder = ""  # root/<class>/* (stratified split) or root/{train,test}/<class>/*
    c.data.data_dir = ""  # TFDS data_dir (may be gs://...)
    c.data.manual_dir = ""  # TFDS manual_dir; for fashion_mnist, a folder holding the four *-ubyte.gz files
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.image_key = "image"
    c.data.label_key = "label"
    c.data.protocol = "closed_set"  # or "class_disjoint" (train on some classes, evaluate on unseen ones)
    c.data.train_classes = 0.5  # class_disjoint: fraction (0, 1) or count of the sorted class ids used for training
    c.data.test_fraction = 0.2  # folder without train/test subfolders: stratified share held out for evaluation
    c.data.max_eval_images = 0  # 0 = all; else a stratified subsample (faster periodic evaluation)
    c.data.batch_size = 128  # global batch over all devices and hosts
    c.data.p = 8  # classes per batch for pair losses (P x K == batch_size)
    c.data.k = 16  # images per class per batch
    c.data.rrc_scale = (0.85, 1.0) if cpu else (0.08, 1.0)  # RandomResizedCrop area range
    c.data.flip = True
    c.data.eval_crop_fraction = 1.0 if cpu else 0.875  # center crop = this share of the resized shorter side
    c.data.eval_batch_size = 256
    c.data.workers = 2  # tf.data threads decoding and augmenting
    c.data.on_bad_file = "skip"  # image files that do not decode: "skip" (listed in WORKDIR/bad_files.txt) | "error"

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "normalized_softmax"  # see resmobile_jax/losses: triplet, contrastive, multi_similarity, supcon,
    #                                   ntxent, arcface, cosface, proxy_anchor, normalized_softmax
    c.loss.hparams = ""  # "name=value,..." e.g. --config.loss.hparams=margin=0.2,scale=32; empty: the loss's defaults

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # or "sgd" (nesterov momentum)
    c.optimizer.learning_rate = 5e-3 if cpu else 2e-3  # peak, after warmup
    c.optimizer.warmup_steps = 200 if cpu else 1000
    c.optimizer.final_lr_fraction = 0.01  # cosine decays to this share of the peak
    c.optimizer.weight_decay = 1e-4 if cpu else 0.05  # kernels only, never BatchNorm or biases
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.grad_clip_norm = 5.0  # 0 disables
    c.optimizer.loss_lr_multiplier = 100.0  # learned proxies / class weights: this times the network's LR
    c.optimizer.ema_decay = 0.998 if cpu else 0.9999  # EMA of the weights, used for evaluation; 0 disables

    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 2.5 if cpu else 60.0  # may be fractional
    c.train.num_steps = 0  # > 0 overrides num_epochs
    c.train.log_every_steps = 50
    c.train.eval_every_steps = 0  # 0: evaluate at the end only
    c.train.checkpoint_every_steps = 500
    c.train.keep_checkpoints = 3  # the latest N; the best by train.best_metric is kept separately
    c.train.best_metric = "map"
    c.train.async_checkpoints = True
    c.train.eval_ks = (1, 5, 10)
    c.train.precise_bn_images = 4096  # before each evaluation, re-estimate BatchNorm statistics on this many train
    #                                   images with the current weights (0: keep the running averages)
    c.train.init_from = ""  # a converted checkpoint (python -m resmobile_jax.convert to-flax) or an earlier run's workdir
    c.train.on_nonfinite = "stop"  # NaN/Inf loss or gradient: "stop" (with the last good checkpoint) | "skip" the update
    c.train.progress = True
    return c
