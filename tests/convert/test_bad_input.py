"""Each bad input gets one clear line naming the problem, and nothing is executed or overwritten."""

import pickle

import pytest
import torch
import torchvision

from resmobile_jax.convert.__main__ import main as convert_main
from resmobile_jax.convert.checkpoint_io import CheckpointError, read_state_dict
from resmobile_jax.convert.torch_reference import build_reference


def _error(capsys, argv) -> str:
    assert convert_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ")
    return err


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    src = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), src)
    err = _error(capsys, ["to-flax", str(src), "--variant", "v2", "--out", str(tmp_path / "o")])
    assert "covers only part of ResMobileNet; pass --partial" in err
    src = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), src)
    err = _error(capsys, ["to-flax", str(src), "--variant", "v1", "--out", str(tmp_path / "o")])
    assert "unrecognised checkpoint layout (first keys: classifier.1.bias" in err  # AlexNet's features.* is not MobileNet's
    err = _error(capsys, ["to-flax", str(src), "--variant", "v1", "--out", str(tmp_path / "o"), "--partial"])
    assert "unrecognised checkpoint layout" in err
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_the_other_variant(tmp_path, capsys):
    src = tmp_path / "v1.pth"
    torch.save(build_reference("v1", 32).state_dict(), src)
    err = _error(capsys, ["to-flax", str(src), "--variant", "v2", "--out", str(tmp_path / "o")])
    assert "is a ResMobileNet v1" in err and "--variant v1" in err


def test_missing_and_misshaped_keys_are_listed_by_name(tmp_path, capsys):
    sd = build_reference("v1", 32).state_dict()
    del sd["tail.2.conv2.weight"]
    sd["head.bn.weight"] = torch.ones(7)
    sd["extra.thing"] = torch.zeros(1)
    src = tmp_path / "broken.pth"
    torch.save(sd, src)
    assert convert_main(["to-flax", str(src), "--variant", "v1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing (2): head.bn.scale, tail.2.conv_bn2.conv.kernel" in err
    assert "unexpected (1): extra.thing" in err
    assert "wrong shape (1): head.bn.weight (7,) vs model (32,)" in err


def test_truncated_file(tmp_path, capsys):
    src = tmp_path / "m.pth"
    torch.save(build_reference("v1", 32).state_dict(), src)
    src.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    err = _error(capsys, ["to-flax", str(src), "--variant", "v1", "--out", str(tmp_path / "o")])
    assert "could not be read as a PyTorch checkpoint (truncated or corrupt?)" in err
    st = tmp_path / "m.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    err = _error(capsys, ["to-flax", str(st), "--variant", "v1", "--out", str(tmp_path / "o")])
    assert "not a readable safetensors file" in err
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "is empty (0 bytes)" in _error(capsys, ["to-flax", str(tmp_path / "empty.pth"), "--variant", "v1", "--out", str(tmp_path / "o")])


class _Exploit:
    """Unpickling this would create a file: the classic pickle code-execution payload."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    torch.save({"stem.0.weight": torch.zeros(1), "payload": _Exploit(str(marker))}, src)
    assert not marker.exists()
    err = _error(capsys, ["to-flax", str(src), "--variant", "v1", "--out", str(tmp_path / "o")])
    assert "contains pickled objects other than tensors" in err and "weights_only" in err
    assert not marker.exists()
    # A bare pickle (not torch's zip format) with the same payload.
    raw = tmp_path / "evil2.pt"
    raw.write_bytes(pickle.dumps(_Exploit(str(marker))))
    _error(capsys, ["check", "--variant", "v1", "--checkpoint", str(raw)])
    assert not marker.exists()


def test_pickle_that_is_not_a_state_dict(tmp_path):
    src = tmp_path / "list.pth"
    torch.save([1, 2, 3], src)
    with pytest.raises(CheckpointError, match="holds list, not a state_dict of tensors"):
        read_state_dict(src)
    src = tmp_path / "dict.pth"
    torch.save({"lr": 0.1, "epoch": 3}, src)
    with pytest.raises(CheckpointError, match="not all tensors"):
        read_state_dict(src)


def test_unknown_extension_and_missing_file(tmp_path, capsys):
    (tmp_path / "m.h5").write_bytes(b"x")
    assert "unknown checkpoint extension '.h5'" in _error(capsys, ["to-flax", str(tmp_path / "m.h5"), "--variant", "v1", "--out", str(tmp_path / "o")])
    assert "does not exist" in _error(capsys, ["to-flax", str(tmp_path / "nope.pth"), "--variant", "v1", "--out", str(tmp_path / "o")])


def test_existing_output_is_never_overwritten(tmp_path, capsys):
    src = tmp_path / "m.pth"
    torch.save(build_reference("v1", 32).state_dict(), src)
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    err = _error(capsys, ["to-flax", str(src), "--variant", "v1", "--out", str(out), "--no-verify"])
    assert "already exists and is not empty" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_to_torch_from_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    err = _error(capsys, ["to-torch", str(tmp_path), "--out", str(tmp_path / "x.pth")])
    assert "is not a resmobile_jax model checkpoint" in err
