"""Domain errors, each carrying the HTTP status it maps to; mapped to responses once, in api.py.

They are HTTPExceptions so that FastAPI passes them through unchanged even when raised while
it reads a body (it turns other exceptions there into a vague 400).
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException


def error_body(detail: str, request_id: str | None, path: str) -> dict[str, Any]:
    """The JSON of an error answer; on /v2 paths it also carries the protocol's `error` field."""
    body: dict[str, Any] = {"detail": detail, "request_id": request_id}
    if path.startswith("/v2"):
        body["error"] = detail
    return body


class ServiceError(HTTPException):
    """Base of the errors a client can cause or see; `detail` is safe to show to the client."""

    code = 500

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=self.code, detail=detail, headers=headers)


class InvalidInput(ServiceError):
    """The request is well-formed HTTP but its content can't be used (bad image, bad pixels)."""

    code = 422


class BadRequest(ServiceError):
    """The request is malformed (wrong field, wrong content type, wrong shape in v2)."""

    code = 400


class PayloadTooLarge(ServiceError):
    code = 413


class RequestTimeout(ServiceError):
    """The client sent its body too slowly; the connection is closed after the answer."""

    code = 408

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Connection": "close"})


class UnsupportedMediaType(ServiceError):
    code = 415


class Unauthorized(ServiceError):
    code = 401


class Forbidden(ServiceError):
    code = 403


class NotFound(ServiceError):
    code = 404


class Overloaded(ServiceError):
    """The queue is full or the deadline passed: the client should retry later."""

    code = 503

    def __init__(self, detail: str, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class ModelNotReady(ServiceError):
    code = 503

    def __init__(self, detail: str = "the model is not loaded yet; retry when /readyz answers 200") -> None:
        super().__init__(detail, headers={"Retry-After": "1"})
