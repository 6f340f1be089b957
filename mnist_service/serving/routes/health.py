"""Probes, model metadata and metrics: always open, so an API key never breaks Kubernetes."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mnist_service.serving.deps import MetricsDep, PredictorDep
from mnist_service.serving.schemas import ERROR_RESPONSES, Health, ModelInfo, Readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> Health:
    """200 while the process can answer at all."""
    return Health(status="ok")


@router.get(
    "/readyz",
    summary="Readiness",
    responses={503: {"model": Readiness, "description": "Loading, or draining after SIGTERM."}},
)
async def readyz(request: Request, response: Response) -> Readiness:
    """200 once the model is loaded and warmed; 503 while loading or draining."""
    state = request.app.state
    predictor = getattr(state, "predictor", None)
    if getattr(state, "draining", False):
        status = "draining"
    elif predictor is None or not predictor.ready:
        status = "loading"
    else:
        return Readiness(status="ready", model_version=predictor.version)
    response.status_code = 503
    return Readiness(status=status, model_version=predictor.version if predictor is not None else None)


@router.get("/model", summary="Model metadata", responses={503: ERROR_RESPONSES[503]})
async def model_info(predictor: PredictorDep) -> ModelInfo:
    """The metadata written by training: version, accuracy, input spec, confusion matrix, …"""
    return ModelInfo.model_validate(predictor.metadata)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
