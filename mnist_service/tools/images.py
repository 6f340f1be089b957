"""Test images as users send them: noise, real digits drawn black on white, pixel lists."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_service.training.data import load_split

DATA_DIR = Path("data/mnist")


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_image(size: int = 28, seed: int = 0) -> Image.Image:
    """Uniform random grey noise, as the original utils made: the model must answer, not crash."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")


def user_digit(
    digit: np.ndarray, scale: int = 8, canvas: tuple[int, int] = (400, 300), offset: tuple[int, int] = (30, 20)
) -> Image.Image:
    """An MNIST digit as a user would photograph or export it: black ink on white, larger, off-centre."""
    big = Image.fromarray(255 - digit, mode="L").resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)
    page = Image.new("L", canvas, 255)
    page.paste(big, offset)
    return page


def test_digit(index: int = 0, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, int]:
    """Image `index` of the bundled official test set, with its label."""
    split = load_split(data_dir, "test")
    if not 0 <= index < len(split.labels):
        raise IndexError(f"index must be in 0..{len(split.labels) - 1}")
    return split.images[index], int(split.labels[index])
