"""Open Inference Protocol (v2) endpoints: a thin front door to the same Predictor.

Any KServe or Triton client can call these. Every error of these routes, whoever raised it (auth,
the predictor, body parsing), is rendered in the protocol's shape {"error": "..."}, because
clients such as tritonclient read that key and nothing else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from mnist_service.errors import ModelNotReady, NotFound, UnsupportedMediaType
from mnist_service.inference.predictor import InferenceFailed
from mnist_service.serving import v2_codec
from mnist_service.serving.dataplane import Target
from mnist_service.serving.deps import (
    DataPlaneDep,
    RegistryDep,
    SettingsDep,
    request_info,
    require_api_key,
    resolve_target,
)
from mnist_service.serving.schemas import ErrorResponse, error_responses
from mnist_service.serving.v2_schemas import (
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    V2Error,
)

logger = logging.getLogger(__name__)

SERVER_NAME = "mnist-service"
HEADER_LENGTH = "Inference-Header-Content-Length"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class ProtocolRoute(APIRoute):
    """An APIRoute whose errors come out as {"error": ...} with their own status (422 becomes 400)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def protocol_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                return _error(exc.status_code, str(exc.detail), exc.headers)
            except RequestValidationError as exc:
                return _error(400, f"invalid request: {v2_codec.describe_errors(exc.errors())}")
            except InferenceFailed:
                # The batcher logged the cause; the client gets the id to quote.
                request_id = getattr(request.state, "request_id", None)
                return _error(500, f"inference failed; quote request id {request_id} when reporting it")

        return protocol_errors


router = APIRouter(tags=["v2"], route_class=ProtocolRoute)


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its $defs substituted in place, to embed in an OpenAPI operation."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


_ERROR_SCHEMA = V2Error.model_json_schema()
_BINARY_SCHEMA = {"type": "string", "format": "binary"}
_ERRORS = error_responses(
    V2Error,
    {
        400: "Bad JSON, datatype, shape, data length or binary sizes.",
        401: "Missing or wrong API key (only when API_KEY is set).",
        404: "Unknown model name or version.",
        415: "Compressed request bodies (Content-Encoding) are not supported.",
        500: "Inference failed; quote the request id.",
        503: "Overloaded or not ready; retry after the Retry-After seconds.",
    },
)
# The app's middleware refuses an over-long Content-Length before any route runs, in its own shape.
_ERRORS[413] = {
    "description": "Body over MAX_UPLOAD_BYTES.",
    "content": {"application/json": {"schema": {"anyOf": [_ERROR_SCHEMA, ErrorResponse.model_json_schema()]}}},
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "JSON, or with the binary tensor data extension: the JSON header, then the raw tensor bytes, "
            "with the header's length in the Inference-Header-Content-Length HTTP header."
        ),
        "content": {
            "application/json": {"schema": _inline(InferenceRequest.model_json_schema())},
            "application/octet-stream": {"schema": _BINARY_SCHEMA},
        },
    },
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferenceResponse,
        "description": (
            "JSON; or, when an output asks for binary_data, the JSON header then the raw outputs, "
            "with Inference-Header-Content-Length."
        ),
        "content": {"application/octet-stream": {"schema": _BINARY_SCHEMA}},
    },
    **_ERRORS,
}


def _unready_reason(request: Request) -> str | None:
    """Why the server can't take inference now, or None when it can."""
    registry = getattr(request.app.state, "registry", None)
    if request.app.state.draining:
        return "the server is draining before shutdown; use another replica"
    if registry is None or registry.default is None:
        return "the model is still loading; retry shortly"
    return None


_NOT_READY: dict[int | str, dict[str, Any]] = {503: {"model": V2Error, "description": "Loading, or draining."}}


@router.get("/v2", summary="v2 server metadata")
async def server_metadata(request: Request) -> ServerMetadata:
    """Server name, version and protocol extensions."""
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=["binary_tensor_data"])


@router.get("/v2/health/live", summary="v2 liveness")
async def server_live() -> ServerLive:
    """200 while the process can answer at all."""
    return ServerLive(live=True)


@router.get("/v2/health/ready", summary="v2 readiness", responses=_NOT_READY)
async def server_ready(request: Request) -> ServerReady:
    """200 once the model is loaded; 503 while loading or draining."""
    reason = _unready_reason(request)
    if reason is not None:
        raise ModelNotReady(reason)
    return ServerReady(ready=True)


def _model(model_name: Annotated[str, Path(description="The served model's name (MODEL_NAME).")],
           settings: SettingsDep) -> None:
    if model_name != settings.model_name:
        raise NotFound(f"unknown model '{model_name[:64]}': this server serves '{settings.model_name}'")


def _version(
    model_version: Annotated[
        str, Path(description="A loaded version number, or stable / canary (GET /v2/models/<name> lists them).")
    ],
) -> None:
    """Declares the path parameter; `_requested` resolves it, for both routes of an endpoint."""


def _requested(request: Request) -> Target:
    """The version named in the path, or the default one."""
    return resolve_target(request, request.path_params.get("model_version"))


def _add(suffix: str, endpoint: Callable[..., Any], method: str, **kwargs: Any) -> None:
    """Serve a model endpoint both at /v2/models/{name}<suffix> and under /versions/{version}."""
    checks = [Depends(require_api_key), Depends(_model)]
    router.add_api_route(f"/v2/models/{{model_name}}{suffix}", endpoint, methods=[method], dependencies=checks,
                         **kwargs)
    router.add_api_route(
        f"/v2/models/{{model_name}}/versions/{{model_version}}{suffix}", endpoint, methods=[method],
        dependencies=[*checks, Depends(_version)], **kwargs,
    )


async def model_metadata(request: Request, registry: RegistryDep, settings: SettingsDep) -> ModelMetadata:
    """Name, versions (every loaded one; or the one in the path), platform (the runtime, as Triton names it) and
    the tensors."""
    target = _requested(request)
    version = target.version
    versions = [version.name] if target.pinned else [v.name for v in registry.ready()]
    image = {"FP32": "pixel / 255 in [0, 1]", "UINT8": "pixels 0-255"}
    return ModelMetadata(
        name=settings.model_name,
        versions=versions,
        platform=version.serving().runtime.platform,
        inputs=[
            MetadataTensor(
                name="input",
                datatype="FP32",
                shape=[-1, 1, 28, 28],
                parameters={
                    "datatypes": image,
                    "shapes": [[-1, 1, 28, 28], [-1, 28, 28], [-1, 784]],
                    "content": "white digit on black, as in MNIST; any input name is accepted",
                    "max_batch_size": settings.max_batch_files,
                },
            )
        ],
        outputs=[
            MetadataTensor(name="probabilities", datatype="FP32", shape=[-1, 10]),
            MetadataTensor(name="prediction", datatype="INT64", shape=[-1]),
        ],
        parameters={
            "test_accuracy": version.metadata.get("test_accuracy"),
            "default_version": version.name,
            "labels": registry.labels,
        },
    )


async def model_ready(request: Request, settings: SettingsDep) -> ModelReady:
    """200 when the model (or the version in the path) can take requests; 503 while loading or draining."""
    reason = _unready_reason(request)
    if reason is not None:
        raise ModelNotReady(reason)
    return ModelReady(name=settings.model_name, version=_requested(request).version.name, ready=True)


async def infer(
    request: Request,
    dataplane: DataPlaneDep,
    settings: SettingsDep,
    inference_header_content_length: Annotated[
        int | None,
        Header(ge=1, description="Binary tensor data extension: byte length of the JSON header opening the body."),
    ] = None,
) -> Response:
    """Classify N digits sent as one FP32 or UINT8 tensor, as JSON or binary tensor data."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding '{encoding[:32]}' is not supported: send the body uncompressed")
    header, binary = v2_codec.split_body(await request.body(), inference_header_content_length)
    parsed = v2_codec.parse_request(header)
    digits = v2_codec.decode_input(parsed.inputs[0], binary, settings.max_batch_files)
    outputs = v2_codec.requested_outputs(parsed)
    target = _requested(request)
    probs = await dataplane.infer(target, digits, request=request_info(request))
    body, header_length = v2_codec.encode_response(probs, outputs, settings.model_name, target.version.name, parsed.id)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


_add("", model_metadata, "GET", summary="v2 model metadata", responses=_ERRORS)
_add("/ready", model_ready, "GET", summary="v2 model readiness", responses=_ERRORS)
_add("/infer", infer, "POST", summary="v2 inference", openapi_extra=_INFER_BODY, responses=_INFER_RESPONSES,
     response_class=Response)
