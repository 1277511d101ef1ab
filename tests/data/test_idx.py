"""Fashion-MNIST from the real files Debian's dataset-fashion-mnist installs, and broken copies of them."""

import gzip
import shutil

import numpy as np
import pytest

from resmobile_jax.data.idx import DEBIAN_DIR, FILES, DatasetError, load_fashion_mnist, read_idx


def test_real_fashion_mnist_files():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(np.bincount(labels), [6000] * 10)
    test_images, test_labels = load_fashion_mnist("test")
    assert test_images.shape == (10000, 28, 28) and np.array_equal(np.bincount(test_labels), [1000] * 10)
    assert 60 < images.mean() < 90  # real photos of clothes on black, not zeros or noise
    assert len({images[i].tobytes() for i in range(1000)}) == 1000


def test_idx_round_trip_on_a_hand_made_file(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())
    np.testing.assert_array_equal(read_idx(path, 3), arr)


def test_broken_files_give_clear_errors(tmp_path):
    for name in FILES["test"]:
        shutil.copy(f"{DEBIAN_DIR}/{name}", tmp_path / name)
    images_file = tmp_path / FILES["test"][0]
    raw = gzip.decompress(images_file.read_bytes())
    images_file.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DatasetError, match=r"header says \(10000, 28, 28\) but the file holds .* \(truncated\?\)"):
        load_fashion_mnist("test", tmp_path)
    images_file.write_bytes(images_file.read_bytes()[:1000])
    with pytest.raises(DatasetError, match="truncated or not gzip"):
        load_fashion_mnist("test", tmp_path)
    images_file.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + raw[4:]))
    with pytest.raises(DatasetError, match="magic number 2049, expected 2051"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="unknown Fashion-MNIST split 'val'"):
        load_fashion_mnist("val")
