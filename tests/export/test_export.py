"""Exports of V1 and V2 compute what the models compute: LiteRT against the JAX model, ONNX against the torchvision-built
PyTorch reference, both on real Fashion-MNIST evaluation images; bad input gets a clear message."""

import json

import numpy as np
import pytest
import torch  # before TensorFlow: torchvision's native library cannot load after TensorFlow's in one process

from resmobile_jax.checkpoint import save_model
from resmobile_jax.convert.core import torch_to_flax
from resmobile_jax.convert.torch_reference import build_reference, randomize
from resmobile_jax.models import build_model

DIM = 64
SIZE = 32


def converted_checkpoint(directory, variant, seed=1):
    """A converted checkpoint with random weights and random BN statistics (fresh BN would hide mapping errors),
    and the PyTorch model it came from."""
    reference = randomize(build_reference(variant, DIM, seed=seed), seed).eval()
    model = build_model({"variant": variant, "embedding_dim": DIM})
    torch_to_flax({k: v.numpy() for k, v in reference.state_dict().items()}, model)
    save_model(directory, model, {"variant": variant, "embedding_dim": DIM, "v2_output_stride": 32})
    return directory, model, reference


def real_crops(n=16):
    """The first n Fashion-MNIST test images as the 32x32 RGB uint8 crops evaluation feeds the model."""
    from resmobile_jax.data.idx import load_fashion_mnist
    from resmobile_jax.data.preprocess import Preprocess

    images, _ = load_fashion_mnist("test")
    pp = Preprocess(SIZE, SIZE)
    return np.stack([pp.eval_image(x) for x in images[:n]])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_export_round_trip(tmp_path, variant):
    from resmobile_jax.data.preprocess import normalize
    from resmobile_jax.export.__main__ import run_export
    from resmobile_jax.export.check import FORMATS, TOLERANCE
    from resmobile_jax.export.onnx import OnnxRunner
    from resmobile_jax.export.tflite import TFLiteRunner

    ckpt, model, reference = converted_checkpoint(tmp_path / "ckpt", variant)
    record = run_export(ckpt, tmp_path / "export", check_images=200, progress=False, timing_budget_seconds=0.2)
    assert set(record["formats"]) == set(FORMATS) and record["check_images"] == 200
    assert json.loads((tmp_path / "export" / "export.json").read_text()) == record
    assert "| tflite_int8 (LiteRT) |" in (tmp_path / "export" / "export.md").read_text()
    for fmt, r in record["formats"].items():
        assert (tmp_path / "export" / r["file"]).stat().st_size / 1e6 == pytest.approx(r["size_mb"])
        assert r["batch_1"]["median_ms"] > 0
        if fmt in TOLERANCE:  # fp32 exports: the stated tolerance (P@1 of random weights is chance level, and
            assert TOLERANCE[fmt] <= r["tolerance"] <= 1e-3
            assert r["max_abs_diff"] <= r["tolerance"] and r["verdict"].startswith("ok")  # near-ties flip: not compared)
    formats = record["formats"]
    assert formats["tflite_fp16"]["max_abs_diff"] < 5e-3
    assert formats["tflite_int8"]["size_mb"] < 0.4 * formats["tflite_fp32"]["size_mb"]  # int8 weights
    assert formats["tflite_fp16"]["size_mb"] < 0.6 * formats["tflite_fp32"]["size_mb"]

    # Independently of the export's own check: the files, run by their runtimes on real images, against the models.
    crops = real_crops()
    jax_emb = np.asarray(model(normalize(crops)))
    tfl = TFLiteRunner(tmp_path / "export" / formats["tflite_fp32"]["file"])(crops)
    np.testing.assert_allclose(tfl, jax_emb, atol=1e-5)
    with torch.no_grad():
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        torch_emb = reference((torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - mean) / std).numpy()
    onnx_emb = OnnxRunner(tmp_path / "export" / formats["onnx"]["file"])(crops)
    np.testing.assert_allclose(onnx_emb, torch_emb, atol=1e-5)
    assert OnnxRunner(tmp_path / "export" / formats["onnx"]["file"])(crops[:3]).shape == (3, DIM)  # dynamic batch


def test_unknown_variant_is_refused_with_a_clear_message(tmp_path):
    from resmobile_jax.export.__main__ import run_export

    ckpt = tmp_path / "ckpt"
    save_model(ckpt, build_model({"variant": "v1", "embedding_dim": 8}), {"variant": "v1", "embedding_dim": 8})
    meta = json.loads((ckpt / "metadata.json").read_text())
    meta["model"]["variant"] = "v3"
    (ckpt / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"names model variant 'v3', which this version of resmobile_jax does not know "
                                         r"\(it builds v1, v2\)"):
        run_export(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_not_a_checkpoint_and_earlier_export(tmp_path):
    from resmobile_jax.export.__main__ import run_export

    with pytest.raises(ValueError, match="is neither a training run .* nor a model checkpoint"):
        run_export(tmp_path, progress=False)
    ckpt = tmp_path / "ckpt"
    save_model(ckpt, build_model({"variant": "v1", "embedding_dim": 8}), {"variant": "v1", "embedding_dim": 8})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "export.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds an export"):
        run_export(ckpt, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="unknown export format"):
        run_export(ckpt, tmp_path / "out2", formats=["tflite_int4"], check_images=20, progress=False)
