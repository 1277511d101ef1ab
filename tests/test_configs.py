import subprocess
import sys

import pytest

from configs import v1, v2


def _flatten(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("preset", [None, "cpu", "accel"])
def test_v1_and_v2_differ_only_in_the_stem(preset):
    a, b = _flatten(v1.get_config(preset)), _flatten(v2.get_config(preset))
    assert {k for k in a if a[k] != b[k]} == {"model.variant"}
    assert (a["model.variant"], b["model.variant"]) == ("v1", "v2")


def test_presets():
    assert v2.get_config().model.input_size == 32 and v2.get_config("accel").model.input_size == 224
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        v2.get_config("huge")


def test_train_py_parses_config_and_overrides(tmp_path):
    """Overrides reach train_and_evaluate (an invalid one is refused with its own message, before anything loads)."""
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/v2.py:accel", "--workdir", str(tmp_path),
         "--config.model.embedding_dim=0"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0 and "model.embedding_dim must be a positive integer, got 0" in proc.stderr
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/v2.py", "--workdir", str(tmp_path),
                           "--config.model.no_such_key=1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
