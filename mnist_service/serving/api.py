"""The FastAPI app factory: `uvicorn mnist_service.serving.api:create_app --factory`."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from mnist_service.capture.recorder import capture_from_settings
from mnist_service.errors import error_body
from mnist_service.inference import runtime
from mnist_service.inference.images import noise_image, png_bytes
from mnist_service.inference.predictor import InferenceFailed, Predictor
from mnist_service.inference.preprocess import image_to_digit
from mnist_service.metrics import Metrics
from mnist_service.registry.registry import Registry
from mnist_service.registry.repository import VersionFiles
from mnist_service.serving.dataplane import DataPlane, InFlight
from mnist_service.serving.direct import ServiceApp
from mnist_service.serving.middleware import RequestContextMiddleware
from mnist_service.serving.routes import feedback, health, predict, repository, v2, web
from mnist_service.settings import Settings

logger = logging.getLogger(__name__)


def build_predictor(settings: Settings, metrics: Metrics, files: VersionFiles, version: str) -> Predictor:
    """Load, verify, optimise and warm one model version with RUNTIME: everything before its first request."""
    loaded, metadata = runtime.load(settings.runtime, files.model_path, files.metadata_path, settings.torch_threads)
    predictor = Predictor(
        loaded,
        metadata,
        metrics,
        version=version,
        max_batch_size=settings.max_batch_size,
        max_batch_delay_ms=settings.max_batch_delay_ms,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
    )
    predictor.warm_up()
    return predictor


@asynccontextmanager
async def lifespan(app: ServiceApp) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    overrides = settings.runtime_dir / "repository-overrides.json" if settings.runtime_dir else None
    registry = Registry(
        settings, app.state.metrics, functools.partial(build_predictor, settings, app.state.metrics), overrides
    )
    await registry.start()
    # The first decode imports PIL's plugins and numpy's paths: pay that here, not in a request.
    await asyncio.to_thread(image_to_digit, png_bytes(noise_image(64)))
    app.state.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
    app.state.registry = registry
    # Capture (CAPTURE_SAMPLE > 0): its writer thread starts even if the database is down or read-only
    # (it logs that and retries), so serving never waits for it.
    app.state.capture = capture = capture_from_settings(settings, app.state.metrics)
    if capture is not None:
        capture.start()
        for version in registry.ready():
            capture.expect_feedback(version.name)
    app.state.dataplane = DataPlane(registry, app.state.in_flight, capture)
    # Everything loaded so far (the runtime, the model, FastAPI's routes) lives as long as the process.
    # Freezing it keeps the garbage collector's full passes from walking ~200,000 objects: those
    # passes stalled a worker for tens of ms every few seconds under load, which was the p99
    # (docs/performance.md).
    gc.collect()
    gc.freeze()
    logger.info(
        "serving model versions %s (default %s) from %s with %s %s",
        ", ".join(v.name for v in registry.ready()), registry.resolve(None).name, registry.where(),
        settings.runtime, registry.resolve(None).serving().runtime.version,
    )
    try:
        yield
    finally:
        await registry.stop()
        app.state.decode_pool.shutdown(wait=False, cancel_futures=True)
        if capture is not None:
            await asyncio.to_thread(capture.stop)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    # What reaches here on a v2 path (405, unknown routes) answers in the protocol's shape too.
    body = error_body(exc.detail, _request_id(request), request.url.path)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in exc.errors()[:5]
    )
    return JSONResponse({"detail": f"invalid request: {problems}", "request_id": _request_id(request)}, status_code=422)


async def _inference_failed(request: Request, exc: InferenceFailed) -> JSONResponse:
    # The cause is logged by the batcher; the client gets only the id to quote.
    return JSONResponse(
        {"detail": "inference failed; quote the request id when reporting it", "request_id": _request_id(request)},
        status_code=500,
    )


def create_app(settings: Settings | None = None) -> ServiceApp:
    """Build the app; the model loads when the app's lifespan starts."""
    settings = settings or Settings()
    metrics = Metrics(multiprocess_mode=settings.prometheus_multiproc_dir is not None)
    app = ServiceApp(
        title="MNIST digit classifier",
        summary="Upload an image of a handwritten digit, get the digit back.",
        version="1.0.0",
        lifespan=lifespan,
        # FastAPI's built-in OpenTelemetry hooks cost CPU on every request even with no exporter
        # configured; our own metrics and request-id log lines cover what is needed.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False
    app.state.in_flight = InFlight()  # filled in by the HTTP protocol: a lone request skips the batcher
    # The upload routes first: the router tries routes in order, and they take most of the traffic.
    for router in (predict.router, health.router, v2.router, repository.router, feedback.router, web.router):
        app.include_router(router)
    # The upload routes carry most of the traffic and need neither routing nor dependency injection.
    app.serve_directly(predict.router, "/predict", "/predict/batch", "/predict/compare")
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(InferenceFailed, _inference_failed)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(
        RequestContextMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_upload_bytes,
        access_log=settings.access_log,
        body_timeout_s=settings.body_timeout_s,
    )
    return app
