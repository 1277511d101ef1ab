import numpy as np
import pytest

from resmobile_jax.data.sampling import check_pk, pk_batches, shuffled_batches


def _labels():
    # 8 classes of uneven size, plus one class with a single image (cannot provide a positive pair)
    return np.concatenate([np.full(n, c) for c, n in enumerate([40, 30, 25, 20, 12, 9, 5, 3, 1])])


def test_pk_batches_are_class_balanced_and_deterministic():
    labels = _labels()
    batches = pk_batches(labels, p=4, k=3, seed=7, epoch=0)
    assert batches.shape == (len(labels) // 12, 12)
    for row in batches:
        classes, counts = np.unique(labels[row], return_counts=True)
        assert len(classes) == 4 and np.all(counts == 3)
        assert 8 not in classes  # the single-image class never appears
    np.testing.assert_array_equal(batches, pk_batches(labels, 4, 3, seed=7, epoch=0))
    assert not np.array_equal(batches, pk_batches(labels, 4, 3, seed=7, epoch=1))
    assert not np.array_equal(batches, pk_batches(labels, 4, 3, seed=8, epoch=0))


def test_pk_epoch_visits_most_images_once():
    labels = np.repeat(np.arange(10), 50)
    seen = pk_batches(labels, p=5, k=4, seed=0, epoch=0).ravel()
    counts = np.bincount(seen, minlength=len(labels))
    assert np.mean(counts == 1) > 0.8 and counts.max() <= 3


@pytest.mark.parametrize(
    "p,k,batch,message",
    [
        (4, 4, 32, "P x K = 4 x 4 = 16 does not equal the batch size 32"),
        (16, 1, 16, "K = 1: pair losses need at least 2 images"),
        (1, 8, 8, "P = 1: pair losses need at least 2 classes"),
        (12, 2, 24, "P = 12 classes per batch, but the training split has only 9 classes"),
        (9, 2, 18, "only 8 classes have 2 or more images, fewer than P = 9"),
    ],
)
def test_impossible_pk_settings(p, k, batch, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_pk(_labels(), p, k, batch)


def test_shuffled_batches():
    b = shuffled_batches(103, 10, seed=1, epoch=2)
    assert b.shape == (10, 10) and len(set(b.ravel())) == 100
    np.testing.assert_array_equal(b, shuffled_batches(103, 10, seed=1, epoch=2))
    with pytest.raises(ValueError, match="batch size 200 is larger than the 103 training images"):
        shuffled_batches(103, 200, 0, 0)
