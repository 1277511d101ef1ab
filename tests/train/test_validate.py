"""Bad configs, workdirs and datasets: one clear message each, before anything compiles."""

import json

import numpy as np
import pytest
from PIL import Image

from configs.v1 import get_config as v1_config
from configs.v2 import get_config
from resmobile_jax.data.idx import DatasetError
from resmobile_jax.data.protocols import load_splits
from resmobile_jax.train.validate import ConfigError, check_config, check_workdir


def _set(config, dotted, value):
    *path, last = dotted.split(".")
    node = config
    for p in path:
        node = node[p]
    node[last] = value


CASES = [
    ("model.embedding_dim", 0, "embedding_dim must be a positive integer"),
    ("model.input_size", 16, "smaller than ResMobileNet v2's output stride 32"),
    ("model.variant", "v3", "unknown model variant 'v3'"),
    ("data.p", 5, "P x K"),
    ("data.batch_size", 1, "at least 2"),
    ("loss.name", "softmax_plus", "unknown loss.name"),
    ("loss.hparams", "margin=0.2", "has no hyperparameter 'margin'"),
    ("loss.hparams", "temperature=cold", "is not a number"),
    ("data.protocol", "open_set", "unknown data.protocol"),
    ("optimizer.name", "lamb", "optimizer.name must be"),
    ("train.best_metric", "accuracy", "train.best_metric must be"),
    ("data.rrc_scale", (0.0, 1.0), "rrc_scale"),
    ("model.depthwise_impl", "fast", "model.depthwise_impl must be one of auto, xla, shifted, cpu_kernel"),
    ("model.stem_conv_impl", "onednn", "model.stem_conv_impl must be one of auto, xla, cpu_kernel"),
    ("model.pointwise_impl", "gemm", "model.pointwise_impl must be one of matmul, conv"),
    ("model.batch_norm_impl", "fused", "model.batch_norm_impl must be one of auto, xla, cpu_kernel"),
]


@pytest.mark.parametrize("key,value,message", CASES, ids=[c[0] + "=" + str(c[1]) for c in CASES])
def test_bad_config_values(key, value, message):
    c = get_config()
    _set(c, key, value)
    if key == "data.p":
        c.loss.name = "triplet"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(c)


def test_warmup_longer_than_run():
    c = get_config()
    c.train.num_steps, c.optimizer.warmup_steps = 100, 200
    with pytest.raises(ConfigError, match="warmup_steps = 200 is not shorter than train.num_steps = 100"):
        check_config(c)


@pytest.mark.parametrize("key", ["depthwise_impl", "batch_norm_impl"])
def test_cpu_kernel_needs_float32(key):
    c = get_config()
    c.model[key], c.model.dtype = "cpu_kernel", "bfloat16"
    with pytest.raises(ConfigError, match=f"{key}='cpu_kernel' computes in float32, but model.dtype is 'bfloat16'"):
        check_config(c)


def test_default_configs_pass():
    check_config(get_config())
    check_config(get_config("accel"))


def test_workdir_of_the_other_variant(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"config": v1_config().to_dict()}))
    with pytest.raises(ConfigError, match="holds a run with model.variant = 'v1'"):
        check_workdir(get_config(), tmp_path)
    check_workdir(v1_config(), tmp_path)  # resuming the same variant is fine


def _image(path, color=(200, 10, 10), size=(20, 24), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)


def _folder_config(root, **kw):
    c = get_config()
    c.data.dataset, c.data.folder = "folder", str(root)
    for k, v in kw.items():
        c.data[k] = v
    return c.data


def test_folder_dataset_split_and_bad_files(tmp_path):
    for cls, color in (("cat", (250, 0, 0)), ("dog", (0, 250, 0)), ("owl", (0, 0, 250))):
        for i in range(5):
            _image(tmp_path / cls / f"{i}.png", color)
    _image(tmp_path / "owl" / "gray.jpg", mode="L")
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "dog" / "empty.png").write_bytes(b"")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"junk")
    full = Image.new("RGB", (64, 64), (1, 2, 3))
    full.save(tmp_path / "owl" / "whole.jpg")
    data = (tmp_path / "owl" / "whole.jpg").read_bytes()
    (tmp_path / "owl" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    splits = load_splits(_folder_config(tmp_path), seed=0)
    bad = {p.split("/")[-1] for p, _ in splits.bad_files}
    assert bad == {"broken.jpg", "empty.png", "notes.txt", "truncated.jpg"}
    assert splits.train.class_names == ["cat", "dog", "owl"]
    assert len(splits.train) + len(splits.eval) == 5 + 5 + 7
    assert set(np.unique(splits.eval.labels)) == {0, 1, 2}  # stratified: every class in both
    again = load_splits(_folder_config(tmp_path), seed=0)
    assert list(again.eval.images) == list(splits.eval.images)  # deterministic


def test_folder_with_empty_or_single_image_class(tmp_path):
    for i in range(3):
        _image(tmp_path / "a" / f"{i}.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="hold no image files.*empty"):
        load_splits(_folder_config(tmp_path), seed=0)
    (tmp_path / "empty").rmdir()
    _image(tmp_path / "lonely" / "0.png")
    with pytest.raises(DatasetError, match="single image.*lonely"):
        load_splits(_folder_config(tmp_path), seed=0)


def test_unknown_tfds_name(tmp_path):
    c = get_config()
    c.data.dataset, c.data.data_dir = "no_such_dataset_xyz", str(tmp_path)
    with pytest.raises(DatasetError, match="'no_such_dataset_xyz' is not a TFDS catalog dataset"):
        load_splits(c.data, seed=0)


def test_single_class_evaluation_set(tmp_path):
    for cls in ("a", "b"):
        for i in range(4):
            _image(tmp_path / cls / f"{i}.png")
    with pytest.raises(DatasetError, match="evaluation set .* has 1 class"):
        load_splits(_folder_config(tmp_path, protocol="class_disjoint", train_classes=1), seed=0)


@pytest.mark.parametrize("flag,message", [
    ("--config.model.embeding_dim=128", "embeding_dim"),  # a typo: unknown key
    ("--config.model.embedding_dim=big", "embedding_dim"),  # wrong type
])
def test_unknown_key_and_wrong_type_on_the_command_line(flag, message, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "train.py", "--config", "configs/v1.py", "--workdir", str(tmp_path / "run"), flag],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
