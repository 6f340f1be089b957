"""Probes, model metadata and metrics: always open, so an API key never breaks Kubernetes."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mnist_service.registry.registry import Registry
from mnist_service.serving.deps import MetricsDep, RegistryDep
from mnist_service.serving.schemas import ERROR_RESPONSES, Health, ModelInfo, Readiness, VersionInfo

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
    """200 once the default model version is loaded and warmed; 503 while loading or draining."""
    state = request.app.state
    registry: Registry | None = getattr(state, "registry", None)
    default = registry.default if registry is not None else None
    if getattr(state, "draining", False):
        status = "draining"
    elif default is None:
        status = "loading"
    else:
        return Readiness(status="ready", model_version=default.name)
    response.status_code = 503
    return Readiness(status=status, model_version=default.name if default is not None else None)


@router.get("/model", summary="Model versions and metadata", responses={503: ERROR_RESPONSES[503]})
async def model_info(registry: RegistryDep) -> ModelInfo:
    """The default version's metadata as training wrote it, the runtime serving it, and every version this worker
    holds."""
    default = registry.resolve(None)
    versions = [
        VersionInfo(
            version=v.name,
            state=v.state.value,
            labels=registry.labels_of(v.number),
            reason=v.reason or None,
            sha256=v.predictor.sha256 if v.predictor is not None else None,
            test_accuracy=v.metadata.get("test_accuracy"),
            created_at=v.metadata.get("created_at"),
            runtimes=v.runtimes,
        )
        for v in registry.held()
    ]
    runtime = default.serving().runtime
    return ModelInfo.model_validate(
        {
            **default.metadata, "model_version": default.name, "versions": versions, "labels": registry.labels,
            "runtime": runtime.name, "runtime_version": runtime.version,
        }
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
