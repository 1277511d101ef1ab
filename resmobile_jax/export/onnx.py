"""Flax -> PyTorch reference (the verified converter) -> ONNX with torch's exporter, and an ONNX Runtime runner.

Going through the torchvision-built reference keeps the exported graph made of the ops the user's own PyTorch
model exports to (Conv, BatchNormalization folded, HardSwish, ...); the check against JAX proves the path end to end.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def missing_requirements() -> str | None:
    """None when ONNX export can run here, else the reason (torch, onnx, onnxscript and onnxruntime are extras)."""
    import importlib.util

    missing = [m for m in ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"ONNX export needs {', '.join(missing)}: pip install -r requirements-export.txt"
    return None


def to_onnx(model, input_hw: tuple[int, int], path: str | os.PathLike) -> Path:
    """Writes `model` (a ResMobileNet) as ONNX: uint8 NHWC images in, embeddings out, dynamic batch.

    torch runs in a child process: torchvision's native library crashes (SIGSEGV) when it loads after TensorFlow's,
    which the data pipeline and the TFLite export have loaded by then."""
    import subprocess
    import sys
    import tempfile

    from safetensors.numpy import save_file

    from resmobile_jax.convert.core import flax_to_torch

    path = Path(path).absolute()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in flax_to_torch(model).items()}, str(weights))
        cmd = [sys.executable, "-m", "resmobile_jax.export.onnx", str(weights), model.variant,
               str(model.embedding_dim), str(model.v2_output_stride), str(input_hw[0]), str(input_hw[1]), str(path)]
        done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"ONNX export failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return path


def _export_in_this_process(weights: str, variant: str, embedding_dim: int, v2_output_stride: int,
                            input_hw: tuple[int, int], path: str) -> None:
    import torch
    from safetensors.torch import load_file

    from resmobile_jax.convert.torch_reference import build_reference
    from resmobile_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD

    reference = build_reference(variant, embedding_dim, v2_output_stride)
    reference.load_state_dict(load_file(weights), strict=True)

    class UInt8NHWC(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255)
            self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255)

        def forward(self, images):
            return self.net((images.permute(0, 3, 1, 2).float() - self.mean) / self.std)

    wrapped = UInt8NHWC(reference).eval()
    example = torch.zeros((2, *input_hw, 3), dtype=torch.uint8)
    with torch.no_grad():
        program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=["images"],
                                    output_names=["embedding"], verbose=False,
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}})
    program.save(path)


class OnnxRunner:
    """Calls an ONNX embedding model in ONNX Runtime (CPU) on uint8 batches of any size."""

    runtime = "ONNX Runtime"

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or os.cpu_count()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"images": np.ascontiguousarray(images, np.uint8)})[0]


if __name__ == "__main__":  # the child process of to_onnx: WEIGHTS VARIANT DIM STRIDE H W OUT
    import sys

    w, v, d, st, h, wd, out = sys.argv[1:]
    _export_in_this_process(w, v, int(d), int(st), (int(h), int(wd)), out)
