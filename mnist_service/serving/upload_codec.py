"""Our own REST prediction format: image uploads in, `Prediction` JSON out.

The FastAPI upload routes (routes/predict.py) and the HTTP hot path (protocol.py) both read a
request with these and write the answer with them, so the two give the same answers and the
same errors, in the order a client's mistakes should be reported.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError

from mnist_service.errors import BadRequest, InvalidInput, UnsupportedMediaType
from mnist_service.inference.preprocess import image_to_digit, to_png_base64
from mnist_service.registry.registry import Version
from mnist_service.serving.multipart import boundary_of, parse_parts

IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/gif", "image/webp", "image/tiff")
# Larger uploads (photos) decode on the decode pool, off the event loop; smaller ones decode in
# well under a millisecond, cheaper on the loop than two thread hops (the GIL serialises them anyway).
INLINE_DECODE_BYTES = 64 * 1024
_EXTRA_FIELDS = 8  # text fields a client may send beside its files, ignored
_BOOL = TypeAdapter(bool)  # what FastAPI reads a bool query parameter with: "1", "yes", "on", "t"...


def media_type_of(content_type: str) -> str:
    """`image/png` of `image/png; charset=x`, lower-cased."""
    return content_type.split(";")[0].strip().lower()


def is_upload_type(media_type: str) -> bool:
    """A Content-Type the upload routes read: a form, an image, or plain bytes."""
    return media_type == "multipart/form-data" or media_type.startswith("image/") or (
        media_type == "application/octet-stream"
    )


def parse_uploads(content_type: str, body: bytes, field: str, max_files: int) -> list[tuple[str, bytes]]:
    """The uploaded files as (name, bytes), from a multipart field or a raw image body.

    The caller has capped the body at MAX_UPLOAD_BYTES. 400 for a wrong field or too many files,
    415 for a Content-Type that carries no image.
    """
    media_type = media_type_of(content_type)
    if media_type == "multipart/form-data":
        parts = parse_parts(body, boundary_of(content_type), max_files + _EXTRA_FIELDS)
        found = [part for part in parts if part.name == field]
        if not found:
            present = sorted({part.name for part in parts}) or "none"
            raise BadRequest(
                f"no multipart field named '{field}' (fields sent: {present}); "
                f"upload with: curl -F {field}=@digit.png"
            )
        if any(part.filename is None for part in found):
            raise BadRequest(f"field '{field}' must be a file upload, not text: use -F {field}=@digit.png")
        files = [(part.filename or field, part.data) for part in found]
    elif is_upload_type(media_type):
        files = [("body", body)]
    else:
        raise UnsupportedMediaType(
            f"unsupported Content-Type '{media_type or 'none'}': send multipart/form-data with a "
            f"'{field}' field, or the raw image bytes with Content-Type image/png (or another image/*)"
        )
    if len(files) > max_files:
        if max_files == 1:
            raise BadRequest("send exactly one file to /predict; use /predict/batch for several")
        raise BadRequest(f"too many files: at most {max_files} per batch (MAX_BATCH_FILES)")
    return files


async def decode_uploads(files: list[tuple[str, bytes]], pool: ThreadPoolExecutor, max_pixels: int) -> np.ndarray:
    """The uploads as digits (n, 28, 28): one small image on the loop, the rest on the decode pool.

    A bad file among several is named in the 422.
    """
    if len(files) == 1 and len(files[0][1]) <= INLINE_DECODE_BYTES:
        return image_to_digit(files[0][1], max_pixels)[None]
    loop = asyncio.get_running_loop()
    jobs = [loop.run_in_executor(pool, image_to_digit, data, max_pixels) for _, data in files]
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for (name, _), result in zip(files, results, strict=True):
        if isinstance(result, BaseException):
            if len(files) > 1 and isinstance(result, InvalidInput):
                raise type(result)(f"{name}: {result.detail}")
            raise result
    return np.stack(results)


def parse_debug(value: str | None) -> bool:
    """The `debug` query parameter, read as FastAPI reads a bool; 422 for anything else."""
    if value is None:
        return False
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        raise InvalidInput(f"invalid request: debug must be true or false, got '{value[:20]}'") from None


def prediction_dicts(
    probs: np.ndarray, version: Version, debug_images: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Probabilities (n, 10) -> one `Prediction`-shaped dict per image."""
    name, sha256 = version.name, version.serving().sha256
    out = []
    for i, row in enumerate(probs.tolist()):
        digit = max(range(len(row)), key=row.__getitem__)
        out.append(
            {
                "prediction": digit,
                "label": str(digit),
                "confidence": row[digit],
                "probabilities": row,
                "model_version": name,
                "model_sha256": sha256,
                "image_png_base64": to_png_base64(debug_images[i]) if debug_images is not None else None,
            }
        )
    return out


def encode_json(content: Any) -> bytes:
    """Byte for byte what json.dumps(separators=(",", ":")) writes for these dicts, many times faster."""
    return orjson.dumps(content)
