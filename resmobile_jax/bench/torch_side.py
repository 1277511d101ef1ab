"""The PyTorch side: the reference ResMobileNet built from torchvision modules, doing the same work as the JAX side.

Same inputs (uint8 NHWC, normalized inside the timed call), channels_last, same optimizer work per step (AdamW with
weight decay on kernels only, the proxies with their own AdamW, gradient clipping per group, BN and EMA updates).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from resmobile_jax.bench.jax_side import NUM_CLASSES, synthetic_batch
from resmobile_jax.convert.torch_reference import build_reference
from resmobile_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_device_description() -> str:
    """'cuda (NVIDIA H100 80GB HBM3)' or 'cpu': where the PyTorch side runs."""
    device = _device()
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Normalize:
    """uint8 NHWC -> float NCHW in channels_last memory (the permute of an NHWC tensor already is channels_last)."""

    def __init__(self, device):
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255.0

    def __call__(self, images_u8):
        return (images_u8.permute(0, 3, 1, 2).float() - self.mean) / self.std


def _autocast(device, dtype: str):
    if dtype == "float32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _maybe_compile(model, compile_model: bool):
    return torch.compile(model) if compile_model else model


def _timed_first_call(call) -> float:
    """Seconds of the first call: torch.compile's compile time (eager: one ordinary call)."""
    t = time.perf_counter()
    call()
    return round(time.perf_counter() - t, 2)


def inference_calls(variant, size, batch_sizes, dtype: str, compile_model: bool = False) -> dict:
    """{batch size: (call, first call's seconds)}: call() embeds a batch of uint8 images (normalization included)
    and returns when done; the first call (torch.compile's compile) is made here."""
    device = _device()
    normalize = _Normalize(device)
    model = build_reference(variant).to(device).to(memory_format=torch.channels_last).eval()
    fn = _maybe_compile(model, compile_model)
    rng = np.random.default_rng(0)
    calls = {}
    for b in batch_sizes:
        images = torch.from_numpy(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)).to(device)

        def call(images=images):
            with torch.inference_mode(), _autocast(device, dtype):
                fn(normalize(images))
            _sync(device)

        calls[b] = (call, _timed_first_call(call))
    return calls


def train_call(variant, size, batch, config, dtype: str, compile_model: bool = False):
    """(call, first call's seconds, device MB): call() runs one optimizer step and returns its loss; hyperparameters
    from the JAX side's config so both do the same arithmetic. Device MB: on CUDA, the allocator's peak above its
    level at entry over the setup and the first step (model, optimizer and EMA state, activations); None on CPU,
    where the bench's RSS figure is the memory measure."""
    device = _device()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    opt = config.optimizer
    normalize = _Normalize(device)
    model = build_reference(variant, int(config.model.embedding_dim)).to(device).to(memory_format=torch.channels_last).train()
    proxies = torch.nn.Parameter(torch.randn(NUM_CLASSES, int(config.model.embedding_dim), device=device)
                                 * math.sqrt(2.0 / NUM_CLASSES))
    params = list(model.parameters())
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    lr = float(opt.learning_rate)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": float(opt.weight_decay)},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(opt.b1, opt.b2))
    proxy_optimizer = torch.optim.AdamW([proxies], lr=lr * float(opt.loss_lr_multiplier), weight_decay=0.0)
    ema = [p.detach().clone() for p in params]
    ema_decay = float(opt.ema_decay)
    forward = _maybe_compile(model, compile_model)
    data = synthetic_batch(batch, size)  # the arrays the JAX train step gets
    images = torch.from_numpy(data["image"]).to(device)
    labels = torch.from_numpy(data["label"].astype(np.int64)).to(device)

    def call():
        with _autocast(device, dtype):
            emb = forward(normalize(images))
            logits = F.normalize(emb.float(), dim=-1) @ F.normalize(proxies, dim=-1).T / 0.05
            loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        proxy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(opt.grad_clip_norm))
        torch.nn.utils.clip_grad_norm_([proxies], float(opt.grad_clip_norm))
        optimizer.step()
        proxy_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - ema_decay)
        _sync(device)
        return loss

    first_seconds = _timed_first_call(call)
    device_mb = (torch.cuda.max_memory_allocated() - base) / 1e6 if device.type == "cuda" else None
    return call, first_seconds, device_mb


def loss_is_finite(loss) -> bool:
    return bool(torch.isfinite(loss).item())
