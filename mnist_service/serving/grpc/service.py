"""The inference.GRPCInferenceService servicer: a thin front door onto the app's data plane and registry.

Each call decodes its message (codec.py), asks the data plane for its target and its probabilities,
and encodes the answer, as the REST v2 routes do. Every call, whatever its end, gets one status with
a message a person can act on (the service's errors map to gRPC codes once, in `status_of`), is
counted in mnist_grpc_requests_total and written to the access log like an HTTP request (ACCESS_LOG),
with its request id (metadata `x-request-id`, or a new one) and trace context (`traceparent`) on
every line logged meanwhile. The id and the version that answered go back as trailing metadata.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
from fastapi import FastAPI
from pydantic import SecretStr

from mnist_service.errors import Forbidden, NotFound, ServiceError
from mnist_service.inference.predictor import InferenceFailed
from mnist_service.logconfig import REQUEST_CONTEXT, trace_context
from mnist_service.protos import grpc_predict_v2_pb2 as pb
from mnist_service.protos import grpc_predict_v2_pb2_grpc as pb_grpc
from mnist_service.registry.registry import State
from mnist_service.serving.dataplane import RequestInfo
from mnist_service.serving.deps import keys_from, verify_key
from mnist_service.serving.grpc import codec
from mnist_service.serving.middleware import request_id_for
from mnist_service.serving.routes.v2 import SERVER_NAME

logger = logging.getLogger(__name__)
access_log = logging.getLogger("mnist_service.access")  # the HTTP requests' access log

SERVICE = "inference.GRPCInferenceService"
_Reply = TypeVar("_Reply")

# The HTTP status each service error carries, as the gRPC code that means the same.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
}


@dataclass(slots=True)
class Call:
    """What one call is known by: its metadata, its request id, and the version that answered."""

    method: str
    metadata: dict[str, str]
    request_id: str
    version: str = ""
    trailing: list[tuple[str, str]] = field(default_factory=list)


def status_of(exc: BaseException, request_id: str) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """(code, message, trailing metadata) for an error; what is not the client's is logged, never sent."""
    if isinstance(exc, ServiceError):
        headers = exc.headers or {}
        trailing = [("retry-after", headers["Retry-After"])] if "Retry-After" in headers else []
        return _CODES.get(exc.status_code, grpc.StatusCode.INTERNAL), str(exc.detail), trailing
    if isinstance(exc, InferenceFailed):  # the batcher logged the cause
        return grpc.StatusCode.INTERNAL, f"inference failed; quote request id {request_id} when reporting it", []
    logger.error("unhandled error (request_id=%s)", request_id, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error; quote request id {request_id} when reporting it", []


def is_ready(app: FastAPI) -> bool:
    """What /readyz says: the default version is loaded and the server is not draining."""
    registry = getattr(app.state, "registry", None)
    return not app.state.draining and registry is not None and registry.default is not None


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs over one worker's app state (built by create_app and its lifespan)."""

    def __init__(self, app: FastAPI) -> None:
        state = app.state
        self.app = app
        self.settings = state.settings
        self.metrics = state.metrics
        self.dataplane = state.dataplane
        self.in_flight = state.in_flight  # counts this worker's gRPC calls beside its HTTP requests
        self.registry = state.registry
        self.model_name: str = self.settings.model_name
        self.log_all = self.settings.access_log == "all"
        self.log_errors = self.settings.access_log != "off"

    # ---- the protocol's RPCs ---------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._serve("ServerLive", context, lambda call: _now(pb.ServerLiveResponse(live=True)))

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._serve(
            "ServerReady", context, lambda call: _now(pb.ServerReadyResponse(ready=is_ready(self.app)))
        )

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        extensions = ["model_repository"] if self.settings.admin_api_key is not None else []
        answer = pb.ServerMetadataResponse(name=SERVER_NAME, version=self.app.version, extensions=extensions)
        return await self._serve("ServerMetadata", context, lambda call: _now(answer))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._serve("ModelReady", context, lambda call: self._model_ready(request, call))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._serve("ModelMetadata", context, lambda call: self._model_metadata(request, call))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._serve("ModelInfer", context, lambda call: self._infer(request, call))

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self._serve("RepositoryIndex", context, lambda call: self._index(request, call))

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        return await self._serve("RepositoryModelLoad", context, lambda call: self._load(request, call))

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        return await self._serve("RepositoryModelUnload", context, lambda call: self._unload(request, call))

    # ---- what each does ----------------------------------------------------------------------------

    async def _model_ready(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        self._check_key(call, self.settings.api_key, "API key")
        self._known(request.name)
        if not is_ready(self.app):
            return pb.ModelReadyResponse(ready=False)
        try:
            call.version = self.dataplane.target(request.version).version.name
        except NotFound:
            raise
        except ServiceError:  # loading, or unloading: not ready, which is this RPC's answer
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def _model_metadata(self, request: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        self._check_key(call, self.settings.api_key, "API key")
        self._known(request.name)
        target = self.dataplane.target(request.version)
        call.version = target.version.name
        versions = [target.version.name] if target.pinned else [v.name for v in self.registry.ready()]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model_name,
            versions=versions,
            platform=target.version.serving().runtime.platform,
            inputs=[tensor(name="input", datatype="FP32", shape=[-1, 1, 28, 28])],
            outputs=[
                tensor(name="probabilities", datatype="FP32", shape=[-1, 10]),
                tensor(name="prediction", datatype="INT64", shape=[-1]),
            ],
        )

    async def _infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        self._check_key(call, self.settings.api_key, "API key")
        self._known(request.model_name)
        digits = codec.decode_request(request, self.settings.max_batch_files)
        outputs = codec.requested_outputs(request)
        target = self.dataplane.target(request.model_version)
        call.version = target.version.name
        # Never inline on the event loop: it serves every stream of every gRPC connection of this worker.
        request_info = RequestInfo(call.request_id, f"/{SERVICE}/{call.method}")
        future = self.dataplane.submit(target, digits, alone=False, request=request_info)
        try:
            probs: np.ndarray = await future
        except asyncio.CancelledError:
            future.cancel()  # the client cancelled, or its deadline passed: the batcher skips the work
            raise
        return codec.encode_response(
            probs, outputs, codec.wants_raw(request), self.model_name, call.version, request.id
        )

    async def _index(self, request: pb.RepositoryIndexRequest, call: Call) -> pb.RepositoryIndexResponse:
        self._check_admin_key(call)
        entries = [e for e in self.registry.index() if not request.ready or e["state"] == State.READY.value]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**e) for e in entries])

    async def _load(self, request: pb.RepositoryModelLoadRequest, call: Call) -> pb.RepositoryModelLoadResponse:
        self._check_admin_key(call)
        self._known(request.model_name)
        await self.dataplane.load(request.parameters)
        return pb.RepositoryModelLoadResponse()

    async def _unload(
        self, request: pb.RepositoryModelUnloadRequest, call: Call
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_admin_key(call)
        self._known(request.model_name)
        await self.dataplane.unload()
        return pb.RepositoryModelUnloadResponse()

    # ---- shared by every call ----------------------------------------------------------------------

    def _known(self, model_name: str) -> None:
        if model_name != self.model_name:
            raise NotFound(f"unknown model '{model_name[:64]}': this server serves '{self.model_name}'")

    def _check_admin_key(self, call: Call) -> None:
        if self.settings.admin_api_key is None:
            raise Forbidden("the model repository API is off: start the server with ADMIN_API_KEY set to use it")
        self._check_key(call, self.settings.admin_api_key, "admin key (ADMIN_API_KEY)")

    @staticmethod
    def _check_key(call: Call, expected: SecretStr | None, name: str) -> None:
        """The key as metadata `authorization: Bearer <key>` or `x-api-key`, as on HTTP; nothing when unset."""
        if expected is None:
            return
        verify_key(expected, keys_from(call.metadata.get("authorization"), call.metadata.get("x-api-key")), name)

    async def _serve(
        self, method: str, context: grpc.aio.ServicerContext, answer: Callable[[Call], Awaitable[_Reply]]
    ) -> _Reply:
        """Run `answer` for one call: its status, trailing metadata, metrics and access line."""
        started = time.perf_counter()
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        call = Call(method, metadata, request_id_for(metadata.get("x-request-id")))
        logged_as = {"request_id": call.request_id, **trace_context(metadata.get("traceparent"))}
        context_token = REQUEST_CONTEXT.set(logged_as)
        code = grpc.StatusCode.OK
        self.in_flight.grpc += 1
        try:
            reply = await answer(call)
        except asyncio.CancelledError:
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message, trailing = status_of(exc, call.request_id)
            await context.abort(code, message, (*self._trailing(call), *trailing))  # raises
        else:
            context.set_trailing_metadata(self._trailing(call))
            return reply
        finally:
            self.in_flight.grpc -= 1
            self._done(call, code, time.perf_counter() - started)
            REQUEST_CONTEXT.reset(context_token)

    @staticmethod
    def _trailing(call: Call) -> tuple[tuple[str, str], ...]:
        version = (("x-model-version", call.version),) if call.version else ()
        return (("x-request-id", call.request_id), *version)

    def _done(self, call: Call, code: grpc.StatusCode, seconds: float) -> None:
        self.metrics.grpc_call_done(call.method, code.name, call.version, seconds)
        if self.log_all or (self.log_errors and code != grpc.StatusCode.OK):
            access_log.info(
                "protocol=grpc method=%s code=%s version=%s ms=%.2f request_id=%s",
                call.method, code.name, call.version or "-", seconds * 1000, call.request_id,
                extra={"protocol": "grpc", "method": call.method, "code": code.name, "version": call.version,
                       "duration_ms": round(seconds * 1000, 2)},
            )


async def _now(reply: _Reply) -> _Reply:
    return reply
