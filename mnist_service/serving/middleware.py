"""One pure-ASGI middleware for what every request needs: an id, a body limit, metrics, a log line.

Pure ASGI rather than BaseHTTPMiddleware, which costs a task and a copy per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnist_service.errors import PayloadTooLarge, RequestTimeout, error_body
from mnist_service.logconfig import REQUEST_CONTEXT, trace_context
from mnist_service.metrics import Metrics

access_log = logging.getLogger("mnist_service.access")
logger = logging.getLogger(__name__)

# The message a request's task is cancelled with when its client hangs up (protocol.py): this
# middleware tells that cancellation (answered 499) from a shutdown's.
CLIENT_GONE = "client disconnected"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up before its answer
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MIN_LOGGED_STATUS = {"all": 0, "errors": 400, "off": 1000}  # ACCESS_LOG -> the lowest status logged


def request_id_for(incoming: str | None) -> str:
    """A sane X-Request-ID echoed, or a new id: 32 hex digits, the time in milliseconds (48 bits) then
    80 random bits, as UUIDv7 orders them (without its version bits).

    Time first, so new ids sort after old ones: the capture database's index of request ids then grows
    at its end instead of at a random page per captured image, and SQLite's CPU per captured image stays
    about 7 µs instead of growing with the table (20 µs at 100,000 rows and 32 µs at 500,000 with random
    ids: docs/ground-truth.md#what-it-costs). The random bits come without uuid4's os.urandom() system
    call per request (random is seeded from the OS in each process): a request id names a request in
    logs; it is no secret and guards nothing.
    """
    if incoming and _SAFE_ID.match(incoming):
        return incoming
    return f"{time.time_ns() // 1_000_000:012x}{random.getrandbits(80):020x}"  # nosec B311


def log_access(method: str, path: str, status: int, version: str, elapsed: float, request_id: str) -> None:
    """The one access line of a request, as text fields and as JSON fields (LOG_FORMAT=json)."""
    fields = {"method": method, "path": path, "status": status, "version": version}
    access_log.info(
        "method=%s path=%s status=%d version=%s ms=%.2f request_id=%s",
        method, path, status, version or "-", elapsed * 1000, request_id,
        extra={**fields, "duration_ms": round(elapsed * 1000, 2)},
    )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class RequestContextMiddleware:
    """Request id (echoes a sane X-Request-ID), upload limit and deadline, per-request metrics and a
    log line (for every request, or by default only for those answered 4xx/5xx: ACCESS_LOG).

    A client that hangs up before its answer is counted and logged as 499 (nginx's "client closed
    request"), never as a server error: whether it left while its upload arrived (the body read
    sees the disconnect) or while its request waited for inference (the protocol cancels the
    request's task with CLIENT_GONE).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body_bytes: int,
        access_log: str = "errors",
        body_timeout_s: float = 30.0,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.min_logged_status = MIN_LOGGED_STATUS[access_log]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_for(_header(scope, b"x-request-id"))
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        context = REQUEST_CONTEXT.set({"request_id": request_id, **trace_context(_header(scope, b"traceparent"))})
        status = 500
        response_started = False
        client_gone = False  # the client hung up before its answer started
        body_deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        received = 0
        more_body = True

        async def guarded_receive() -> Message:
            nonlocal received, more_body, client_gone
            if not more_body:  # the body is in: what follows only reports a disconnect
                message = await receive()
            else:
                try:
                    async with asyncio.timeout_at(body_deadline):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeout(
                        f"the request body did not arrive within {self.body_timeout_s:g}s (BODY_TIMEOUT_S); "
                        "send it at once, or check the client's network"
                    ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more_body = message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise PayloadTooLarge(self._too_large())
            elif message["type"] == "http.disconnect" and not response_started:
                client_gone = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if version := state.get("model_version"):  # set by the route that picked the version
                    headers.append((b"x-model-version", version.encode()))
                message["headers"] = headers
            await send(message)

        try:
            declared = _header(scope, b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._error(send_with_id, 413, self._too_large(), request_id, scope["path"])
            else:
                await self.app(scope, guarded_receive, send_with_id)
        except ClientDisconnect:
            client_gone = True  # raised by the body read that saw the disconnect
        except asyncio.CancelledError as exc:
            if exc.args[:1] != (CLIENT_GONE,):
                raise  # a shutdown's cancellation: not ours to swallow
            # The protocol cancelled us because the client left: its queued work is dropped.
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            client_gone = client_gone or not response_started
        except Exception:
            # Anything that escaped the app's handlers: log it whole, tell the client nothing of it.
            logger.exception("unhandled error (request_id=%s)", request_id)
            if not response_started:
                detail = "internal error; quote the request id when reporting it"
                await self._error(send_with_id, 500, detail, request_id, scope["path"])
        finally:
            if client_gone:
                status = CLIENT_CLOSED_REQUEST  # whatever the app tried to answer reached nobody
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            version = state.get("model_version", "")
            self.metrics.request_done(endpoint, scope["method"], status, version, elapsed)
            if status >= self.min_logged_status:
                log_access(scope["method"], scope["path"], status, version, elapsed, request_id)
            REQUEST_CONTEXT.reset(context)

    def _too_large(self) -> str:
        return (
            f"the request body is over the {self.max_body_bytes} byte limit (MAX_UPLOAD_BYTES): "
            "send a smaller image"
        )

    @staticmethod
    async def _error(send: Send, status: int, detail: str, request_id: str, path: str) -> None:
        payload = json.dumps(error_body(detail, request_id, path)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})
