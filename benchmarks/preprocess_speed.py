"""Preprocessing against an earlier revision of it: the same output on a corpus, and the time per image.

    .venv/bin/python -m benchmarks.preprocess_speed [--baseline-rev REV] [--digits 3000] [--repeats 15]

Loads mnist_service/inference/preprocess.py as it was at REV (by default the revision before the last
change to it: HEAD if the file has uncommitted changes) beside the current one, runs both on a
corpus built in code (MNIST test digits as they are and inverted, photo-like pages, RGB, RGBA,
grey+alpha, palette, 16-bit and float images, JPEG and other formats, noise, tiny and large images,
unevenly lit photos, and invalid files), and checks that every output is the same array, or the
same exception with the same message. Then times both, alternating, on 28x28 MNIST PNGs and on
400x300 photo-like PNGs: the median over repeats of the mean time per image. Exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image

from mnist_service.data import load_split
from mnist_service.inference import preprocess
from mnist_service.tools.images import DATA_DIR, noise_image, png_bytes, user_digit

MODULE = "mnist_service/inference/preprocess.py"
REPO = Path(__file__).resolve().parent.parent


def default_baseline() -> str:
    """The revision before the last change to the module: HEAD while the change is uncommitted."""
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", MODULE], cwd=REPO, check=False).returncode:
        return "HEAD"
    last = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--", MODULE], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    return f"{last}~1"


def load_baseline(rev: str) -> ModuleType:
    """The module as it was at `rev`, imported under another name beside the current one."""
    source = subprocess.run(["git", "show", f"{rev}:{MODULE}"], cwd=REPO, check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory(prefix="preprocess-baseline-") as tmp:
        path = Path(tmp) / "preprocess_baseline.py"
        path.write_bytes(source)
        spec = importlib.util.spec_from_file_location("preprocess_baseline", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def corpus(digits: np.ndarray, count: int) -> Iterator[tuple[str, bytes, int]]:
    """(kind, file bytes, max_pixels) for every image the comparison runs on, the same on every run."""
    rng = np.random.default_rng(19)
    limit = preprocess.DEFAULT_MAX_PIXELS
    for i in range(count):
        yield "mnist 28x28", png_bytes(Image.fromarray(digits[i])), limit
    for i in range(count // 4):
        yield "inverted 28x28", png_bytes(Image.fromarray(255 - digits[i])), limit
    for i in range(60):
        # Digits drawn smaller than 20 px on a 28x28 canvas: the crop is enlarged (bilinear).
        side = 8 + i % 12
        small = Image.fromarray(digits[i]).resize((side, side), Image.Resampling.BILINEAR)
        canvas = Image.new("L", (28, 28), 0)
        canvas.paste(small, (i % (28 - side + 1), (3 * i) % (28 - side + 1)))
        yield "small digit on 28x28", png_bytes(canvas), limit
    for i in range(80):
        scale = 2 + i % 9
        side = 28 * scale
        canvas = (side + 20 + 7 * (i % 5), side + 10 + 3 * (i % 7))
        page = user_digit(digits[i], scale=scale, canvas=canvas, offset=(5 + i % 11, 3 + i % 7))
        yield "photo-like page", png_bytes(page), limit
        if i % 4 == 0:
            yield "photo-like page, RGB", png_bytes(page.convert("RGB")), limit
            yield "photo-like page, JPEG", encode(page.convert("RGB"), "JPEG", quality=70 + i % 30), limit
    for i in range(40):
        yield "400x300 page", png_bytes(user_digit(digits[i], offset=(10 + 7 * i, 5 + 3 * i))), limit
    for i in range(30):
        # Paper lit from one side: an uneven border calls for the local background estimate.
        page = np.asarray(user_digit(digits[i], scale=4 + i % 4, canvas=(200, 150)), dtype=np.float32)
        light = np.linspace(0.55 + 0.01 * i, 1.0, page.shape[1], dtype=np.float32)
        yield "unevenly lit page", png_bytes(Image.fromarray((page * light).astype(np.uint8))), limit
    for i in range(40):
        big = np.asarray(Image.fromarray(digits[i]).resize((140, 140), Image.Resampling.BILINEAR))
        rgba = np.zeros((140, 140, 4), dtype=np.uint8)
        rgba[..., 3] = big  # a canvas export: black strokes, alpha = ink
        if i % 2:
            rgba[..., :3] = 255  # white strokes on a transparent background
        yield "RGBA canvas", png_bytes(Image.fromarray(rgba, mode="RGBA")), limit
        la = Image.fromarray(np.stack([255 - big, np.maximum(big, 40)], axis=-1), mode="LA")
        yield "grey+alpha", png_bytes(la), limit
        small = Image.fromarray(digits[i]).convert("RGB")
        yield "RGB 28x28", png_bytes(small), limit
        yield "palette 28x28", png_bytes(small.convert("P")), limit
        keyed = Image.fromarray(255 - digits[i]).convert("P")
        yield "palette with transparency", encode(keyed, transparency=255), limit
    for i, fmt in enumerate(["JPEG", "BMP", "GIF", "WEBP", "TIFF"] * 6):
        page = user_digit(digits[i], scale=3 + i % 5, canvas=(160, 120))
        yield f"{fmt} page", encode(page.convert("RGB") if fmt == "JPEG" else page, fmt), limit
    for i, mode in enumerate(["1", "CMYK", "I;16", "I", "F"] * 4):
        page = user_digit(digits[i], scale=3, canvas=(120, 100))
        if mode in ("I;16", "I", "F"):
            dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
            yield f"mode {mode}", encode(Image.fromarray(np.asarray(page).astype(dtype) * 200), "TIFF"), limit
        else:
            yield f"mode {mode}", encode(page.convert(mode), "TIFF" if mode == "CMYK" else "PNG"), limit
    for i in range(60):
        yield "noise", png_bytes(noise_image((28, 64, 100)[i % 3], seed=i)), limit
    for i in range(300):
        # Random small images of every mode and format, as the fuzz tests make them.
        w, h = (int(v) for v in rng.integers(1, 41, 2))
        mode = ["L", "RGB", "RGBA", "1", "P"][i % 5]
        fmt = ["PNG", "BMP", "GIF", "TIFF", "WEBP"][(i // 5) % 5]
        arr = rng.integers(0, 256, (h, w, {"RGB": 3, "RGBA": 4}.get(mode, 1)), dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).convert(mode)
        yield f"random {mode} {fmt}", encode(img.convert("RGB") if (fmt, mode) == ("BMP", "RGBA") else img, fmt), limit
    for i in range(40):
        # Tiny, thin and low-contrast images, and borders around the polarity switch at 128.
        w, h = (1, 1 + i) if i % 3 == 0 else (1 + i % 7, 2 + i % 5) if i % 3 == 1 else (300, 20 + i)
        base = int(rng.integers(100, 156))
        arr = np.full((h, w), base, dtype=np.uint8)
        arr[h // 3 : h // 3 + 1 + h // 3, w // 3 : w // 3 + 1 + w // 3] = base + (10 + i if i % 2 else -10 - i)
        yield "tiny, thin or faint", png_bytes(Image.fromarray(arr)), limit
    stored = user_digit(digits[0]).transpose(Image.Transpose.ROTATE_270).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 8
    yield "JPEG with EXIF rotation", encode(stored, "JPEG", exif=exif), limit
    huge = user_digit(digits[1], scale=60, canvas=(3000, 2000), offset=(500, 100))
    yield "3000x2000 page", png_bytes(huge), limit
    yield "3000x2000 page, JPEG", encode(huge, "JPEG"), limit
    page = png_bytes(user_digit(digits[2]))
    yield from [("over the pixel limit", page, 100_000), ("just under the pixel limit", page, 120_000)]
    for value in (0, 128, 255):
        yield "blank", png_bytes(Image.new("L", (64, 64), value)), limit
        yield "blank 28x28", png_bytes(Image.new("L", (28, 28), value)), limit
    for i, data in enumerate([b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, page[: len(page) // 2]]):
        yield f"invalid {i}", data, limit
    for i in range(40):
        # Corrupt PNGs: a byte flipped somewhere after the signature.
        data = bytearray(png_bytes(Image.fromarray(digits[i])))
        data[8 + i * 7 % (len(data) - 8)] ^= 0x5A
        yield "corrupt PNG", bytes(data), limit


def outcome(fn: Callable[[bytes, int], np.ndarray], data: bytes, max_pixels: int) -> np.ndarray | tuple[type, str]:
    try:
        return fn(data, max_pixels)
    except Exception as exc:  # any error at all must be the same error
        return type(exc), str(exc)


def same(a: np.ndarray | tuple[type, str], b: np.ndarray | tuple[type, str]) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


def compare(old: ModuleType, digits: np.ndarray, count: int) -> tuple[int, list[str]]:
    """How many images were compared, and the mismatches (decode_image and image_to_digit of each)."""
    compared, mismatches = 0, []
    for kind, data, max_pixels in corpus(digits, count):
        compared += 1
        for name in ("image_to_digit", "decode_image"):
            a = outcome(getattr(old, name), data, max_pixels)
            b = outcome(getattr(preprocess, name), data, max_pixels)
            if not same(a, b):
                mismatches.append(
                    f"{kind} #{compared} ({name}): {a if isinstance(a, tuple) else 'array'} vs "
                    f"{b if isinstance(b, tuple) else 'array'}"
                )
    return compared, mismatches


def time_per_image(modules: list[ModuleType], images: list[bytes], repeats: int) -> list[float]:
    """For each module, µs per image: the median over repeats of one pass over `images`.

    The modules take turns, a pass each, in an order that alternates between repeats. (Taking turns
    image by image instead charges the smaller one for the caches the other one evicts.)
    """
    times: list[list[float]] = [[] for _ in modules]
    for r in range(repeats):
        for i, module in list(enumerate(modules))[:: 1 if r % 2 == 0 else -1]:
            fn = module.image_to_digit
            started = time.perf_counter()
            for data in images:
                fn(data)
            times[i].append((time.perf_counter() - started) / len(images) * 1e6)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", help="git revision of the old preprocess.py (default: see above)")
    parser.add_argument("--digits", type=int, default=3000, help="MNIST test digits in the corpus, as they are")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = parser.parse_args()

    rev = args.baseline_rev or default_baseline()
    commit = subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, check=True, capture_output=True, text=True)
    old = load_baseline(rev)
    digits = load_split(args.data_dir, "test").images
    compared, mismatches = compare(old, digits, args.digits)
    print(f"baseline {rev} ({commit.stdout.strip()}) against the working tree:")
    print(f"compared {compared} corpus images, {len(mismatches)} mismatches")
    for line in mismatches[:20]:
        print("  MISMATCH", line)

    mnist = [png_bytes(Image.fromarray(d)) for d in digits[:1000]]
    photos = [png_bytes(user_digit(d)) for d in digits[:40]]
    print(f"µs per image, median of {args.repeats} repeats | old | new | new/old")
    for label, images in (("28x28 MNIST PNG (1000 digits)", mnist), ("400x300 photo-like PNG (40 digits)", photos)):
        old_us, new_us = time_per_image([old, preprocess], images, args.repeats)
        print(f"{label} | {old_us:.1f} | {new_us:.1f} | {new_us / old_us:.2f}")
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
