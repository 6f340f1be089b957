"""Test images as users send them: noise, real digits drawn black on white, pixel lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mnist_service.data import load_split
from mnist_service.inference.images import noise_image, png_bytes

# png_bytes and noise_image live with the preprocessing they feed; the client tools use them from here too.
__all__ = ["DATA_DIR", "noise_image", "png_bytes", "test_digit", "user_digit"]

DATA_DIR = Path("data/mnist")


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
