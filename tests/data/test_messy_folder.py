"""A user's messy image folder, built from real image bytes: every problem file is reported once, the usable ones
(in any PIL mode) train and evaluate through the real pipeline for a whole epoch, and 'error' mode refuses clearly."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs.v1 import get_config
from resmobile_jax.data.pipeline import TrainBatches, eval_batches
from resmobile_jax.data.preprocess import Preprocess
from resmobile_jax.data.protocols import load_splits
from resmobile_jax.train.loop import BAD_FILES, _report_bad_files


def _rgb(seed, size=(24, 20)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def build_messy_folder(root: Path) -> tuple[set[str], int]:
    """(names of the files that must be reported, number of usable images)."""
    good = 0
    for cls in ("boots", "coats", "hats"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            _rgb(i + 10 * len(cls)).save(root / cls / f"{i}.png")
            good += 1
    d = root / "coats"
    _rgb(1).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) * 100)).save(d / "sixteen_bit.png")
    frames = [_rgb(s) for s in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    _rgb(2).convert("P").save(d / "palette.png")
    Image.new("LA", (24, 20), (90, 128)).save(d / "gray_alpha.png")
    _rgb(3).save(d / "photo.webp")
    good += 6
    h = root / "hats"
    Image.new("1", (20000, 20000)).save(h / "huge.png")  # 400M pixels, a few kB on disk: a decompression bomb
    (h / "zero.jpg").write_bytes(b"")
    (h / "not_an_image.png").write_bytes(b"%PDF-1.4 this is a pdf")
    _rgb(5).save(h / "whole.jpg")
    data = (h / "whole.jpg").read_bytes()
    (h / "truncated.jpg").write_bytes(data[: len(data) // 3])
    good += 1  # whole.jpg
    (h / "README.txt").write_text("notes")
    (h / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored, not reported
    os.symlink(h, h / "loop")  # a directory symlink pointing at its parent: must not be walked forever
    os.symlink(h / "self.png", h / "self.png")  # a symlink to itself
    _rgb(6).save(os.path.join(os.fsencode(h), b"caf\xe9.png"), "PNG")  # Latin-1 bytes: not a valid UTF-8 name
    good += 1
    bad = {"huge.png", "zero.jpg", "not_an_image.png", "truncated.jpg", "README.txt", "self.png"}
    return bad, good


def config(root, **kw):
    c = get_config()
    c.data.dataset, c.data.folder, c.data.test_fraction = "folder", str(root), 0.25
    for k, v in kw.items():
        c.data[k] = v
    return c


def test_messy_folder_is_reported_once_and_trains_for_a_whole_epoch(tmp_path):
    bad, good = build_messy_folder(tmp_path / "data")
    c = config(tmp_path / "data")
    splits = load_splits(c.data, c.seed)
    reported = [os.path.basename(p) for p, _ in splits.bad_files]
    assert sorted(reported) == sorted(bad)  # each once
    assert len(splits.train) + len(splits.eval) == good
    workdir = tmp_path / "run"
    workdir.mkdir()
    _report_bad_files(splits, workdir, "skip")
    listed = (workdir / BAD_FILES).read_bytes().decode("utf-8", "surrogateescape").splitlines()
    assert len(listed) == len(bad) and all("\t" in line for line in listed)
    huge = next(line for line in listed if "huge.png" in line)
    assert "limit" in huge and "400000000" in huge.replace(",", "")  # refused from the header, never decoded

    p = Preprocess(16, 16, (0.5, 1.0))
    batches = TrainBatches(splits.train, p, 4, 0, None)
    seen = sum(len(b["label"]) for b in batches.iterate(0, batches.steps_per_epoch))  # decodes every file once
    assert seen == 4 * batches.steps_per_epoch
    for batch, real in eval_batches(splits.eval, p, 4):
        assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert os.fsdecode(b"caf\xe9.png") in {os.path.basename(f) for f in [*splits.train.images, *splits.eval.images]}


def test_error_mode_refuses_before_training(tmp_path):
    build_messy_folder(tmp_path / "data")
    c = config(tmp_path / "data", on_bad_file="error")
    splits = load_splits(c.data, c.seed)
    workdir = tmp_path / "run"
    workdir.mkdir()
    with pytest.raises(ValueError, match=r"6 file\(s\) in the dataset were not usable images; listed in .*on_bad_file='error'"):
        _report_bad_files(splits, workdir, "error")
    assert len((workdir / BAD_FILES).read_text(errors="surrogateescape").splitlines()) == 6
