"""Preprocessing: every kind of image users really send, and every way an upload can be bad."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnist_service.errors import InvalidInput, PayloadTooLarge
from mnist_service.inference import preprocess
from mnist_service.inference.preprocess import image_to_digit, normalize_digit, pixels_to_digit, to_png_base64
from mnist_service.tools.images import png_bytes, user_digit


@pytest.fixture(scope="module")
def seven(test_digits: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    images, labels = test_digits
    assert labels[0] == 7
    return images[0]


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _similar(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two 28x28 images, best over shifts of up to one pixel.

    1.0 is identical up to brightness; centring by mass legitimately moves a digit by a pixel.
    """
    a = a.astype(np.float64)
    b = b.astype(np.float64).ravel()
    best = 0.0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            s = np.roll(a, (dy, dx), axis=(0, 1)).ravel()
            best = max(best, float(s @ b / (np.linalg.norm(s) * np.linalg.norm(b))))
    return best


def test_raw_mnist_digit_is_nearly_unchanged(seven: np.ndarray) -> None:
    out = image_to_digit(png_bytes(Image.fromarray(seven)))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert _similar(out, seven) > 0.9


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_common_format_decodes_to_the_same_digit(seven: np.ndarray, fmt: str) -> None:
    page = user_digit(seven).convert("RGB")
    out = image_to_digit(_encode(page, fmt))
    assert _similar(out, normalize_digit(np.asarray(page.convert("L"), np.float32))) > 0.97
    assert _similar(out, seven) > 0.85


def test_black_on_white_and_white_on_black_give_the_same_input(seven: np.ndarray) -> None:
    dark_on_light = image_to_digit(png_bytes(user_digit(seven)))
    light_on_dark = image_to_digit(png_bytes(Image.fromarray(255 - np.asarray(user_digit(seven)))))
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=4)  # rounding of the box reduce


def test_off_centre_digit_is_centred_by_mass(seven: np.ndarray) -> None:
    corner = user_digit(seven, scale=4, canvas=(600, 400), offset=(450, 260))
    out = image_to_digit(png_bytes(corner)).astype(np.float64)
    rows, cols = np.indices(out.shape)
    cy, cx = (out * rows).sum() / out.sum(), (out * cols).sum() / out.sum()
    assert abs(cy - 14.0) < 0.75 and abs(cx - 14.0) < 0.75
    ink_rows = np.flatnonzero(out.max(axis=1) > 64)
    ink_cols = np.flatnonzero(out.max(axis=0) > 64)
    assert max(ink_rows[-1] - ink_rows[0], ink_cols[-1] - ink_cols[0]) + 1 in range(18, 22)


def test_transparent_canvas_export_composites_on_white(seven: np.ndarray) -> None:
    """A canvas export: black strokes, alpha = ink, fully transparent background."""
    big = np.asarray(Image.fromarray(seven).resize((280, 280), Image.Resampling.BILINEAR))
    rgba = np.zeros((280, 280, 4), dtype=np.uint8)
    rgba[..., 3] = big  # colour channels are black everywhere; only alpha draws
    out = image_to_digit(png_bytes(Image.fromarray(rgba, mode="RGBA")))
    assert _similar(out, seven) > 0.85


def test_white_strokes_on_transparent_background_use_the_alpha(seven: np.ndarray) -> None:
    big = np.asarray(Image.fromarray(seven).resize((140, 140), Image.Resampling.BILINEAR))
    rgba = np.full((140, 140, 4), 255, dtype=np.uint8)
    rgba[..., 3] = big
    out = image_to_digit(png_bytes(Image.fromarray(rgba, mode="RGBA")))
    assert _similar(out, seven) > 0.85


def test_exif_rotation_is_honoured(seven: np.ndarray) -> None:
    page = user_digit(seven)
    # Stored turned 90° clockwise, with EXIF orientation 8: viewers turn it back counter-clockwise.
    stored = page.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    with_exif = _encode(stored.convert("RGB"), "JPEG", exif=exif, quality=95)
    out = image_to_digit(with_exif)
    upright = image_to_digit(_encode(page.convert("RGB"), "JPEG", quality=95))
    assert _similar(out, upright) > 0.97


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_pil_mode_is_accepted(seven: np.ndarray, mode: str) -> None:
    page = user_digit(seven, scale=3, canvas=(120, 100), offset=(10, 10))
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        img = Image.fromarray(np.asarray(page).astype(dtype) * 200)
        assert img.mode == mode
        data = _encode(img, "TIFF")
    else:
        data = _encode(page.convert(mode), "TIFF" if mode in ("CMYK", "F") else "PNG")
    out = image_to_digit(data)
    assert out.shape == (28, 28)
    assert _similar(out, seven) > 0.8


def test_huge_image_is_downscaled(seven: np.ndarray) -> None:
    page = user_digit(seven, scale=60, canvas=(3000, 2000), offset=(500, 100))
    assert _similar(image_to_digit(_encode(page, "PNG")), seven) > 0.85


def test_tiny_image_is_upscaled(seven: np.ndarray) -> None:
    small = Image.fromarray(255 - seven).resize((10, 10), Image.Resampling.BILINEAR)
    out = image_to_digit(png_bytes(small))
    assert out.shape == (28, 28) and out.max() > 200


def test_animated_gif_uses_the_first_frame(seven: np.ndarray) -> None:
    first = user_digit(seven).convert("P")
    second = Image.new("P", first.size, 0)
    buf = io.BytesIO()
    first.save(buf, format="GIF", save_all=True, append_images=[second])
    assert _similar(image_to_digit(buf.getvalue()), seven) > 0.85


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is not an image at all", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image|truncated or corrupt"),
    ],
)
def test_unreadable_bytes_are_rejected_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        image_to_digit(data)


def test_truncated_png_is_rejected(seven: np.ndarray) -> None:
    data = png_bytes(user_digit(seven))
    with pytest.raises(InvalidInput, match="truncated or corrupt"):
        image_to_digit(data[: len(data) // 2])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 300),
    st.integers(1, 300),
    st.sampled_from(["L", "RGB", "RGBA"]),
    st.integers(0, 2**32 - 1),
)
def test_plain_pngs_decode_to_the_same_pixels_with_libspng_as_with_pil(
    width: int, height: int, mode: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    data = _encode(Image.fromarray(arr.squeeze(-1) if mode == "L" else arr, mode=mode), "PNG")
    assert preprocess._plain_png(data, preprocess.DEFAULT_MAX_PIXELS) is not None, "libspng did not take it"
    np.testing.assert_array_equal(preprocess.decode_image(data), preprocess.decode_image(data, libspng=False))


@pytest.mark.parametrize(
    "img",
    [
        Image.new("P", (20, 20)),
        Image.new("I;16", (20, 20)),
        Image.new("LA", (20, 20)),
        Image.new("L", (20, 20)),  # saved with a transparency key below
    ],
    ids=["palette", "16-bit", "grey-alpha", "transparency-key"],
)
def test_pngs_libspng_would_read_differently_go_to_pil(img: Image.Image) -> None:
    data = _encode(img, "PNG", **({"transparency": 0} if img.mode == "L" else {}))
    assert preprocess._plain_png(data, preprocess.DEFAULT_MAX_PIXELS) is None


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares huge dimensions but carries almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge, match="over the limit"):
        image_to_digit(_png_header_only(50_000, 50_000))


def test_pixel_limit_is_configurable(seven: np.ndarray) -> None:
    data = png_bytes(user_digit(seven))  # 400 x 300
    with pytest.raises(PayloadTooLarge):
        image_to_digit(data, max_pixels=100_000)
    assert image_to_digit(data, max_pixels=120_000).shape == (28, 28)


@pytest.mark.parametrize("value", [0, 255, 128])
def test_blank_images_are_rejected(value: int) -> None:
    with pytest.raises(InvalidInput, match="blank"):
        image_to_digit(png_bytes(Image.new("L", (64, 64), value)))


def test_pixels_flat_and_nested_agree(seven: np.ndarray) -> None:
    flat = pixels_to_digit(seven.reshape(-1).tolist())
    nested = pixels_to_digit(seven.tolist())
    np.testing.assert_array_equal(flat, seven)
    np.testing.assert_array_equal(nested, seven)


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        ([0] * 783, "got shape \\[783\\]"),
        ([[0] * 28] * 27, "got shape \\[27, 28\\]"),
        ([0.5] * 784, "integers"),
        (["1"] * 784, "integers"),
        ([True] * 784, "integers"),
        ([256] + [0] * 783, "0-255"),
        ([-1] + [0] * 783, "0-255"),
        ([[0] * 28] * 27 + [[0] * 27], "784 integers"),
    ],
)
def test_bad_pixels_are_rejected_with_a_reason(pixels: list[object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        pixels_to_digit(pixels)


def test_debug_png_round_trips(seven: np.ndarray) -> None:
    import base64

    decoded = Image.open(io.BytesIO(base64.b64decode(to_png_base64(seven))))
    np.testing.assert_array_equal(np.asarray(decoded), seven)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_give_a_digit_or_a_clean_rejection(data: bytes) -> None:
    try:
        out = image_to_digit(data)
    except (InvalidInput, PayloadTooLarge):
        return
    assert out.shape == (28, 28) and out.dtype == np.uint8


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.sampled_from(["L", "RGB", "RGBA", "1", "P"]),
    st.sampled_from(["PNG", "BMP", "GIF", "TIFF", "WEBP"]),
    st.integers(0, 2**32 - 1),
)
def test_arbitrary_small_images_give_a_digit_or_a_clean_rejection(
    width: int, height: int, mode: str, fmt: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "1": 1, "P": 1}[mode]
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr).convert(mode)
    if fmt == "BMP" and mode == "RGBA":
        img = img.convert("RGB")
    try:
        out = image_to_digit(_encode(img, fmt))
    except InvalidInput:
        return
    assert out.shape == (28, 28) and out.dtype == np.uint8


def _digit_or_error(grey: np.ndarray) -> np.ndarray | str:
    try:
        return normalize_digit(grey)
    except InvalidInput as exc:
        return str(exc)


def _assert_same_digit(a: np.ndarray | str, b: np.ndarray | str) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
    else:
        np.testing.assert_array_equal(a, b)


def _user_images(digits: np.ndarray) -> list[np.ndarray]:
    """8-bit grey images of every kind normalize_digit treats differently: MNIST as it is and inverted,
    digits drawn small (enlarged), pages (reduced), unevenly lit pages (local background)."""
    images = []
    for i, digit in enumerate(digits):
        images += [digit, 255 - digit]
        side = 6 + i % 14
        small = np.zeros((28, 28), dtype=np.uint8)
        small[i % 5 : i % 5 + side, 2 : 2 + side] = np.asarray(Image.fromarray(digit).resize((side, side)))
        images.append(small)
        if i % 10 == 0:
            page = np.asarray(user_digit(digit, scale=2 + i % 5, canvas=(160, 120)))
            light = np.linspace(0.6, 1.0, page.shape[1])
            images += [page, (page * light).astype(np.uint8)]
    return images


def test_grey_levels_and_float_pixels_give_the_same_digit(test_digits: tuple[np.ndarray, np.ndarray]) -> None:
    """8-bit grey images take a per-grey-level shortcut; float pixels take the per-pixel path. Both must agree."""
    for image in _user_images(test_digits[0][:300]):
        _assert_same_digit(_digit_or_error(image), _digit_or_error(image.astype(np.float32)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(1, 70),
    st.integers(1, 70),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
)
def test_any_grey_image_gives_the_same_digit_by_levels_as_by_pixels(
    width: int, height: int, background: int, ink: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    image = np.full((height, width), background, dtype=np.uint8)
    strokes = rng.random((height, width)) < rng.random()
    image[strokes] = np.clip(ink + rng.integers(-40, 41, int(strokes.sum())), 0, 255)
    _assert_same_digit(_digit_or_error(image), _digit_or_error(image.astype(np.float32)))


def test_strided_and_transposed_arrays_give_the_digit_of_their_copy(seven: np.ndarray) -> None:
    page = np.asarray(user_digit(seven, scale=2, canvas=(100, 80)))
    for view in (seven.T, seven[::-1], page[::2, 1::2], page.T):
        for grey in (view, np.asfortranarray(view, dtype=np.float32)):
            np.testing.assert_array_equal(normalize_digit(grey), normalize_digit(np.ascontiguousarray(grey)))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_decode_image_gives_float32_grey_levels(seven: np.ndarray, mode: str) -> None:
    grey = preprocess.decode_image(png_bytes(Image.fromarray(seven).convert(mode)))
    assert grey.dtype == np.float32 and grey.shape == (28, 28)
    np.testing.assert_array_equal(grey, seven)  # grey levels, whole numbers: exact on any CPU
