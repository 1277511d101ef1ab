"""embed -> gallery file -> search on a small folder of real Fashion-MNIST images (PNG and JPEG, labelled subfolders
and loose files, plus files that are not images), through the command lines a user types."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from resmobile_jax.checkpoint import save_model
from resmobile_jax.models import build_model

CLASSES = ("trouser", "bag", "sneaker")  # Fashion-MNIST labels 1, 8, 7


def _cli(module, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from resmobile_jax.data.idx import load_fashion_mnist

    root = tmp_path_factory.mktemp("images")
    images, labels = load_fashion_mnist("test")
    for name, label in zip(CLASSES, (1, 8, 7)):
        (root / name).mkdir()
        for j, i in enumerate(np.flatnonzero(labels == label)[:4]):
            Image.fromarray(images[i]).save(root / name / f"{j}.png")
    Image.fromarray(images[0]).convert("RGB").save(root / "loose.jpg", quality=95)  # unlabelled
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _checkpoint(directory, dim, seed):
    model = build_model({"variant": "v1", "embedding_dim": dim}, seed=seed)
    return save_model(directory, model, {"variant": "v1", "embedding_dim": dim, "v2_output_stride": 32})


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, folder):
    work = tmp_path_factory.mktemp("gallery")
    ckpt = _checkpoint(work / "ckpt", 32, seed=0)
    done = _cli("resmobile_jax.embed", "--checkpoint", ckpt, "--images", folder, "--out", work / "g.npz")
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout and "13 embeddings of size 32" in done.stdout and "2 files skipped" in done.stdout
    assert "notes.txt: not an image file" in done.stderr and "broken.png: cannot decode" in done.stderr
    return work, ckpt, work / "g.npz"


def test_gallery_file_holds_paths_labels_and_the_model_fingerprint(gallery, folder):
    from resmobile_jax.checkpoint import load_model, model_fingerprint
    from resmobile_jax.gallery import load_gallery

    _, ckpt, path = gallery
    g = load_gallery(path)
    assert g.embeddings.shape == (13, 32) and g.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(g.embeddings, axis=1), 1.0, atol=1e-5)
    assert g.class_names == sorted(CLASSES)
    by_path = dict(zip(g.paths, g.labels))
    assert by_path[str(folder / "loose.jpg")] == -1
    assert by_path[str(folder / "sneaker" / "2.png")] == sorted(CLASSES).index("sneaker")
    assert g.meta["model_sha256"] == model_fingerprint(load_model(ckpt)[0]) and g.meta["input_hw"] == [32, 32]


def test_every_image_finds_itself_first(gallery, folder):
    work, ckpt, path = gallery
    queries = sorted(str(p) for p in folder.rglob("*") if p.suffix in (".png", ".jpg") and p.name != "broken.png")
    done = _cli("resmobile_jax.search", "--checkpoint", ckpt, "--gallery", path, "--k", 3, "--png", work / "s.png",
                *queries)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    firsts = [[c.strip() for c in r] for r in rows if r[1].strip() == "1"]
    assert len(firsts) == len(queries) == 13
    for (query, _, score, match, _), expected in zip(firsts, queries):
        assert query == match == expected and float(score) == pytest.approx(1.0, abs=1e-4)
    with Image.open(work / "s.png") as im:  # one row per query, query + 3 matches per row
        assert im.format == "PNG" and im.height > im.width


def test_faiss_index_agrees_with_exact_search(gallery, folder):
    pytest.importorskip("faiss")
    from resmobile_jax.search import search

    _, ckpt, path = gallery
    queries = [str(folder / "bag" / "1.png"), str(folder / "loose.jpg")]
    _, _, s_exact, n_exact = search(ckpt, path, queries, k=4)
    _, _, s_faiss, n_faiss = search(ckpt, path, queries, k=4, index="faiss")
    np.testing.assert_array_equal(n_faiss, n_exact)  # 13 items: HNSW is exact at this size
    np.testing.assert_allclose(s_faiss, s_exact, atol=1e-5)
    assert path.with_suffix(".faiss").is_file()


def test_gallery_of_another_model_is_refused(gallery, folder, tmp_path):
    from resmobile_jax.search import search

    _, _, path = gallery
    query = [str(folder / "bag" / "0.png")]
    other_size = _checkpoint(tmp_path / "dim16", 16, seed=0)
    with pytest.raises(ValueError, match="holds 32-d embeddings but .* makes 16-d ones: it was embedded by another "
                                         "model .* re-embed the gallery"):
        search(other_size, path, query)
    same_size = _checkpoint(tmp_path / "seed1", 32, seed=1)
    with pytest.raises(ValueError, match=r"was embedded by another model \(sha256 [0-9a-f]{12}\.\.\. from converted "
                                         r"checkpoint .*similarities between the two would be meaningless"):
        search(same_size, path, query)


def test_bad_queries_and_bad_gallery_files(gallery, folder, tmp_path):
    work, ckpt, path = gallery
    done = _cli("resmobile_jax.search", "--checkpoint", ckpt, "--gallery", path, folder / "notes.txt")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: query {folder / 'notes.txt'} is not an image "
                                                          "this tool can read (cannot decode: UnidentifiedImageError")
    from resmobile_jax.search import search

    with pytest.raises(ValueError, match="does not exist or is not a file"):
        search(ckpt, path, [str(folder / "missing.png")])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="is not a gallery written by python -m resmobile_jax.embed"):
        search(ckpt, tmp_path / "other.npz", [str(folder / "loose.jpg")])
    done = _cli("resmobile_jax.embed", "--checkpoint", ckpt, "--images", folder, "--out", path)
    assert done.returncode == 1 and "exists; pass --overwrite" in done.stderr
