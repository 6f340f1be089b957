"""The HTTP hot path: POST /predict and the v2 infer routes answered by the protocol layer itself.

Under load, a worker's CPU per request went to our own per-request Python more than to the
model: uvicorn's ASGI cycle and its task, the middleware chain, Starlette's Request, the route,
the response object (benchmarks/profile.md). TorchServe and Triton parse HTTP outside the model's
language and hand the model a batch; the nearest equivalent in Python is to stay in the parser's
C callbacks (httptools) and do the rest once per batch. So for the two routes that carry the
traffic, the protocol (protocol.py) hands the request's head and body to a `HotRequest` here:
no ASGI scope, no middleware, no task. Requests whose bodies complete in the same turn of the
event loop are submitted together to the data plane (so a burst batches instead of each looking
alone), and each answer leaves in one write, built from the same codecs the FastAPI routes use.

What the FastAPI app does per request is done here the same way: request id, API key, version
pinning and X-Model-Version, every 4xx with its message, 503 + Retry-After, 499 on hang-up (the
queued work dropped), 408 for a slow body, the access line, the request metrics. Anything
unusual goes to FastAPI instead (`HotPath.begin` returns None): another method or path, HTTP/1.0,
Expect: 100-continue, chunked or oversized bodies, percent-escaped paths, a Content-Type the
upload routes don't read, a compressed v2 body, a CORS request, a pipelined request; FastAPI
stays the reference, and its routes stay registered, so OpenAPI is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools
import numpy as np
from fastapi import FastAPI
from pydantic import SecretStr

from mnist_service.errors import NotFound, RequestTimeout, ServiceError, error_body
from mnist_service.inference.predictor import InferenceFailed
from mnist_service.inference.preprocess import image_to_digit
from mnist_service.logconfig import REQUEST_CONTEXT, trace_context
from mnist_service.serving import upload_codec, v2_codec
from mnist_service.serving.dataplane import RequestInfo, Target
from mnist_service.serving.deps import keys_from, verify_key
from mnist_service.serving.middleware import (
    CLIENT_CLOSED_REQUEST,
    MIN_LOGGED_STATUS,
    log_access,
    request_id_for,
)
from mnist_service.serving.upload_codec import INLINE_DECODE_BYTES

if TYPE_CHECKING:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

PREDICT = "/predict"
V2_INFER = "/v2/models/{model_name}/infer"
V2_VERSION_INFER = "/v2/models/{model_name}/versions/{model_version}/infer"
_V2_PREFIX = b"/v2/models/"
_V2_SUFFIX = b"/infer"
_JSON = b"application/json"
_BINARY = b"application/octet-stream"
_INTERNAL = "internal error; quote the request id when reporting it"
# Request headers that send a request to FastAPI: it knows what to do with them.
_ASGI_ONLY = frozenset((b"transfer-encoding", b"expect", b"upgrade"))


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_STATUS_LINES = {status: _status_line(status) for status in (200, 400, 401, 404, 408, 413, 415, 422, 500, 503)}


class _NoEvent:
    """What uvicorn's protocol sets on a cycle's message event; the hot path waits on none."""

    @staticmethod
    def set() -> None:
        return None


class HotPath:
    """One worker's hot path: what it needs of the app, and the requests gathered in this loop turn."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        settings = app.state.settings
        self.metrics = app.state.metrics
        self.in_flight = app.state.in_flight
        self.model_name = settings.model_name
        self.max_upload_bytes = settings.max_upload_bytes
        self.max_image_pixels = settings.max_image_pixels
        self.max_batch_files = settings.max_batch_files
        self.api_key: SecretStr | None = settings.api_key
        self.cors = bool(settings.cors_origins)
        self.body_timeout_s = settings.body_timeout_s
        self.min_logged_status = MIN_LOGGED_STATUS[settings.access_log]
        self._gathered: list[HotRequest] = []
        self._defaults: list[tuple[bytes, bytes]] | None = None
        self._heads: dict[int, bytes] = {}  # status -> status line and default headers, for `_defaults`
        self._loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # decodes of large uploads, on the decode pool

    def begin(self, protocol: HttpToolsProtocol) -> HotRequest | None:
        """A HotRequest for the request whose head the parser just read, or None: FastAPI answers it."""
        parser = protocol.parser
        if parser.get_method() != b"POST" or parser.get_http_version() != "1.1" or protocol.root_path:
            return None
        dataplane = getattr(self.app.state, "dataplane", None)
        if dataplane is None:  # still starting: FastAPI's answer (503) is the reference
            return None
        url = httptools.parse_url(protocol.url)
        path = url.path
        if path == b"/predict":
            endpoint, name, version = PREDICT, None, None
        elif path.startswith(_V2_PREFIX) and path.endswith(_V2_SUFFIX) and b"%" not in path:
            parts = path[len(_V2_PREFIX) : -len(_V2_SUFFIX)].split(b"/")
            if len(parts) == 1 and parts[0]:
                endpoint, name, version = V2_INFER, parts[0].decode("ascii"), None
            elif len(parts) == 3 and parts[1] == b"versions" and parts[0] and parts[2]:
                endpoint, name, version = V2_VERSION_INFER, parts[0].decode("ascii"), parts[2].decode("ascii")
            else:
                return None
        else:
            return None
        limit = protocol.limit_concurrency
        if limit is not None and (len(protocol.connections) >= limit or len(protocol.tasks) >= limit):
            return None  # uvicorn answers 503 for the concurrency limit
        length = content_type = request_id = traceparent = bearer = key = header_length = None
        for field, value in protocol.headers:
            if field == b"content-length":
                length = value
            elif field == b"content-type":
                content_type = content_type or value.decode("latin-1")
            elif field == b"x-request-id":
                request_id = request_id or value.decode("latin-1")
            elif field == b"traceparent":
                traceparent = traceparent or value.decode("latin-1")
            elif field == b"authorization":
                bearer = bearer or value
            elif field == b"x-api-key":
                key = key or value
            elif field == b"inference-header-content-length":
                header_length = value
            elif field in _ASGI_ONLY or (field == b"origin" and self.cors):
                return None
            elif field == b"content-encoding" and name is not None and value.strip().lower() != b"identity":
                return None  # v2 answers 415 for it; FastAPI says so
        if length is None or not length.isdigit() or int(length) > self.max_upload_bytes:
            return None
        if name is None and not upload_codec.is_upload_type(upload_codec.media_type_of(content_type or "")):
            return None
        if header_length is not None and (not header_length.isdigit() or int(header_length) < 1):
            return None  # FastAPI's header validation words this one
        self.in_flight.hot += 1
        return HotRequest(
            self, protocol, endpoint, path.decode("ascii"), url.query or b"", name, version,
            content_type or "", request_id, traceparent, (bearer, key), header_length, parser.should_keep_alive(),
        )

    def head(self, status: int, protocol: HttpToolsProtocol) -> bytes:
        """The status line and uvicorn's default headers (its Date, renewed each second), built once per change."""
        defaults = protocol.server_state.default_headers
        if defaults is not self._defaults:  # uvicorn swaps in a new list when the second changes
            self._defaults, self._heads = defaults, {}
        head = self._heads.get(status)
        if head is None:
            lines = [_STATUS_LINES.get(status) or _status_line(status)]
            lines += [b"%s: %s\r\n" % header for header in defaults]
            head = self._heads[status] = b"".join(lines)
        return head

    def gather(self, request: HotRequest) -> None:
        """Submit `request` with every other one whose body completes in this turn of the loop."""
        if not self._gathered:
            loop = self._loop or asyncio.get_running_loop()
            self._loop = loop
            loop.call_soon(self._submit_gathered)
        self._gathered.append(request)

    def _submit_gathered(self) -> None:
        gathered, self._gathered = self._gathered, []
        # A burst batches; one request alone may run inline, if the data plane finds it alone.
        alone = None if len(gathered) == 1 else False
        for request in gathered:
            if not request.response_complete:
                request.submit(alone)


class HotRequest:
    """One request on the hot path, from its head to its answer; it is the connection's current cycle.

    uvicorn's protocol reads `response_complete`, `keep_alive`, `disconnected` and `message_event`
    of the cycle it holds, so this answers to those names too.
    """

    __slots__ = (
        "body", "body_timer", "content_type", "digits", "disconnected", "encode", "endpoint", "future", "header_length",
        "hot", "keep_alive", "model_name", "offered", "path", "protocol", "query", "reading", "request_id",
        "response_complete", "served_by", "started", "target", "traceparent", "version",
    )
    message_event = _NoEvent()

    def __init__(
        self,
        hot: HotPath,
        protocol: HttpToolsProtocol,
        endpoint: str,
        path: str,
        query: bytes,
        model_name: str | None,
        version: str | None,
        content_type: str,
        request_id: str | None,
        traceparent: str | None,
        offered: tuple[bytes | None, bytes | None],
        header_length: bytes | None,
        keep_alive: bool,
    ) -> None:
        self.started = time.perf_counter()
        self.hot = hot
        self.protocol = protocol
        self.endpoint = endpoint
        self.path = path
        self.query = query
        self.model_name = model_name  # None on /predict
        self.version = version  # as named in the v2 path
        self.content_type = content_type
        self.request_id = request_id_for(request_id)
        self.traceparent = traceparent
        self.offered = offered
        self.header_length = header_length
        self.keep_alive = keep_alive
        self.body: list[bytes] = []  # the chunks as they came; joined once, when complete
        self.reading = True
        self.body_timer: asyncio.TimerHandle | None = None
        self.response_complete = False
        self.disconnected = False
        self.served_by = ""  # the version that answers, once known: X-Model-Version and the metrics
        self.target: Target | None = None
        self.digits: np.ndarray | None = None
        self.encode: Any = None  # probabilities -> (body, content type, extra headers)
        self.future: asyncio.Future[np.ndarray] | None = None

    # ---- reading -------------------------------------------------------------------------

    def arm_body_timer(self) -> None:
        """The rest of the body must arrive within BODY_TIMEOUT_S; armed only if it did not come at once."""
        self.body_timer = self.protocol.loop.call_later(self.hot.body_timeout_s, self._body_late)

    def _body_late(self) -> None:
        self.body_timer = None
        if self.reading and not self.response_complete:
            self.reading = False
            self.fail(
                RequestTimeout(
                    f"the request body did not arrive within {self.hot.body_timeout_s:g}s (BODY_TIMEOUT_S); "
                    "send it at once, or check the client's network"
                )
            )

    def complete(self) -> None:
        """The body is in: check and decode it, then join this turn's submissions."""
        self.reading = False
        if self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None
        if self.response_complete:
            return
        try:
            self._check_key()
            if self.model_name is None:
                large = self._read_upload()
                if large is not None:
                    self._decode_later(large)
                    return
            else:
                self._read_v2()
        except Exception as exc:  # every error is answered; fail() logs what is not a client's
            self.fail(exc)
            return
        self.hot.gather(self)

    def _check_key(self) -> None:
        if self.hot.api_key is None:
            return
        authorization, header_key = (value.decode("latin-1") if value else None for value in self.offered)
        verify_key(self.hot.api_key, keys_from(authorization, header_key))

    def _read_upload(self) -> list[tuple[str, bytes]] | None:
        """The /predict request as digits; the files instead if one is too large to decode on the loop."""
        query = dict(urllib.parse.parse_qsl(self.query.decode("latin-1"), keep_blank_values=True)) if self.query else {}
        self.target = self._resolve(query.get("version"))
        debug = upload_codec.parse_debug(query.get("debug"))
        files = upload_codec.parse_uploads(self.content_type, b"".join(self.body), "file", 1)
        version = self.target.version

        def encode(probs: np.ndarray) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
            answer = upload_codec.prediction_dicts(probs, version, self.digits if debug else None)[0]
            return upload_codec.encode_json(answer), _JSON, []

        self.encode = encode
        if len(files[0][1]) > INLINE_DECODE_BYTES:
            return files
        self.digits = image_to_digit(files[0][1], self.hot.max_image_pixels)[None]
        return None

    def _decode_later(self, files: list[tuple[str, bytes]]) -> None:
        """A photo decodes on the decode pool, off the loop: the one case that takes a task."""

        async def decode() -> None:
            try:
                self.digits = await upload_codec.decode_uploads(
                    files, self.hot.app.state.decode_pool, self.hot.max_image_pixels
                )
            except Exception as exc:
                self.fail(exc)
                return
            if not self.response_complete:
                self.hot.gather(self)

        task = self.protocol.loop.create_task(decode())
        self.hot.tasks.add(task)
        task.add_done_callback(self.hot.tasks.discard)

    def _read_v2(self) -> None:
        if self.model_name != self.hot.model_name:
            raise NotFound(f"unknown model '{self.model_name[:64]}': this server serves '{self.hot.model_name}'")
        header_length = int(self.header_length) if self.header_length is not None else None
        header, binary = v2_codec.split_body(b"".join(self.body), header_length)
        parsed = v2_codec.parse_request(header)
        self.digits = v2_codec.decode_input(parsed.inputs[0], binary, self.hot.max_batch_files)
        outputs = v2_codec.requested_outputs(parsed)
        self.target = self._resolve(self.version)
        name, version = self.hot.model_name, self.target.version.name

        def encode(probs: np.ndarray) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
            body, header_bytes = v2_codec.encode_response(probs, outputs, name, version, parsed.id)
            if header_bytes is None:
                return body, _JSON, []
            return body, _BINARY, [(b"inference-header-content-length", str(header_bytes).encode())]

        self.encode = encode

    def _resolve(self, requested: str | None) -> Target:
        target: Target = self.hot.app.state.dataplane.target(requested)
        self.served_by = target.version.name
        return target

    # ---- answering -----------------------------------------------------------------------

    def submit(self, alone: bool | None) -> None:
        """Hand the digits to the data plane; the answer is written when its future is done."""
        try:
            future = self.hot.app.state.dataplane.submit(
                self.target, self.digits, alone=alone, request=RequestInfo(self.request_id, self.endpoint)
            )
        except Exception as exc:
            self.fail(exc)
            return
        self.future = future
        if future.done():
            self._answered(future)
        else:
            future.add_done_callback(self._answered)

    def _answered(self, future: asyncio.Future[np.ndarray]) -> None:
        if self.response_complete or future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            self.fail(exc)
            return
        try:
            body, content_type, headers = self.encode(future.result())
        except Exception as error:
            self.fail(error)
            return
        self.respond(200, body, content_type, headers)

    def fail(self, exc: BaseException) -> None:
        """Answer an error the way the FastAPI routes do: the client's own mistakes with their message,
        anything else as a 500 that quotes the request id (its cause logged, never sent)."""
        if self.response_complete:
            return
        v2 = self.model_name is not None
        if isinstance(exc, ServiceError):
            status, detail = exc.status_code, str(exc.detail)
            headers = [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
        elif isinstance(exc, InferenceFailed):  # the batcher logged the cause
            status, headers = 500, []
            detail = (
                f"inference failed; quote request id {self.request_id} when reporting it"
                if v2 else "inference failed; quote the request id when reporting it"
            )
        else:
            self._log(logging.ERROR, "unhandled error (request_id=%s)", exc)
            status, detail, headers = 500, _INTERNAL, []
        if v2 and not isinstance(exc, ServiceError | InferenceFailed):
            body = error_body(detail, self.request_id, self.path)  # the middleware's shape, as on ASGI
        elif v2:
            body = {"error": detail}
        else:
            body = {"detail": detail, "request_id": self.request_id}
        if any(name == b"connection" and value.lower() == b"close" for name, value in headers):
            self.keep_alive = False
            headers = [(name, value) for name, value in headers if name != b"connection"]
        self.respond(status, upload_codec.encode_json(body), _JSON, headers)

    def respond(self, status: int, body: bytes, content_type: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """Write the whole answer in one write, then let the connection read the next request."""
        protocol = self.protocol
        transport = protocol.transport
        self.response_complete = True
        if not transport.is_closing():
            extra = b"".join(b"%s: %s\r\n" % header for header in headers) if headers else b""
            if self.served_by:
                extra += b"x-model-version: %s\r\n" % self.served_by.encode()
            if not self.keep_alive:
                extra += b"connection: close\r\n"
            transport.write(
                b"%scontent-length: %d\r\ncontent-type: %s\r\n%sx-request-id: %s\r\n\r\n%s"
                % (self.hot.head(status, protocol), len(body), content_type, extra, self.request_id.encode(), body)
            )
        self._finish(status)
        if not self.keep_alive:
            transport.close()
        else:
            protocol.on_response_complete()

    def client_gone(self) -> None:
        """The client hung up before its answer: drop its queued work, count it as 499."""
        if self.response_complete:
            return
        self.response_complete = self.disconnected = True
        self.reading = False
        if self.body_timer is not None:
            self.body_timer.cancel()
        if self.future is not None:
            self.future.cancel()  # the batcher skips it
        self._finish(CLIENT_CLOSED_REQUEST)

    def _finish(self, status: int) -> None:
        hot = self.hot
        hot.in_flight.hot -= 1
        elapsed = time.perf_counter() - self.started
        hot.metrics.request_done(self.endpoint, "POST", status, self.served_by, elapsed)
        if status >= hot.min_logged_status:
            context = REQUEST_CONTEXT.set({"request_id": self.request_id, **trace_context(self.traceparent)})
            try:
                log_access("POST", self.path, status, self.served_by, elapsed, self.request_id)
            finally:
                REQUEST_CONTEXT.reset(context)

    def _log(self, level: int, message: str, exc: BaseException) -> None:
        context = REQUEST_CONTEXT.set({"request_id": self.request_id, **trace_context(self.traceparent)})
        try:
            logger.log(level, message, self.request_id, exc_info=exc)
        finally:
            REQUEST_CONTEXT.reset(context)
