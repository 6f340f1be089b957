"""Our own prediction endpoints: image upload (multipart or raw body), batches, and raw pixels.

Thin front doors onto the data plane: each reads its request with upload_codec, calls the
DataPlane, and writes the answer with upload_codec. The two upload routes take only the Request
and do by hand what dependency injection, Starlette's form parser and response-model validation
would do (benchmarks/profile.md has what each cost); what they declare in OpenAPI (the debug
parameter, the API key, the response model) is written out in openapi_extra instead. With
HOT_PATH on, a real server answers POST /predict below ASGI (protocol.py) with the same codec;
these routes stay the reference and answer everything the hot path hands back.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from mnist_service.inference.preprocess import pixels_to_digit
from mnist_service.serving.deps import (
    API_KEY_SECURITY,
    VERSION_DOC,
    DataPlaneDep,
    TargetDep,
    check_api_key,
    get_dataplane,
    request_info,
    require_api_key,
    resolve_target,
)
from mnist_service.serving.schemas import ERROR_RESPONSES, Comparison, PixelsRequest, Prediction
from mnist_service.serving.upload_codec import (
    IMAGE_TYPES,
    decode_uploads,
    encode_json,
    parse_debug,
    parse_uploads,
    prediction_dicts,
)
from mnist_service.settings import Settings

router = APIRouter(tags=["predict"], responses=ERROR_RESPONSES)

_UPLOAD_SCHEMA = {"type": "string", "format": "binary"}
_DEBUG_DOC = "Also return the 28x28 image(s) the model saw, as base64 PNG."
_DEBUG_PARAM = {
    "name": "debug", "in": "query", "required": False, "description": _DEBUG_DOC,
    "schema": {"type": "boolean", "default": False},
}
_VERSION_PARAM = {
    "name": "version", "in": "query", "required": False, "description": VERSION_DOC,
    "schema": {"type": "string", "maxLength": 64},
}


def _operation(field_schema: dict[str, Any], field: str, raw_body: bool, pinned: bool = True) -> dict[str, Any]:
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {"type": "object", "properties": {field: field_schema}, "required": [field]}
        }
    }
    if raw_body:
        for media_type in (*IMAGE_TYPES, "application/octet-stream"):
            content[media_type] = {"schema": _UPLOAD_SCHEMA}
    return {
        "requestBody": {"required": True, "content": content},
        "parameters": [_DEBUG_PARAM, _VERSION_PARAM] if pinned else [_DEBUG_PARAM],
        "security": API_KEY_SECURITY,
    }


_SINGLE = _operation(_UPLOAD_SCHEMA, "file", raw_body=True)
_BATCH = _operation({"type": "array", "items": _UPLOAD_SCHEMA}, "files", raw_body=False)
_COMPARE = _operation(_UPLOAD_SCHEMA, "file", raw_body=True, pinned=False)


async def _classify_uploads(request: Request, field: str, max_files: int) -> list[dict[str, Any]]:
    """Everything an upload route does, in the order a client's mistakes should be reported."""
    settings: Settings = request.app.state.settings
    check_api_key(request, settings)
    target = resolve_target(request, request.query_params.get("version"))
    debug = parse_debug(request.query_params.get("debug"))
    files = parse_uploads(request.headers.get("content-type", ""), await request.body(), field, max_files)
    digits = await decode_uploads(files, request.app.state.decode_pool, settings.max_image_pixels)
    probs = await get_dataplane(request).infer(target, digits, request=request_info(request))
    return prediction_dicts(probs, target.version, digits if debug else None)


@router.post("/predict", response_model=Prediction, openapi_extra=_SINGLE, summary="Classify one image")
async def predict(request: Request) -> Response:
    """Upload an image as multipart field `file`, or as the raw body with an image/* Content-Type."""
    return Response(encode_json((await _classify_uploads(request, "file", 1))[0]), media_type="application/json")


@router.post(
    "/predict/batch", response_model=list[Prediction], openapi_extra=_BATCH, summary="Classify several images"
)
async def predict_batch(request: Request) -> Response:
    """Upload images as repeated multipart field `files`; answers in the same order."""
    answers = await _classify_uploads(request, "files", request.app.state.settings.max_batch_files)
    return Response(encode_json(answers), media_type="application/json")


@router.post(
    "/predict/compare", response_model=Comparison, openapi_extra=_COMPARE, summary="Every loaded version on one image"
)
async def predict_compare(request: Request) -> Response:
    """One image (like /predict), answered by every loaded version: compare models on the same input."""
    settings: Settings = request.app.state.settings
    check_api_key(request, settings)
    dataplane = get_dataplane(request)
    debug = parse_debug(request.query_params.get("debug"))
    files = parse_uploads(request.headers.get("content-type", ""), await request.body(), "file", 1)
    digits = await decode_uploads(files, request.app.state.decode_pool, settings.max_image_pixels)
    answers = await dataplane.compare(digits)
    predictions = [prediction_dicts(probs, v, digits if debug else None)[0] for v, probs in answers]
    default = dataplane.registry.default
    comparison = {
        "default_version": default.name if default is not None else None,
        "agree": len({p["prediction"] for p in predictions}) == 1,
        "predictions": predictions,
    }
    return Response(encode_json(comparison), media_type="application/json")


@router.post("/predict/pixels", summary="Classify raw 28x28 pixels", dependencies=[Depends(require_api_key)])
async def predict_pixels(
    request: Request,
    body: PixelsRequest,
    dataplane: DataPlaneDep,
    target: TargetDep,
    debug: bool = Query(False, description=_DEBUG_DOC),
) -> Prediction:
    """784 integers 0-255 (flat or 28x28), white on black, fed to the model as given."""
    digit = pixels_to_digit(body.pixels)[None]
    probs = await dataplane.infer(target, digit, request=request_info(request))
    return Prediction(**prediction_dicts(probs, target.version, digit if debug else None)[0])
