"""Decoding image files: every way an image can reach the pipeline gives the pixels PIL itself decodes."""


import numpy as np
import pytest
from PIL import Image

from resmobile_jax.data.preprocess import Preprocess, decode


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp")])
def test_rgb_file_path_bytes_and_array_decode_to_the_same_pixels(tmp_path, fmt, ext):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / f"x.{ext}"
    Image.fromarray(pixels).save(path, fmt)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    from_path = np.asarray(decode(str(path)))  # the file is closed by then: pixels must already be loaded
    assert from_path.shape == (20, 30, 3) and np.array_equal(from_path, expected)
    assert np.array_equal(np.asarray(decode(path.read_bytes())), expected)
    assert np.array_equal(np.asarray(decode(expected)), expected)


def test_train_and_eval_crops_of_a_file(tmp_path):
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "flat.png")
    p = Preprocess(16, 16, (0.5, 1.0))
    u = p.random_params(np.random.default_rng(0), 1)[0]
    assert p.train_image(str(tmp_path / "flat.png"), u).shape == (16, 16, 3)
    assert (p.eval_image(str(tmp_path / "flat.png")) == 200).all()
