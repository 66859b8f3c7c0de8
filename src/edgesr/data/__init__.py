"""Small real photographs shipped with the package (see images/README.md for sources)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_DIR = Path(__file__).parent / "images"


def image_names() -> list[str]:
    return sorted(p.stem for p in IMAGE_DIR.glob("*.png"))


@lru_cache(maxsize=None)
def load_image(name: str) -> np.ndarray:
    """An (H, W, 3) float32 RGB image in [0, 1]."""
    path = IMAGE_DIR / f"{name}.png"
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: str | Path) -> np.ndarray:
    """Any RGB image file as (H, W, 3) float32 in [0, 1]."""
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def fit_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop ``img`` to (height, width); upscale first (bicubic) if it is smaller."""
    h, w = img.shape[:2]
    if h < height or w < width:
        f = max(height / h, width / w)
        size = (max(width, round(w * f)), max(height, round(h * f)))
        pil = Image.fromarray((img * 255).round().astype(np.uint8)).resize(size, Image.BICUBIC)
        img = np.asarray(pil, dtype=np.float32) / 255.0
        h, w = img.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return np.ascontiguousarray(img[top : top + height, left : left + width])


def sample_input(height: int, width: int, name: str | None = None) -> np.ndarray:
    """A real photograph as a (1, 3, height, width) float32 NCHW array in [0, 1]."""
    img = fit_image(load_image(name or image_names()[0]), height, width)
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None])


def random_input(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A seeded uniform-noise (1, 3, height, width) float32 NCHW array in [0, 1]."""
    return np.random.default_rng(seed).random((1, 3, height, width), dtype=np.float32)
