"""Images made in code: a PIL image encoded as an upload's bytes, and grey noise.

The server's warm-up, training's drift reference and the client tools all send images through
the same preprocessing, so these live beside it rather than in one of their callers.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    """`img` encoded as a file of format `fmt`, as a client would upload it."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_image(size: int = 28, seed: int = 0) -> Image.Image:
    """Uniform random grey noise, as the original utils made: the model must answer, not crash."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L")
