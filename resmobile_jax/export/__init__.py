"""Exporting a trained or converted model to the runtimes edge devices use, each export checked against JAX.

Every exported model has the same interface as `resmobile_jax.embed`: uint8 RGB images (batch, H, W, 3) in, the
ImageNet normalization inside, L2-normalized float32 embeddings (batch, D) out. The batch dimension is dynamic.

- `tflite`: LiteRT (TensorFlow Lite) via jax2tf: float32, float16 weights, int8 dynamic-range weights.
- `onnx`: ONNX via the PyTorch reference (Flax -> torch with the verified converter, then `torch.onnx.export`).
- `check`: max abs difference of embeddings against the JAX model on real images, P@1 on them, batch-1 latency.
"""

from resmobile_jax.export.check import FORMATS, ExportError, export_and_check, format_table

__all__ = ["FORMATS", "ExportError", "export_and_check", "format_table"]
