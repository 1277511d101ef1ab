"""python -m resmobile_jax.evaluate: reproduces a run's final metrics, evaluates a converted torchvision checkpoint
end to end (convert -> evaluate, checked against the PyTorch model's own embeddings), and refuses bad input clearly."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from configs.v1 import get_config
from resmobile_jax.convert.torch_reference import build_reference, randomize
from resmobile_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from resmobile_jax.data.protocols import load_splits
from resmobile_jax.evaluate import EvaluationError, evaluate, load_converted, load_run
from resmobile_jax.retrieval import knn, retrieval_metrics
from resmobile_jax.train import train_and_evaluate
from resmobile_jax.train.loop import _preprocess

EVAL_IMAGES = 200


def tiny_config(variant="v1"):
    c = get_config()
    c.model.variant = variant
    c.model.embedding_dim = 32
    c.train.num_steps = 4
    c.data.batch_size, c.data.p, c.data.k = 32, 4, 8
    c.optimizer.warmup_steps = 1
    c.train.checkpoint_every_steps = 2
    c.train.precise_bn_images = 128
    c.train.progress = False
    c.data.max_eval_images = EVAL_IMAGES
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(tiny_config(), str(workdir))
    return workdir


def evaluate_cli(*args):
    return subprocess.run([sys.executable, "-m", "resmobile_jax.evaluate", *args], capture_output=True, text=True,
                          timeout=600)


def test_workdir_reproduces_the_runs_final_metrics(run, tmp_path):
    final = json.loads((run / "final_metrics.json").read_text())
    out = evaluate_cli("--workdir", str(run), "--out", str(tmp_path), "--tsne_points", "100", "--timing_batches", "1",
                       "--timing_batches", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    for k in ("precision_at_1", "map", "map_at_r", "recall_at_5"):
        assert result["metrics"][k] == final[k], k
    assert "| precision_at_1 |" in out.stdout and "best checkpoint, step 4, EMA weights" in out.stdout
    assert set(result["timing"]) >= {"batch_1", "batch_2"} and result["timing"]["batch_1"]["median_ms"] > 0
    assert 0 <= result["cluster_quality"]["kmeans_nmi"] <= 1
    for png in (result["tsne_png"], result["retrieval_grid_png"]):
        with Image.open(tmp_path / png) as im:
            assert im.format == "PNG"


def test_latest_checkpoint_reestimates_bn_like_training_did(run, tmp_path):
    """The latest checkpoint holds the same weights with running-average BN statistics; re-estimating them on the
    same seeded sample gives back exactly what the training evaluation measured."""
    final = json.loads((run / "final_metrics.json").read_text())
    loaded = load_run(run, which="latest")
    assert "latest checkpoint, step 4" in loaded.source and loaded.reestimate_bn
    result = evaluate(loaded, tmp_path, timing=False, draw=False)
    assert result["metrics"]["map"] == pytest.approx(final["map"], abs=1e-6)


def test_load_checkpoint_of_a_run_without_best_writes_reestimated_bn_into_the_model(run, tmp_path):
    """export/embed/search take the model as loaded: a run with only its latest checkpoint gets its BN statistics
    re-estimated once, in the model, and then embeds what training's evaluation measured."""
    from resmobile_jax.evaluate import load_checkpoint

    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("best"))
    final = json.loads((run / "final_metrics.json").read_text())
    loaded = load_checkpoint(copy)
    assert "BN statistics re-estimated" in loaded.source and not loaded.reestimate_bn
    result = evaluate(loaded, tmp_path / "eval", timing=False, draw=False)
    assert result["metrics"]["map"] == pytest.approx(final["map"], abs=1e-6)


def test_no_checkpoint_and_not_a_run(run, tmp_path):
    (tmp_path / "empty").mkdir()
    shutil.copy(run / "run.json", tmp_path / "empty" / "run.json")
    with pytest.raises(EvaluationError, match="has no finished checkpoint yet"):
        load_run(tmp_path / "empty")
    out = evaluate_cli("--workdir", str(tmp_path / "nothing"))
    assert out.returncode == 1 and "error:" in out.stderr and "is not a training run" in out.stderr
    assert "Traceback" not in out.stderr
    out = evaluate_cli("--checkpoint", str(tmp_path / "empty"))
    assert out.returncode == 1 and "is not a resmobile_jax model checkpoint" in out.stderr


def test_other_variant_is_refused(run, tmp_path):
    out = evaluate_cli("--workdir", str(run), "--config", "configs/v2.py", "--out", str(tmp_path))
    assert out.returncode == 1 and "is a ResMobileNet v1 run, but --config is v2" in out.stderr
    assert not (tmp_path / "eval.json").exists()


def _write_folder(root, classes=3, per_class=4):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")


def _convert(tmp_path, torch_model, variant):
    """Saves a reference model's state_dict as .pth and runs `convert to-flax` on it; returns the checkpoint dir."""
    from resmobile_jax.convert.__main__ import main as convert_main

    torch.save(torch_model.state_dict(), tmp_path / "model.pth")
    assert convert_main(["to-flax", str(tmp_path / "model.pth"), "--variant", variant, "--out", str(tmp_path / "ckpt")]) == 0
    return tmp_path / "ckpt"


def test_single_class_evaluation_split(tmp_path):
    _write_folder(tmp_path / "data")
    ckpt = _convert(tmp_path, randomize(build_reference("v1", 32), seed=3), "v1")
    c = tiny_config()
    c.data.dataset, c.data.folder, c.data.protocol, c.data.train_classes = "folder", str(tmp_path / "data"), "class_disjoint", 2
    with pytest.raises(EvaluationError, match="has 1 class; retrieval needs at least 2"):
        evaluate(load_converted(ckpt, c), tmp_path / "out", timing=False, draw=False)
    c.model.variant = "v2"
    with pytest.raises(EvaluationError, match="holds a ResMobileNet v1 checkpoint, but --config is v2"):
        load_converted(ckpt, c)


def _eval_inputs(config):
    """The evaluation images exactly as the model sees them, NHWC float32, and their labels."""
    splits = load_splits(config.data, config.seed)
    pp = _preprocess(config)
    x = np.stack([pp.eval_image(im) for im in splits.eval.images]).astype(np.float32) / 255.0
    return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32), splits.eval.labels


@pytest.mark.slow
def test_convert_then_evaluate_matches_the_pytorch_model(tmp_path):
    """A torchvision-style .pth -> `convert to-flax` -> `evaluate --checkpoint`: the embeddings equal the PyTorch
    model's on the same preprocessed evaluation images, and so does every retrieval ranking that is not a near-tie."""
    x, labels = _eval_inputs(tiny_config("v2"))
    x = torch.from_numpy(x).permute(0, 3, 1, 2)
    torch_model = build_reference("v2", 32, seed=3).eval()
    # At initialization every image lands in a narrow cone of the embedding space; calibrating the head's BatchNorm
    # on these images (as training would) spreads the embeddings so that rankings are well defined.
    captured = []
    hook = torch_model.head.fc.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        torch_model(x)
    hook.remove()
    torch_model.head.bn.running_mean.copy_(captured[0].mean(0))
    torch_model.head.bn.running_var.copy_(captured[0].var(0))
    with torch.no_grad():
        torch_emb = torch_model(x).numpy()
    ckpt = _convert(tmp_path, torch_model, "v2")
    out = evaluate_cli("--checkpoint", str(ckpt), "--config", "configs/v2.py",
                       f"--config.data.max_eval_images={EVAL_IMAGES}", "--nopictures", "--notiming", "--save_embeddings",
                       "--out", str(tmp_path / "eval"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    flax_emb = np.load(tmp_path / "eval" / "embeddings.npz")["embeddings"]
    assert flax_emb.shape == torch_emb.shape == (EVAL_IMAGES, 32)
    np.testing.assert_allclose(flax_emb, torch_emb, atol=1e-4)
    # The reported metrics are those of these embeddings, and equal PyTorch's wherever rankings are not near-ties.
    expected = retrieval_metrics(flax_emb, labels)
    for k in ("precision_at_1", "map", "recall_at_5"):
        assert result["metrics"][k] == expected[k], k
    t_sims, t_idx = knn(torch_emb, k=2)
    _, f_idx = knn(flax_emb, k=1)
    clear = (t_sims[:, 0] - t_sims[:, 1]) > 10 * np.abs(flax_emb - torch_emb).max()
    assert clear.sum() > EVAL_IMAGES // 2
    np.testing.assert_array_equal(f_idx[clear, 0], t_idx[clear, 0])
    torch_metrics = retrieval_metrics(torch_emb, labels)
    assert result["metrics"]["precision_at_1"] == pytest.approx(torch_metrics["precision_at_1"], abs=(~clear).mean())
    assert "converted checkpoint" in result["source"] and "sha256" in result["source"]
