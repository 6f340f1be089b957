"""Our own prediction endpoints: image upload (multipart or raw body), batches, and raw pixels."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from starlette.datastructures import UploadFile

from mnist_service.deps import DecodePoolDep, PredictorDep, SettingsDep, require_api_key
from mnist_service.errors import BadRequest, InvalidInput, UnsupportedMediaType
from mnist_service.predictor import Predictor
from mnist_service.preprocess import image_to_digit, pixels_to_digit, to_png_base64
from mnist_service.schemas import ERROR_RESPONSES, PixelsRequest, Prediction

router = APIRouter(tags=["predict"], dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/gif", "image/webp", "image/tiff")
_UPLOAD_SCHEMA = {"type": "string", "format": "binary"}
_INLINE_DECODE_BYTES = 64 * 1024  # larger uploads (photos) decode on the pool, off the event loop


def _body_spec(multipart_schema: dict[str, Any]) -> dict[str, Any]:
    content: dict[str, Any] = {"multipart/form-data": {"schema": multipart_schema}}
    for media_type in (*_IMAGE_TYPES, "application/octet-stream"):
        content[media_type] = {"schema": _UPLOAD_SCHEMA}
    return {"requestBody": {"required": True, "content": content}}


_SINGLE = _body_spec(
    {"type": "object", "properties": {"file": _UPLOAD_SCHEMA}, "required": ["file"]}
)
_BATCH = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"files": {"type": "array", "items": _UPLOAD_SCHEMA}},
                    "required": ["files"],
                }
            }
        },
    }
}


def to_predictions(probs: np.ndarray, version: str, debug_images: list[np.ndarray] | None = None) -> list[Prediction]:
    """Probabilities (n, 10) -> one response object per image."""
    out = []
    for i, row in enumerate(probs):
        digit = int(row.argmax())
        out.append(
            Prediction(
                prediction=digit,
                label=str(digit),
                confidence=float(row[digit]),
                probabilities=[float(p) for p in row],
                model_version=version,
                image_png_base64=to_png_base64(debug_images[i]) if debug_images is not None else None,
            )
        )
    return out


async def _uploads(request: Request, field: str, max_files: int, max_bytes: int) -> list[tuple[str, bytes]]:
    """The uploaded files as (name, bytes), from a multipart field or a raw image body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async with request.form(max_files=max_files, max_fields=max_files + 8, max_part_size=max_bytes) as form:
            values = form.getlist(field)
            if not values:
                present = sorted(set(form.keys())) or "none"
                raise BadRequest(
                    f"no multipart field named '{field}' (fields sent: {present}); "
                    f"upload with: curl -F {field}=@digit.png"
                )
            files = []
            for value in values:
                if not isinstance(value, UploadFile):
                    raise BadRequest(f"field '{field}' must be a file upload, not text: use -F {field}=@digit.png")
                files.append((value.filename or field, await value.read()))
            return files
    if content_type.startswith("image/") or content_type == "application/octet-stream":
        return [("body", await request.body())]
    raise UnsupportedMediaType(
        f"unsupported Content-Type '{content_type or 'none'}': send multipart/form-data with a "
        f"'{field}' field, or the raw image bytes with Content-Type image/png (or another image/*)"
    )


async def _decode(files: list[tuple[str, bytes]], pool: DecodePoolDep, max_pixels: int) -> np.ndarray:
    if len(files) == 1 and len(files[0][1]) <= _INLINE_DECODE_BYTES:
        # A small image decodes in well under a millisecond: cheaper on the loop than the two
        # thread hops, and the GIL would serialise it with the loop's work anyway.
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


async def _answer(predictor: Predictor, digits: np.ndarray, debug: bool) -> list[Prediction]:
    probs = await predictor.predict(digits)
    return to_predictions(probs, predictor.version, list(digits) if debug else None)


@router.post("/predict", openapi_extra=_SINGLE, summary="Classify one image")
async def predict(
    request: Request,
    predictor: PredictorDep,
    settings: SettingsDep,
    pool: DecodePoolDep,
    debug: bool = Query(False, description="Also return the 28x28 image the model saw."),
) -> Prediction:
    """Upload an image as multipart field `file`, or as the raw body with an image/* Content-Type."""
    files = await _uploads(request, "file", 1, settings.max_upload_bytes)
    if len(files) > 1:
        raise BadRequest("send exactly one file to /predict; use /predict/batch for several")
    digits = await _decode(files, pool, settings.max_image_pixels)
    return (await _answer(predictor, digits, debug))[0]


@router.post("/predict/batch", openapi_extra=_BATCH, summary="Classify several images")
async def predict_batch(
    request: Request,
    predictor: PredictorDep,
    settings: SettingsDep,
    pool: DecodePoolDep,
    debug: bool = Query(False, description="Also return the 28x28 images the model saw."),
) -> list[Prediction]:
    """Upload images as repeated multipart field `files`; answers in the same order."""
    files = await _uploads(request, "files", settings.max_batch_files, settings.max_upload_bytes)
    if len(files) > settings.max_batch_files:
        raise BadRequest(f"at most {settings.max_batch_files} files per batch (MAX_BATCH_FILES)")
    digits = await _decode(files, pool, settings.max_image_pixels)
    return await _answer(predictor, digits, debug)


@router.post("/predict/pixels", summary="Classify raw 28x28 pixels")
async def predict_pixels(
    body: PixelsRequest,
    predictor: PredictorDep,
    debug: bool = Query(False, description="Also return the 28x28 image the model saw."),
) -> Prediction:
    """784 integers 0-255 (flat or 28x28), white on black, fed to the model as given."""
    digit = pixels_to_digit(body.pixels)
    return (await _answer(predictor, digit[None], debug))[0]
