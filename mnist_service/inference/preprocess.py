"""Image bytes or pixel lists -> the 28x28 white-on-black uint8 array the model was trained on.

Pure functions, shared by the server, the tests and the client. Photos and canvas exports are
normalised the way MNIST itself was made: crop to the ink, fit the longer side into 20 px
keeping the aspect ratio, then centre by centre of mass in a 28x28 field.
"""

from __future__ import annotations

import base64
import functools
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
_POSITIONS = np.arange(BOX, dtype=np.float64)  # row and column numbers in a fitted digit (at most BOX px a side)
_WORK_SIDE = 128  # px: larger images are reduced to about this before any per-pixel work
_LOCAL_BG_MIN_SIDE = 48  # smaller images (MNIST itself, icons) have a flat background
_LOCAL_BG_SIDE = 64  # the background is estimated on a copy this size
_LOCAL_BG_WINDOW = 15  # px of that copy: wider than a pen stroke
_UNEVEN_BORDER = 12.0  # grey levels between the border's 5th and 95th percentiles
_BLANK = "the image is blank: no digit stands out from the background"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PLAIN_PNG_COLOURS = {0, 2, 6}  # grey, RGB, RGBA (pyspng 0.1.4 fails on grey+alpha; no palettes)
_PNG_CHUNKS_FOR_PIL = {b"tRNS", b"eXIf"}  # transparency keys and EXIF orientation: PIL's handling
_PNG_HEADER = struct.Struct(">4sIIBB")  # IHDR's name, width, height, bit depth, colour type
_PNG_CHUNK = struct.Struct(">I4s")  # a chunk's length and name


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, libspng: bool = True) -> np.ndarray:
    """Decode any PIL-readable image into a float32 grey array, 0 = black, 255 = white.

    Honours EXIF orientation, takes the first frame of animations, and composites
    transparency over white (a canvas export is dark strokes on a transparent background).
    `libspng=False` decodes every PNG with PIL, as the benchmark's baseline does.
    """
    return _decode(data, max_pixels, libspng).astype(np.float32, copy=False)


def _decode(data: bytes, max_pixels: int, libspng: bool) -> np.ndarray:
    """decode_image's grey levels, left as uint8 where the image has 8-bit grey levels: normalize_digit
    takes those by table lookup."""
    if not data:
        raise InvalidInput("the uploaded file is empty: attach a PNG, JPEG or other image file")
    plain = _plain_png(data, max_pixels) if libspng else None
    if plain is not None:
        if plain.ndim == 2 and max(plain.shape) < 2 * _WORK_SIDE:
            # 8-bit grey, too small to shrink: the samples are the grey levels already. Skipping
            # PIL's round trip here was a fifth of the time for a 28x28 PNG.
            return plain
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

    PNG decoding was a large share of the server's CPU, and libspng takes less time than PIL for it
    (docs/performance.md). The PNGs it takes here decode to the same pixels either way (a test checks that);
    palettes, grey+alpha, 16-bit samples, transparency keys and EXIF go to PIL.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE):
        return None
    ihdr, width, height, depth, colour = _PNG_HEADER.unpack_from(data, 12)
    if ihdr != b"IHDR" or depth != 8 or colour not in _PLAIN_PNG_COLOURS:
        return None
    position = 8
    while position + 8 <= len(data):  # the chunks before the pixels
        length, kind = _PNG_CHUNK.unpack_from(data, position)
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
        return np.asarray(_shrink(img.convert("L")))
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
    levels = np.asarray(grey)
    if levels.dtype != np.uint8:
        levels = np.asarray(grey, dtype=np.float32)
    if levels.ndim != 2 or levels.size == 0:
        raise InvalidInput("the image must be two-dimensional and non-empty")
    low, mid, high = _border_levels(levels)
    # Digital drawings and scans have an even border; only an uneven one calls for the local
    # estimate of the background, which can nibble at very thick strokes.
    uneven = high - low >= _UNEVEN_BORDER
    flat = min(levels.shape) < _LOCAL_BG_MIN_SIDE or not uneven
    if flat and levels.dtype == np.uint8:
        return _normalize_levels(levels, int(mid))
    grey = levels.astype(np.float32, copy=False)
    bright_ink, flat_level = _bright_ink(grey, mid)
    ink = bright_ink - (flat_level if flat else _local_background(bright_ink))
    # In-place numpy calls from here on: at ~130x100 px each op costs more in dispatch and
    # allocation than in arithmetic, and this runs once per request.
    np.maximum(ink, 0.0, out=ink)
    peak = float(ink.max())
    if peak < _MIN_CONTRAST:
        raise InvalidInput(_BLANK)
    _scale_ink(ink, peak)
    strokes = ink >= _INK_THRESHOLD
    rows = np.flatnonzero(strokes.any(axis=1))
    cols = np.flatnonzero(strokes.any(axis=0))
    return _centre_by_mass(_fit(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]))


def _border_levels(grey: np.ndarray) -> tuple[float, float, float]:
    """The border's 5th, 50th and 95th percentiles, by sorting once (np.percentile costs more than
    the arithmetic at these sizes)."""
    border = grey.take(_border_indices(*grey.shape))
    border.sort()
    last = len(border) - 1
    return float(border[int(0.05 * last)]), float(border[int(0.5 * last)]), float(border[int(0.95 * last)])


@functools.lru_cache(maxsize=64)
def _border_indices(h: int, w: int) -> np.ndarray:
    """Flat indices of the first and last row, then the first and last column (corners twice)."""
    rows = np.arange(h) * w
    return np.concatenate([np.arange(w), (h - 1) * w + np.arange(w), rows, rows + w - 1])


def _bright_ink(grey: np.ndarray, mid: float) -> tuple[np.ndarray, float]:
    """The image with the ink bright, and the border's level in it: a light border means dark ink on
    paper, inverted to MNIST's white on black."""
    if mid < 128:
        return grey, mid
    return 255.0 - grey, 255.0 - mid


def _scale_ink(ink: np.ndarray, peak: float) -> None:
    """Ink above the background -> 0..1 of its peak, with noise below the floor set to 0, in place."""
    np.divide(ink, peak, out=ink)
    ink *= ink >= _NOISE_FLOOR


def _normalize_levels(levels: np.ndarray, mid: int) -> np.ndarray:
    """normalize_digit for 8-bit grey levels on a flat background.

    Every step up to the resize maps each grey level on its own, so it is done once per level in a
    256-entry table and applied to the crop by one lookup: the same float32 arithmetic on fewer
    pixels, in a few numpy calls instead of ~30 (per-call overhead dominated a 28x28 digit's time).
    """
    if mid < 128:
        peak = int(np.maximum.reduce(levels, axis=None)) - mid
    else:
        peak = mid - int(np.minimum.reduce(levels, axis=None))
    if peak < _MIN_CONTRAST:
        raise InvalidInput(_BLANK)
    ink, strokes, field_levels = _level_tables(mid, peak)
    # The rows and columns with a stroke: first and last stroke byte of the image and of its
    # transpose, found by bytes.translate and find (a third of the time of numpy's any and flatnonzero).
    h, w = levels.shape
    by_rows = levels.tobytes().translate(strokes)
    by_cols = levels.T.tobytes().translate(strokes)
    top, bottom = by_rows.find(1) // w, by_rows.rfind(1) // w
    left, right = by_cols.find(1) // h, by_cols.rfind(1) // h
    crop = levels[top : bottom + 1, left : right + 1]
    if max(crop.shape) == BOX:  # _fit would leave it as it is: its values are 0..1 already
        return _centre_by_mass(ink.take(crop), field_levels.take(crop))
    return _centre_by_mass(_fit(ink.take(crop)))


@functools.lru_cache(maxsize=1024)
def _level_tables(mid: int, peak: int) -> tuple[np.ndarray, bytes, np.ndarray]:
    """For each grey level 0-255 of an image with this border level and peak: its ink (float32
    0..1, as normalize_digit computes it per pixel), whether it is a stroke (a bytes.translate
    table), and its uint8 value in the 28x28 field."""
    bright_ink, flat_level = _bright_ink(np.arange(256, dtype=np.float32), float(mid))
    ink = bright_ink - flat_level
    np.maximum(ink, 0.0, out=ink)
    np.minimum(ink, peak, out=ink)  # levels beyond the image's own peak are never looked up
    _scale_ink(ink, float(peak))
    strokes = (ink >= _INK_THRESHOLD).astype(np.uint8).tobytes()
    field_levels = np.rint(ink * 255.0).astype(np.uint8)
    ink.flags.writeable = field_levels.flags.writeable = False
    return ink, strokes, field_levels


def _local_background(bright_ink: np.ndarray) -> np.ndarray:
    """The background level under the ink of a photo.

    Photos of paper are lit unevenly, so one level leaves a bright corner that looks like ink.
    A grey-level opening (min then max filter) wider than any stroke erases the strokes and
    keeps the slowly varying light; it runs on a small copy, since light varies slowly.
    """
    h, w = bright_ink.shape
    factor = _LOCAL_BG_SIDE / max(h, w)
    small = Image.fromarray(bright_ink, mode="F").resize((max(1, round(w * factor)), max(1, round(h * factor))))
    opened = small.filter(ImageFilter.MinFilter(_LOCAL_BG_WINDOW)).filter(ImageFilter.MaxFilter(_LOCAL_BG_WINDOW))
    return np.asarray(opened.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _fit(crop: np.ndarray) -> np.ndarray:
    """The cropped ink resized so that its longer side is BOX px, clipped to 0..1 (a new array)."""
    h, w = crop.shape
    if max(h, w) != BOX:  # PIL's resize to the same size would only copy
        scale = BOX / max(h, w)
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        # Through raw bytes: for a digit this size, Image.fromarray and np.asarray(image) cost more than the resize.
        resized = Image.frombytes("F", (w, h), crop.tobytes()).resize((new_w, new_h), _resample(scale))
        crop = np.frombuffer(resized.tobytes(), dtype=np.float32).reshape(new_h, new_w)
    return np.minimum(np.maximum(crop, 0.0), 1.0)


def _resample(scale: float) -> Image.Resampling:
    # Lanczos anti-aliases when shrinking (as MNIST did); it rings when enlarging tiny digits.
    return Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR


def _centre_by_mass(digit: np.ndarray, field_levels: np.ndarray | None = None) -> np.ndarray:
    """Place the digit (C-contiguous float32, 0..1) in the 28x28 field so that its centre of mass
    lands on the field's centre.

    `field_levels`, its pixels as uint8, are given only for a digit straight from _level_tables.
    """
    h, w = digit.shape
    # np.add.reduce, not .sum(): the same summation without the method's Python wrapper. The
    # digit must be contiguous: numpy sums a contiguous array in one pairwise pass.
    total = float(np.add.reduce(digit, axis=None))
    if total <= 0:
        raise InvalidInput(_BLANK)
    row_sums, col_sums = np.add.reduce(digit, axis=1), np.add.reduce(digit, axis=0)
    if field_levels is None:
        cy = float(np.add.reduce(row_sums * _POSITIONS[:h])) / total
        cx = float(np.add.reduce(col_sums * _POSITIONS[:w])) / total
    else:
        # Every pixel is 0 or above the noise floor (> 2^-4), so each float32 row or column sum is
        # a multiple of 2^-27 below 2^5, and the float64 moments (< 2^13) are exact in any order
        # of summation: one dot product gives the same numbers as the products and sums above.
        cy = float(row_sums.dot(_POSITIONS[:h])) / total
        cx = float(col_sums.dot(_POSITIONS[:w])) / total
    # Clipped so that the digit fits.
    top = min(max(round((SIZE - 1) / 2 - cy), 0), SIZE - h)
    left = min(max(round((SIZE - 1) / 2 - cx), 0), SIZE - w)
    field = np.zeros((SIZE, SIZE), dtype=np.uint8)
    field[top : top + h, left : left + w] = np.rint(digit * 255.0) if field_levels is None else field_levels
    return field


def image_to_digit(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, libspng: bool = True) -> np.ndarray:
    """Image file bytes -> 28x28 uint8 model input (white on black)."""
    return normalize_digit(_decode(data, max_pixels, libspng))


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
