"""python -m resmobile_jax.convert end to end, on real files on disk."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from resmobile_jax.checkpoint import load_model, model_state_dict, read_metadata
from resmobile_jax.convert.__main__ import main as convert_main
from resmobile_jax.convert.checkpoint_io import sha256
from resmobile_jax.convert.core import flax_to_torch
from resmobile_jax.convert.torch_reference import build_reference, randomize


def _ref_state(variant, dim=64, seed=0):
    return randomize(build_reference(variant, dim), seed).state_dict()


@pytest.mark.parametrize("variant,suffix", [("v1", ".pth"), ("v2", ".safetensors")])
def test_to_flax_then_to_torch_reproduces_the_file(tmp_path, variant, suffix, capsys):
    sd = _ref_state(variant)
    src = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save({f"module.{k}": v for k, v in sd.items()}, src)  # DataParallel prefix is stripped
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    out = tmp_path / "flax"
    assert convert_main(["to-flax", str(src), "--variant", variant, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "loaded 4" in printed and "missing 0; unexpected 0; wrong shape 0" in printed
    meta = read_metadata(out)
    assert meta["model"] == {"variant": variant, "embedding_dim": 64, "v2_output_stride": 32}
    assert meta["source"]["sha256"] == sha256(src)
    assert meta["conversion"]["embedding_max_abs_diff"] <= 1e-5

    model, _ = load_model(out)
    back = tmp_path / f"back{suffix}"
    assert convert_main(["to-torch", str(out), "--out", str(back)]) == 0
    loaded = torch.load(back, weights_only=True) if suffix == ".pth" else __import__("safetensors.torch").torch.load_file(str(back))
    fresh = build_reference(variant, 64)
    fresh.load_state_dict(loaded, strict=True)
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k
    assert set(flax_to_torch(model)) == set(sd)


def test_wrapped_training_checkpoint_is_unwrapped(tmp_path):
    sd = _ref_state("v1")
    src = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in sd.items()}}, src)
    assert convert_main(["to-flax", str(src), "--variant", "v1", "--out", str(tmp_path / "o"), "--no-verify"]) == 0


def test_partial_from_torchvision_mobilenet_v3_large(tmp_path, capsys):
    tv = torchvision.models.mobilenet_v3_large(weights=None)
    randomize(tv, 5)
    src = tmp_path / "mnv3.pth"
    torch.save(tv.state_dict(), src)
    # V1: stem + all 15 mid blocks load; tail and head stay at init.
    assert convert_main(["to-flax", str(src), "--variant", "v1", "--out", str(tmp_path / "v1"), "--partial"]) == 0
    out = capsys.readouterr().out
    assert "loaded   features.0.0.weight -> stem.conv_bn_act.conv.kernel" in out
    assert "skipped  classifier.0.weight (not in target)" in out
    model, meta = load_model(tmp_path / "v1")
    flat = model_state_dict(model)
    np.testing.assert_array_equal(flat["mid.14.project.conv.kernel"], tv.features[15].block[3][0].weight.detach().numpy().transpose(2, 3, 1, 0))
    assert all(k.startswith(("tail.", "head.")) for k in meta["conversion"]["missing"])
    # V2: every mid tensor but block 1's new expand conv, no stem.
    assert convert_main(["to-flax", str(src), "--variant", "v2", "--out", str(tmp_path / "v2"), "--partial"]) == 0
    out = capsys.readouterr().out
    _, meta = load_model(tmp_path / "v2")
    missing_mid = {k for k in meta["conversion"]["missing"] if k.startswith("mid.")}
    assert missing_mid == {k for k in missing_mid if k.startswith("mid.0.expand.")} and missing_mid
    assert "loaded   features.1.block.0.0.weight -> mid.0.depthwise.conv.kernel" in out
    assert "skipped  features.0.0.weight (shape (3, 3, 3, 16) vs target (7, 7, 3, 64))" in out


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_partial_from_torchvision_resnet_loads_the_v2_stem(tmp_path, arch, capsys):
    tv = getattr(torchvision.models, arch)(weights=None)
    randomize(tv, 6)
    src = tmp_path / f"{arch}.pth"
    torch.save(tv.state_dict(), src)
    assert convert_main(["to-flax", str(src), "--variant", "v2", "--out", str(tmp_path / "o"), "--partial"]) == 0
    out = capsys.readouterr().out
    assert "loaded 6 tensors" in out  # conv1 + bn1 (weight, bias, mean, var, count)
    model, _ = load_model(tmp_path / "o")
    flat = model_state_dict(model)
    np.testing.assert_array_equal(flat["stem.conv_bn_act.conv.kernel"], tv.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["stem.conv_bn_act.bn.var"], tv.bn1.running_var.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_check_command_passes_and_prints_json(variant):
    proc = subprocess.run(
        [sys.executable, "-m", "resmobile_jax.convert", "check", "--variant", variant, "--image-size", "96x128", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] and result["embedding_max_abs_diff"] <= 1e-5
    assert list(result["stages"])[:2] == ["stem", "mid.0"] and "tail.5" in result["stages"]


def test_check_with_a_checkpoint_file(tmp_path, capsys):
    src = tmp_path / "m.pth"
    torch.save(_ref_state("v2", dim=32, seed=9), src)
    rc = convert_main(["check", "--variant", "v2", "--checkpoint", str(src), "--image-size", "64"])
    out = capsys.readouterr().out
    assert rc == 0 and "PASS" in out and "mid.14" in out
