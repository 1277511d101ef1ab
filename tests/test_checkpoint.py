import json

import numpy as np
import pytest

from resmobile_jax.checkpoint import load_model, model_state_dict, save_model
from resmobile_jax.models import build_model


def test_save_and_load_round_trip_on_disk(tmp_path):
    cfg = dict(variant="v2", embedding_dim=16, v2_output_stride=64)
    model = build_model(cfg, seed=7)
    save_model(tmp_path / "ck", model, cfg, {"source": {"sha256": "abc"}})
    assert json.loads((tmp_path / "ck" / "metadata.json").read_text())["source"]["sha256"] == "abc"
    loaded, meta = load_model(tmp_path / "ck")
    assert loaded.output_stride == 64 and meta["model"] == cfg
    a, b = model_state_dict(model), model_state_dict(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_variant_mismatch_and_missing_checkpoint(tmp_path):
    cfg = dict(variant="v1", embedding_dim=8)
    save_model(tmp_path / "ck", build_model(cfg), cfg)
    with pytest.raises(ValueError, match="holds a ResMobileNet v1 checkpoint, but v2 was asked for"):
        load_model(tmp_path / "ck", expect_variant="v2")
    with pytest.raises(FileNotFoundError, match="is not a resmobile_jax model checkpoint"):
        load_model(tmp_path / "nothing")
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(tmp_path / "ck", build_model(cfg), cfg)
