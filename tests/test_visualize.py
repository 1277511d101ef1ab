"""t-SNE / cluster quality / retrieval grid: behaviour on embeddings whose structure is known, PNGs read back."""

import numpy as np
import pytest
from PIL import Image

from resmobile_jax import visualize


def blobs(rng, classes=4, per_class=40, dim=16, spread=0.05):
    centers = np.eye(dim)[:classes] + 0.1  # well separated directions (cosine)
    labels = np.repeat(np.arange(classes), per_class)
    return centers[labels] + spread * rng.standard_normal((len(labels), dim)), labels


def test_stratified_sample_is_balanced_sorted_and_seeded():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    idx = visualize.stratified_sample(labels, 25, seed=3)
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [5] * 5
    np.testing.assert_array_equal(idx, visualize.stratified_sample(labels, 25, seed=3))
    assert not np.array_equal(idx, visualize.stratified_sample(labels, 25, seed=4))
    np.testing.assert_array_equal(visualize.stratified_sample(labels, 1000), np.arange(150))


def test_cluster_quality_separated_vs_shuffled(rng):
    x, labels = blobs(rng)
    good = visualize.cluster_quality(x, labels)
    assert good["silhouette_cosine"] > 0.9
    assert good["kmeans_nmi"] == pytest.approx(1.0)
    bad = visualize.cluster_quality(x, rng.permutation(labels))
    assert abs(bad["silhouette_cosine"]) < 0.1
    assert bad["kmeans_nmi"] < 0.15
    with pytest.raises(ValueError, match="at least 2 classes"):
        visualize.cluster_quality(x, np.zeros(len(x), int))


def test_silhouette_matches_a_hand_worked_example():
    # Two classes on the unit circle: a at 0 and 10 degrees, b at 90 and 100 degrees. Cosine distances:
    # within a class 1 - cos(10deg); across 1 - cos(90deg) = 1 or 1 - cos(80deg) / 1 - cos(100deg).
    ang = np.deg2rad([0, 10, 90, 100])
    x = np.stack([np.cos(ang), np.sin(ang)], 1)
    a = 1 - np.cos(np.deg2rad(10))
    b0 = np.mean([1 - np.cos(np.deg2rad(90)), 1 - np.cos(np.deg2rad(100))])  # point 0 to class b
    b1 = np.mean([1 - np.cos(np.deg2rad(80)), 1 - np.cos(np.deg2rad(90))])  # point 1 to class b
    expected = np.mean([(b0 - a) / b0, (b1 - a) / b1] * 2)  # symmetric: points 2, 3 mirror 1, 0
    q = visualize.cluster_quality(x, np.array([0, 0, 1, 1]))
    assert q["silhouette_cosine"] == pytest.approx(expected, rel=1e-6)


def test_tsne_keeps_separated_classes_apart_and_png_is_written(tmp_path, rng):
    x, labels = blobs(rng, classes=3, per_class=30)
    points = visualize.tsne_2d(x, seed=0)
    assert points.shape == (90, 2)
    # nearest 2-D neighbour of every point is in its own class
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert np.mean(labels[d.argmin(1)] == labels) == 1.0
    path = visualize.save_tsne(tmp_path / "t.png", [("a", points), ("b", points[::-1])], labels, ["x", "y", "z"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 1.5 * im.height  # two panels side by side


def test_retrieval_grid_png(tmp_path, rng):
    images = {i: rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for i in range(6)}
    labels = np.array([0, 0, 1, 1, 0, 1])
    path = visualize.save_retrieval_grid(tmp_path / "g.png", images, labels, np.array([0, 2]),
                                         np.array([[1, 2], [3, 4]]), np.array([[0.9, 0.5], [0.8, 0.1]]), ["a", "b"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.height > 100
