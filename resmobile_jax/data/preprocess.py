"""Per-image preprocessing on the host (decode, to RGB, crop, resize, flip) and normalization on the device.

Images leave the host as uint8 (4x less to transfer than float32); `normalize` runs inside the jitted steps. Random
augmentation parameters are drawn for the *global* batch from a generator seeded by (seed, epoch, batch), so every
process count produces the same augmented images (multi-host runs equal single-host ones).
"""

from __future__ import annotations

import dataclasses
import io
import math

import jax.numpy as jnp
import numpy as np
from PIL import Image

from resmobile_jax.data.sources import MAX_IMAGE_PIXELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RRC_ATTEMPTS = 10

Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS  # PIL raises DecompressionBombError above this instead of decoding


def normalize(images: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
    """uint8 RGB -> (x / 255 - ImageNet mean) / ImageNet std, the input torchvision models expect."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, 16/32-bit scaled to 8 bits, CMYK/palette/gray converted."""
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)  # animated GIF/WebP/PNG: the first frame
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def decode(item) -> Image.Image:
    """A uint8 array (H, W[, C]), encoded bytes, or a file path -> RGB PIL image."""
    if isinstance(item, np.ndarray):
        return to_rgb(Image.fromarray(item))
    if isinstance(item, (bytes, bytearray)):
        return to_rgb(Image.open(io.BytesIO(item)))
    with Image.open(item) as im:
        im.load()  # decode now: an RGB file comes back from to_rgb unconverted, still lazy, and the file closes here
        return to_rgb(im)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    height: int
    width: int
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    eval_crop_fraction: float = 0.875  # resize so the center crop is this fraction of the shorter side (224/256)

    def random_params(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """(batch, RRC_ATTEMPTS * 4 + 1) uniforms: per attempt (scale, log-ratio, x, y), then the flip coin."""
        return rng.random((batch, RRC_ATTEMPTS * 4 + 1))

    def _rrc_box(self, w: int, h: int, u: np.ndarray) -> tuple[float, float, float, float]:
        """torchvision RandomResizedCrop.get_params, driven by pre-drawn uniforms."""
        area = w * h
        log_lo, log_hi = math.log(self.rrc_ratio[0]), math.log(self.rrc_ratio[1])
        for a in range(RRC_ATTEMPTS):
            us, ur, ux, uy = u[4 * a: 4 * a + 4]
            target = area * (self.rrc_scale[0] + us * (self.rrc_scale[1] - self.rrc_scale[0]))
            ratio = math.exp(log_lo + ur * (log_hi - log_lo))
            cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(ux * (w - cw + 1)), int(uy * (h - ch + 1))
                return x0, y0, x0 + cw, y0 + ch
        return self._center_box(w, h, 1.0)  # fallback: the whole image, clipped to the allowed ratios

    def _center_box(self, w: int, h: int, fraction: float):
        s = min(w / self.width, h / self.height) * fraction
        cw, ch = self.width * s, self.height * s
        x0, y0 = (w - cw) / 2, (h - ch) / 2
        return x0, y0, x0 + cw, y0 + ch

    def _resize(self, im: Image.Image, box) -> np.ndarray:
        out = im.resize((self.width, self.height), Image.BILINEAR, box=box)
        return np.asarray(out, dtype=np.uint8)

    def train_image(self, item, u: np.ndarray) -> np.ndarray:
        im = decode(item)
        x = self._resize(im, self._rrc_box(im.width, im.height, u))
        return x[:, ::-1] if self.flip and u[-1] < 0.5 else x

    def eval_image(self, item) -> np.ndarray:
        im = decode(item)
        return self._resize(im, self._center_box(im.width, im.height, self.eval_crop_fraction))
