"""Accuracy on the official test set rendered as users send digits, against the raw 28x28 images.

    python scripts/eval_user_images.py --model models/mnist_cnn.pt [--limit 2000]

Each test digit is drawn the way users really send them (black on white, larger, off-centre,
JPEG-compressed, a transparent canvas export, a photo-like grey page) and goes through the
server's own preprocessing, so the gap to the raw accuracy is what preprocessing costs.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mnist_service.data import load_split
from mnist_service.inference.preprocess import image_to_digit
from mnist_service.inference.torchscript_runtime import load_verified, optimize_for_serving
from mnist_service.tools.images import png_bytes, user_digit


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def _canvas(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    big = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR))
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)
    rgba[..., 3] = big
    return png_bytes(Image.fromarray(rgba, mode="RGBA"))


def _photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """Grey paper with uneven light, a softened, darker-grey ink, and sensor noise."""
    page = np.asarray(user_digit(digit, scale=int(rng.integers(5, 12)), canvas=(420, 360),
                                 offset=(int(rng.integers(0, 150)), int(rng.integers(0, 100)))), np.float32)
    ink = (255 - page) / 255.0
    light = 180 + 50 * np.linspace(0, 1, page.shape[1])[None, :]
    img = light * (1 - 0.75 * ink) + rng.normal(0, 6, page.shape)
    return _jpeg(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)))


VARIANTS: dict[str, Callable[[np.ndarray, np.random.Generator], bytes]] = {
    "raw 28x28 png": lambda d, r: png_bytes(Image.fromarray(d)),
    "black on white, 8x, off-centre": lambda d, r: png_bytes(user_digit(d)),
    "same as jpeg q75": lambda d, r: _jpeg(user_digit(d)),
    "transparent canvas export": _canvas,
    "photo-like grey page": _photo,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"))
    parser.add_argument("--data-dir", type=Path, default=Path("data/mnist"))
    parser.add_argument("--limit", type=int, default=2000, help="test images to use")
    args = parser.parse_args()
    torch.set_num_threads(2)
    module, meta = load_verified(args.model, args.model.with_suffix(".json"))
    module = optimize_for_serving(module)
    norm = meta["input"]["normalization"]
    split = load_split(args.data_dir, "test")
    images, labels = split.images[: args.limit], split.labels[: args.limit]

    def accuracy(digits: np.ndarray) -> float:
        x = (torch.from_numpy(digits).float().unsqueeze(1) / 255 - norm["mean"]) / norm["std"]
        with torch.inference_mode():
            return float((module(x).argmax(1).numpy() == labels).mean())

    print(f"model {meta['version'][:12]}, {len(labels)} test images")
    print(f"{'model input as-is (no preprocessing)':40s} {accuracy(images):.4f}")
    rng = np.random.default_rng(0)
    for name, render in VARIANTS.items():
        digits = np.stack([image_to_digit(render(d, rng)) for d in images])
        print(f"{name:40s} {accuracy(digits):.4f}")


if __name__ == "__main__":
    main()
