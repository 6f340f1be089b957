"""Image bytes or pixel lists -> the 28x28 white-on-black uint8 array the model was trained on.

Pure functions, shared by the server, the tests and the client. Photos and canvas exports are
normalised the way MNIST itself was made: crop to the ink, fit the longer side into 20 px
keeping the aspect ratio, then centre by centre of mass in a 28x28 field.
"""

from __future__ import annotations

import base64
import io
import struct
import warnings
from collections.abc import Sequence

import numpy as np
import pyspng
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from mnist_service.errors import InvalidInput, PayloadTooLarge

SIZE = 28
BOX = 20  # MNIST fits each digit's longer side into 20 px before centring in 28
DEFAULT_MAX_PIXELS = 40_000_000
_INK_THRESHOLD = 0.2  # fraction of the ink's peak that counts as ink when finding the crop box
_NOISE_FLOOR = 0.08  # below this fraction of the peak, a pixel is background noise (JPEG, paper)
_MIN_CONTRAST = 16.0  # grey levels between background and ink below which an image is blank
_POSITIONS = np.arange(BOX)  # row and column numbers of a resized digit (at most BOX px a side)
_WORK_SIDE = 128  # px: larger images are reduced to about this before any per-pixel work
_LOCAL_BG_MIN_SIDE = 48  # smaller images (MNIST itself, icons) have a flat background
_LOCAL_BG_SIDE = 64  # the background is estimated on a copy this size
_LOCAL_BG_WINDOW = 15  # px of that copy: wider than a pen stroke
_UNEVEN_BORDER = 12.0  # grey levels between the border's 5th and 95th percentiles
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PLAIN_PNG_COLOURS = {0, 2, 6}  # grey, RGB, RGBA (pyspng 0.1.4 fails on grey+alpha; no palettes)
_PNG_CHUNKS_FOR_PIL = {b"tRNS", b"eXIf"}  # transparency keys and EXIF orientation: PIL's handling


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, libspng: bool = True) -> np.ndarray:
    """Decode any PIL-readable image into a float32 grey array, 0 = black, 255 = white.

    Honours EXIF orientation, takes the first frame of animations, and composites
    transparency over white (a canvas export is dark strokes on a transparent background).
    `libspng=False` decodes every PNG with PIL, as the benchmark's baseline does.
    """
    if not data:
        raise InvalidInput("the uploaded file is empty: attach a PNG, JPEG or other image file")
    plain = _plain_png(data, max_pixels) if libspng else None
    if plain is not None:
        if plain.ndim == 2 and max(plain.shape) < 2 * _WORK_SIDE:
            # 8-bit grey, too small to shrink: the samples are the grey levels already. Skipping
            # PIL's round trip here was a fifth of the time for a 28x28 PNG.
            return plain.astype(np.float32)
        return _to_grey(Image.fromarray(plain))
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; ours is checked below instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            _check_pixels(width, height, max_pixels)
            if width < 1 or height < 1:
                raise InvalidInput("the image has no pixels")
            img.seek(0)
            if img.format == "JPEG" and max(width, height) > 2 * _WORK_SIDE:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale: a phone photo costs a fraction.
                img.draft(None, (width * _WORK_SIDE // max(width, height), height * _WORK_SIDE // max(width, height)))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_grey(img)
    except (PayloadTooLarge, InvalidInput):
        raise
    except Image.DecompressionBombError as exc:
        # PIL refuses on its own past twice its limit, before we can read the size.
        raise PayloadTooLarge(
            f"the image is over the limit of {max_pixels} pixels (a decompression bomb?): scale it down"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidInput(
            "the file is not an image PIL can read: send PNG, JPEG, BMP, GIF, WebP or TIFF"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        # Truncated or corrupt files surface as any of these from PIL's decoders.
        raise _corrupt(exc) from exc


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image by its declared size, before its pixels are decoded."""
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"the image is {width}x{height} pixels, over the limit of {max_pixels}: scale it down before uploading"
        )


def _corrupt(exc: Exception) -> InvalidInput:
    return InvalidInput(f"the image file is truncated or corrupt and can't be decoded ({type(exc).__name__})")


def _plain_png(data: bytes, max_pixels: int) -> np.ndarray | None:
    """The samples of an 8-bit grey, RGB or RGBA PNG decoded by libspng, or None for anything else (left to PIL).

    PNG decoding was 30% of the server's CPU, and libspng takes about a fifth less time than PIL
    for it. The PNGs it takes here decode to the same pixels either way (a test checks that);
    palettes, grey+alpha, 16-bit samples, transparency keys and EXIF go to PIL.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour not in _PLAIN_PNG_COLOURS:
        return None
    position = 8
    while position + 8 <= len(data):  # the chunks before the pixels
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            break
        if kind in _PNG_CHUNKS_FOR_PIL:
            return None
        position += 12 + length
    _check_pixels(width, height, max_pixels)
    try:
        return pyspng.load(data)
    except (RuntimeError, ValueError) as exc:
        raise _corrupt(exc) from exc


def _shrink(img: Image.Image) -> Image.Image:
    """Box-average large images down to about _WORK_SIDE px: the digit ends up 20 px anyway,
    and every later step costs per pixel."""
    factor = max(img.size) // _WORK_SIDE
    return img.reduce(factor) if factor >= 2 else img


def _to_grey(img: Image.Image) -> np.ndarray:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(_shrink(img.convert("F")), dtype=np.float32)
        peak = float(arr.max()) if arr.size else 0.0
        return arr * (255.0 / peak) if peak > 0 else arr
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if not has_alpha:
        return np.asarray(_shrink(img.convert("L")), dtype=np.float32)
    rgba = _shrink(img.convert("RGBA"))
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    grey = np.asarray(rgba.convert("L"), dtype=np.float32)
    composite = grey * alpha + 255.0 * (1.0 - alpha)
    if np.ptp(composite) < _MIN_CONTRAST and np.ptp(alpha) * 255.0 >= _MIN_CONTRAST:
        # Light strokes on a transparent background vanish on white: the alpha is the drawing.
        return alpha * 255.0
    return composite


def normalize_digit(grey: np.ndarray) -> np.ndarray:
    """Grey image of any size and polarity -> 28x28 uint8, white digit centred on black."""
    grey = np.asarray(grey, dtype=np.float32)
    if grey.ndim != 2 or grey.size == 0:
        raise InvalidInput("the image must be two-dimensional and non-empty")
    # The border's 5th, 50th and 95th percentiles, by sorting once (np.percentile costs more
    # than the arithmetic at these sizes).
    border = np.sort(np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]]))
    low, mid, high = (float(border[int(q * (len(border) - 1))]) for q in (0.05, 0.5, 0.95))
    # A light border means dark ink on paper: invert to MNIST's white on black.
    if mid < 128:
        bright_ink, flat = grey, mid
    else:
        bright_ink, flat = 255.0 - grey, 255.0 - mid
    # In-place numpy calls from here on: at ~130x100 px each op costs more in dispatch and
    # allocation than in arithmetic, and this runs once per request.
    ink = bright_ink - _background(bright_ink, flat, uneven=high - low >= _UNEVEN_BORDER)
    np.maximum(ink, 0.0, out=ink)
    peak = float(ink.max())
    if peak < _MIN_CONTRAST:
        raise InvalidInput("the image is blank: no digit stands out from the background")
    np.divide(ink, peak, out=ink)
    ink *= ink >= _NOISE_FLOOR

    strokes = ink >= _INK_THRESHOLD
    rows = np.flatnonzero(strokes.any(axis=1))
    cols = np.flatnonzero(strokes.any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    h, w = crop.shape
    scale = BOX / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    # Through raw bytes: for a digit this size, Image.fromarray and np.asarray(image) cost more than the resize.
    resized = Image.frombytes("F", (w, h), crop.tobytes()).resize((new_w, new_h), _resample(scale))
    digit = np.frombuffer(resized.tobytes(), dtype=np.float32).reshape(new_h, new_w)
    return _centre_by_mass(np.minimum(np.maximum(digit, 0.0), 1.0))


def _background(bright_ink: np.ndarray, flat: float, uneven: bool) -> np.ndarray | float:
    """The background level under the ink: flat for small images, local for photos.

    Photos of paper are lit unevenly, so one level leaves a bright corner that looks like ink.
    A grey-level opening (min then max filter) wider than any stroke erases the strokes and
    keeps the slowly varying light; it runs on a small copy, since light varies slowly.
    """
    h, w = bright_ink.shape
    # Digital drawings and scans have an even border; only an uneven one calls for the local
    # estimate, which can nibble at very thick strokes.
    if min(h, w) < _LOCAL_BG_MIN_SIDE or not uneven:
        return flat
    factor = _LOCAL_BG_SIDE / max(h, w)
    small = Image.fromarray(bright_ink, mode="F").resize((max(1, round(w * factor)), max(1, round(h * factor))))
    opened = small.filter(ImageFilter.MinFilter(_LOCAL_BG_WINDOW)).filter(ImageFilter.MaxFilter(_LOCAL_BG_WINDOW))
    return np.asarray(opened.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _resample(scale: float) -> Image.Resampling:
    # Lanczos anti-aliases when shrinking (as MNIST did); it rings when enlarging tiny digits.
    return Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR


def _centre_by_mass(digit: np.ndarray) -> np.ndarray:
    h, w = digit.shape
    total = float(digit.sum())
    if total <= 0:
        raise InvalidInput("the image is blank: no digit stands out from the background")
    cy = float((digit.sum(axis=1) * _POSITIONS[:h]).sum() / total)
    cx = float((digit.sum(axis=0) * _POSITIONS[:w]).sum() / total)
    # Place the digit so that its centre of mass lands on the field's centre, clipped to fit.
    top = round((SIZE - 1) / 2 - cy)
    left = round((SIZE - 1) / 2 - cx)
    top, left = min(max(top, 0), SIZE - h), min(max(left, 0), SIZE - w)
    field = np.zeros((SIZE, SIZE), dtype=np.uint8)
    field[top : top + h, left : left + w] = np.round(digit * 255.0)
    return field


def image_to_digit(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, libspng: bool = True) -> np.ndarray:
    """Image file bytes -> 28x28 uint8 model input (white on black)."""
    return normalize_digit(decode_image(data, max_pixels, libspng=libspng))


def pixels_to_digit(pixels: Sequence[object]) -> np.ndarray:
    """784 integers 0-255 (flat or 28 rows of 28), white digit on black, used as given."""
    try:
        arr = np.asarray(pixels, dtype=object)
    except ValueError as exc:
        raise InvalidInput("pixels must be 784 integers, or 28 lists of 28 integers") from exc
    if arr.shape not in ((SIZE * SIZE,), (SIZE, SIZE)):
        raise InvalidInput(
            f"pixels must be 784 integers or 28 rows of 28, got shape {list(arr.shape)}"
        )
    flat = arr.reshape(-1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise InvalidInput("pixels must be integers 0-255 (white digit on black), not floats or strings")
    values = np.array(flat.tolist(), dtype=np.int64)
    if values.min() < 0 or values.max() > 255:
        raise InvalidInput(
            f"pixels must lie in 0-255, got values from {values.min()} to {values.max()}"
        )
    return values.astype(np.uint8).reshape(SIZE, SIZE)


def to_png_base64(digit: np.ndarray) -> str:
    """The 28x28 array as a base64 PNG, to show a person what the model saw."""
    buf = io.BytesIO()
    Image.fromarray(digit, mode="L").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
