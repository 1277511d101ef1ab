"""train.init_from: weights from a converted checkpoint or from another run's latest checkpoint; wrong variant refused."""

import json

import jax
import numpy as np
import pytest

from configs.v1 import get_config
from resmobile_jax.checkpoint import model_state_dict, save_model
from resmobile_jax.losses import get_loss
from resmobile_jax.models import build_model
from resmobile_jax.train.checkpoints import RunCheckpoints
from resmobile_jax.train.loop import _initialize_from
from resmobile_jax.train.state import create_train_state, make_optimizers


def assert_same_weights(a, b):
    sa, sb = model_state_dict(a), model_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_from_converted_checkpoint(tmp_path):
    config = get_config()
    source = build_model(config.model, seed=1)
    save_model(tmp_path / "ckpt", source, config.model.to_dict(), {"source": "test"})
    target = build_model(config.model, seed=0)
    assert "converted checkpoint" in _initialize_from(str(tmp_path / "ckpt"), target, "v1")
    assert_same_weights(source, target)
    with pytest.raises(ValueError, match="holds a ResMobileNet v1 checkpoint, but v2 was asked for"):
        _initialize_from(str(tmp_path / "ckpt"), build_model({**config.model.to_dict(), "variant": "v2"}), "v2")


def test_from_an_earlier_run(tmp_path):
    config = get_config()
    source = build_model(config.model, seed=2)
    tx, loss_tx, _ = make_optimizers(config, 1000)
    state = create_train_state(source, config, 10, tx, loss_tx, get_loss("normalized_softmax").uses_proxies)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": config.to_dict()}))
    manager = RunCheckpoints(run, keep=2, async_save=False)
    manager.save(7, jax.device_get(state), {"step": 7, "epoch": 0})
    manager.close()
    target = build_model(config.model, seed=0)
    assert "at step 7" in _initialize_from(str(run), target, "v1")
    assert_same_weights(source, target)
    with pytest.raises(ValueError, match="is a ResMobileNet v1 run, but this run trains v2"):
        _initialize_from(str(run), build_model({**config.model.to_dict(), "variant": "v2"}), "v2")


def test_from_nothing_useful(tmp_path):
    with pytest.raises(ValueError, match="neither a converted checkpoint"):
        _initialize_from(str(tmp_path), build_model(get_config().model), "v1")
