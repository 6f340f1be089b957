"""Ground truth from users: label a captured prediction, send a labelled example, see or erase a capture.

All need the API key (as predictions do) and capture on (CAPTURE_SAMPLE > 0): with it off the
server keeps nothing to label, and these routes answer 404 saying so. The capture database is
reached in a thread (capture/recorder.py); when it is down they answer 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request
from PIL import Image

from mnist_service.capture.recorder import Recorder
from mnist_service.capture.store import CaptureStore, CaptureUnavailable, as_row
from mnist_service.errors import NotFound, ServiceError
from mnist_service.inference.images import png_bytes
from mnist_service.inference.runtime import CLASS_LABELS
from mnist_service.metrics import Metrics
from mnist_service.registry.registry import Registry
from mnist_service.serving.deps import (
    MetricsDep,
    RegistryDep,
    get_dataplane,
    request_info,
    require_api_key,
    resolve_target,
)
from mnist_service.serving.schemas import (
    ERROR_RESPONSES,
    CapturedImage,
    Erasure,
    FeedbackReceipt,
    FeedbackRequest,
)
from mnist_service.serving.upload_codec import IMAGE_TYPES, decode_uploads, parse_uploads
from mnist_service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A capture reaches the database within the writer's flush interval (0.5 s), from whichever worker
# answered: feedback sent right after the answer looks this long before it says 404.
FIND_PATIENCE_S = 2.0

router = APIRouter(tags=["feedback"], responses=ERROR_RESPONSES, dependencies=[Depends(require_api_key)])


class CaptureDatabaseDown(ServiceError):
    code = 503

    def __init__(self) -> None:
        super().__init__("the capture database is unavailable; retry shortly", headers={"Retry-After": "5"})


def get_capture(request: Request) -> Recorder:
    """The worker's capture, or 404 while capture is off."""
    capture: Recorder | None = getattr(request.app.state, "capture", None)
    if capture is None:
        raise NotFound(
            "feedback is off: this server keeps no captures (start it with CAPTURE_SAMPLE > 0, "
            "see docs/ground-truth.md)"
        )
    return capture


CaptureDep = Annotated[Recorder, Depends(get_capture)]


async def _run(capture: Recorder, operation: Callable[[CaptureStore], T]) -> T:
    try:
        return await capture.run(operation)
    except CaptureUnavailable as exc:
        logger.error("capture: the database %s failed a feedback request: %s", capture.where, exc)
        raise CaptureDatabaseDown() from None


def _count(metrics: Metrics, registry: Registry, version: str, prediction: int, label: int) -> None:
    """A first label for a captured answer: live accuracy's numerator and denominator, and its confusion."""
    metrics.feedback.labels(version, "correct" if prediction == label else "wrong").inc()
    if prediction != label:
        metrics.feedback_wrong.labels(version, str(prediction), str(label)).inc()
    held = registry.versions.get(int(version)) if version.isdigit() else None
    accuracy = held.metadata.get("test_accuracy") if held is not None else None
    if accuracy is not None:  # what live accuracy is compared with (MnistLiveAccuracyLow)
        metrics.test_accuracy.labels(version).set(float(accuracy))


@router.post("/feedback", summary="Say what a predicted digit really was")
async def feedback(
    body: FeedbackRequest, capture: CaptureDep, metrics: MetricsDep, registry: RegistryDep
) -> FeedbackReceipt:
    """Label a captured prediction by its request id (the answer's X-Request-ID). A second label for the
    same image replaces the first (`replaced`, `previous_label`). 404 when the request was not captured."""
    deadline = time.monotonic() + FIND_PATIENCE_S
    while (before := await _run(capture, lambda s: s.label(body.request_id, body.item, body.label))) is None:
        if time.monotonic() >= deadline:
            raise NotFound(await _not_found(capture, body.request_id, body.item))
        capture.flush_soon()  # it may still be in this worker's buffer
        await asyncio.sleep(0.1)
    replaced = before.label is not None
    if not replaced:
        _count(metrics, registry, before.version, before.prediction, body.label)
    await capture.refresh_counts()
    said = f"model version {before.version} said {before.prediction}"
    if replaced:
        detail = f"label {body.label} replaces label {before.label} for request {body.request_id} ({said})"
    else:
        detail = f"label {body.label} recorded for request {body.request_id} ({said})"
    logger.info("feedback: %s, item %d", detail, body.item)
    return FeedbackReceipt(
        request_id=body.request_id, item=body.item, label=body.label, prediction=before.prediction,
        model_version=before.version, correct=before.prediction == body.label, replaced=replaced,
        previous_label=before.label, detail=detail,
    )


async def _not_found(capture: Recorder, request_id: str, item: int) -> str:
    captured = await _run(capture, lambda s: s.find(request_id))
    if captured:
        return f"request {request_id} has {len(captured)} captured images: item is 0 to {len(captured) - 1}, not {item}"
    return (
        f"no captured prediction has request id {request_id}: it was not sampled (CAPTURE_SAMPLE="
        f"{capture.sample:g}), was deleted (retention or erasure), or never existed. To teach the model "
        "anyway, send the image with its label to POST /feedback/examples"
    )


_UPLOAD = {"type": "string", "format": "binary"}
_EXAMPLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": _UPLOAD}, "required": ["file"]}
            },
            **{media_type: {"schema": _UPLOAD} for media_type in IMAGE_TYPES},
        },
    },
}


@router.post(
    "/feedback/examples", summary="Send a labelled example", status_code=201, openapi_extra=_EXAMPLE_BODY
)
async def feedback_example(
    request: Request,
    capture: CaptureDep,
    label: Annotated[int, Query(ge=0, le=len(CLASS_LABELS) - 1, description="What the digit is.")],
) -> FeedbackReceipt:
    """An image with its label (a user correcting the model with a new drawing), as for /predict: multipart
    field `file` or a raw image body. It is preprocessed and answered by the default version like a
    prediction, and stored as a labelled capture under this request's id. Not counted in live accuracy."""
    settings: Settings = request.app.state.settings
    target = resolve_target(request, None)
    files = parse_uploads(request.headers.get("content-type", ""), await request.body(), "file", 1)
    digits = await decode_uploads(files, request.app.state.decode_pool, settings.max_image_pixels)
    probs = await get_dataplane(request).infer(target, digits)  # no RequestInfo: stored below, labelled
    info = request_info(request)
    row = as_row(info.request_id, 0, time.time(), info.route, target.version.name, digits[0], probs[0], label)
    await _run(capture, lambda s: s.insert([row]))
    await capture.refresh_counts()
    prediction = row[5]
    detail = f"example labelled {label} stored as request {info.request_id} (model version {row[4]} said {prediction})"
    logger.info("feedback: %s", detail)
    return FeedbackReceipt(
        request_id=info.request_id, item=0, label=label, prediction=prediction, model_version=row[4],
        correct=prediction == label, replaced=False, previous_label=None, detail=detail,
    )


@router.get("/captures/{request_id}", summary="What was kept of a request")
async def captured(
    request_id: Annotated[str, Path(max_length=128, description="The request id (X-Request-ID).")],
    capture: CaptureDep,
) -> list[CapturedImage]:
    """Every captured image of one request, with its answer and label (an access request). 404 if none is stored."""
    found = await _run(capture, lambda s: s.find(request_id))
    if not found:
        raise NotFound(f"no captured prediction has request id {request_id}")
    return [
        CapturedImage(
            item=c.item, captured_at=c.captured_at, route=c.route, model_version=c.version, prediction=c.prediction,
            probabilities=c.probabilities.tolist(), label=c.label,
            image_png_base64=base64.b64encode(png_bytes(Image.fromarray(c.image))).decode(),
        )
        for c in found
    ]


@router.delete("/captures/{request_id}", summary="Erase a captured request")
async def erase(
    request_id: Annotated[str, Path(max_length=128, description="The request id (X-Request-ID) to erase.")],
    capture: CaptureDep,
) -> Erasure:
    """Delete every captured image of one request, labelled or not (an erasure request). 404 if none is stored."""
    # A capture still in a worker's buffer would be written after the delete: let the writers flush first.
    capture.flush_soon()
    await asyncio.sleep(2 * capture.flush_s)
    deleted = await _run(capture, lambda s: s.delete(request_id))
    if not deleted:
        raise NotFound(f"no captured prediction has request id {request_id}")
    logger.info("capture: erased request %s (%d images)", request_id, deleted)
    await capture.refresh_counts()
    return Erasure(request_id=request_id, deleted=deleted)
