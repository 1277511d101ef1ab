"""Analytic counts against DESIGN.md §2's torchvision reference numbers, and against torchvision modules directly."""

import json
import subprocess
import sys

import pytest
import torch
import torchvision

from resmobile_jax.convert.torch_reference import build_reference
from resmobile_jax.profile import profile_model


def torch_macs(module, x) -> int:
    """Independent count on the torch side: forward hooks on every Conv2d and Linear."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, torch.nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        module.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.fixture(scope="module")
def v1():
    return profile_model(dict(variant="v1", embedding_dim=512), 224)


@pytest.fixture(scope="module")
def v2():
    return profile_model(dict(variant="v2", embedding_dim=512), 224, checkpoint_size=False)


def test_v1_matches_torchvision_reference_numbers(v1):
    p = v1["parts"]
    assert (p["stem"]["params"], p["stem"]["macs"]) == (464, 5_419_008)
    assert p["stem"]["params"] + p["mid"]["params"] == 2_816_432  # mobilenet_v3_large features[0:16]
    assert p["stem"]["macs"] + p["mid"]["macs"] == 206_554_560
    assert (p["tail"]["params"], p["tail"]["macs"]) == (6 * 27_680, 6 * 1_332_800)  # Bottleneck(160, 40) at 7x7
    assert p["head"]["params"] == 160 * 512 + 512 + 2 * 512
    assert p["stem"]["output_shape"] == [112, 112, 16] and p["tail"]["output_shape"] == [7, 7, 160]
    assert v1["total"]["checkpoint_mb_on_disk"] > v1["total"]["params_mb_fp32"] * 0.9


def test_v2_stem_is_resnet_conv1(v2):
    stem = v2["parts"]["stem"]
    assert stem["macs"] == 118_013_952 and stem["params"] == 9_408 + 2 * 64
    assert stem["output_shape"] == [56, 56, 64]
    assert v2["parts"]["tail"]["output_shape"] == [7, 7, 160]


@pytest.mark.parametrize("variant,size", [("v1", (224, 224)), ("v2", (160, 96))])
def test_macs_equal_a_torch_hook_count_of_the_reference(variant, size):
    ours = profile_model(dict(variant=variant, embedding_dim=128), size, xla_flops=False, checkpoint_size=False)
    ref = build_reference(variant, 128)
    assert ours["total"]["macs"] == torch_macs(ref, torch.zeros(1, 3, *size))
    assert ours["total"]["params"] == sum(p.numel() for p in ref.parameters())


def test_torchvision_features_count_agrees_with_the_hook_counter():
    """Guards the hook counter itself against torchvision's documented 0.22 GFLOPS (GMACs) for mobilenet_v3_large."""
    macs = torch_macs(torchvision.models.mobilenet_v3_large(weights=None), torch.zeros(1, 3, 224, 224))
    assert round(macs / 1e9, 2) == 0.22


def test_xla_flops_are_reported_separately_and_about_twice_the_macs(v1):
    ratio = v1["total"]["xla_flops"] / v1["total"]["macs"]
    assert 1.9 < ratio < 2.3


@pytest.mark.slow
def test_cli_json():
    proc = subprocess.run([sys.executable, "-m", "resmobile_jax.profile", "--config", "configs/v1.py", "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["input_size"] == [224, 224] and out["variant"] == "v1"
    assert out["parts"]["stem"]["macs"] + out["parts"]["mid"]["macs"] == 206_554_560
    assert "orbax" not in proc.stderr.lower()  # quiet: no per-save INFO logging
