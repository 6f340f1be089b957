"""uvicorn's HTTP protocol with the limits a reverse proxy would put on a client, the hot path, and
one send per answer.

uvicorn closes a kept-alive connection that stays silent, but a connection that never sends a
byte, or sends its headers a byte every few seconds, is held forever: enough of them exhaust
file descriptors and memory. This subclass adds a deadline for a request's headers (408, then
closed), limits on a request's head (431, then closed, as nginx refuses a head over its
buffers) and, when a client hangs up while its request is still being worked on, cancels that
request's task, so its queued inference is dropped instead of computed for nobody. The body's
deadline lives in the middleware, where the answer is counted and logged like every other.

With a HotPath (hotpath.py), POST /predict and the v2 infer routes are answered here, below
ASGI: the parser's callbacks hand the head and the body to a HotRequest, which is the
connection's current cycle until it has answered.

uvicorn writes a response's head (status line and headers) and its body with two send() calls;
on loopback each one runs the TCP stack and wakes the client. Each request's ASGI cycle here
writes through `_HeadWithBody`, which holds the head until the body's first bytes and sends them
together (docs/performance.md has what the two writes cost).

uvicorn internals relied on here and in hotpath.py (uvicorn is pinned in requirements.txt;
`uvicorn_drift()` lists any that changed, tests/test_hotpath.py fails on it, and a worker that
finds one serves without the hot path and logs why):
- HttpToolsProtocol's attributes: UVICORN_ATTRIBUTES below (the parser, the request's url and
  headers, the connection's transport, loop, current cycle and pipeline, the server's state with
  its default headers, connections and tasks, the concurrency limit and root path);
- its parser callbacks and hooks, overridden or called: UVICORN_METHODS;
- what it reads of its current cycle, which a HotRequest must answer to: CYCLE_ATTRIBUTES.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mnist_service.serving.dataplane import InFlight
from mnist_service.serving.hotpath import HotPath, HotRequest
from mnist_service.serving.middleware import CLIENT_GONE

UVICORN_ATTRIBUTES = (
    "parser", "url", "headers", "root_path", "limit_concurrency", "connections", "tasks", "transport", "loop",
    "server_state", "cycle", "pipeline", "flow",
)
UVICORN_METHODS = (
    "on_message_begin", "on_url", "on_header", "on_headers_complete", "on_body", "on_message_complete",
    "on_response_complete", "data_received", "send_400_response", "connection_made", "connection_lost", "shutdown",
)
# What uvicorn's protocol reads of `self.cycle`. body and more_body only in on_body and
# on_message_complete, which a hot request's connection overrides.
CYCLE_ATTRIBUTES = frozenset(("response_complete", "disconnected", "message_event", "keep_alive", "body", "more_body"))


def uvicorn_drift() -> list[str]:
    """The uvicorn internals above that the installed uvicorn no longer has, or new ones it reads."""
    source = inspect.getsource(HttpToolsProtocol)
    cls = HttpToolsProtocol
    drift = [f"HttpToolsProtocol.{name}()" for name in UVICORN_METHODS if not callable(getattr(cls, name, None))]
    drift += [f"HttpToolsProtocol.{name}" for name in UVICORN_ATTRIBUTES if not re.search(rf"self\.{name}\b", source)]
    if not re.search(r"server_state\.default_headers", inspect.getsource(inspect.getmodule(HttpToolsProtocol))):
        drift.append("ServerState.default_headers")
    read = set(re.findall(r"self\.cycle\.(\w+)", source)) - CYCLE_ATTRIBUTES
    drift += [f"reads cycle.{name}, which a HotRequest lacks" for name in sorted(read)]
    return drift


_TIMEOUT_BODY = b'{"detail":"the request headers did not arrive in time (HEADER_TIMEOUT_S); send them at once"}'
_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)


class _HeadWithBody:
    """A response cycle's transport that sends the response's head together with its first body bytes.

    uvicorn writes the head when the app sends http.response.start, and then writes for every
    http.response.body message (an empty body too) unless the request is a HEAD, which is passed
    through unchanged. A head still held when the cycle closes the connection (an app that failed
    mid-response) goes out before the close.
    """

    __slots__ = ("_cycle", "_head", "_hold", "_transport")

    def __init__(self, transport: asyncio.Transport, cycle: Any) -> None:
        self._transport = transport
        self._cycle = cycle
        self._head: bytes | None = None
        self._hold = cycle.scope["method"] != "HEAD"

    def write(self, data: bytes) -> None:
        if self._head is not None:
            data, self._head = self._head + data, None
        elif self._hold and self._cycle.response_started:
            # The first write once the response has started is its head (a 100 Continue comes before).
            self._hold = False
            self._head = data
            return
        self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            self._transport.write(self._head)
            self._head = None
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _HeadTooLarge(httptools.HttpParserError):
    """Raised from a parser callback to stop reading a head over the limits; already answered 431.

    An HttpParserError, so that uvicorn's data_received catches it (and would answer 400, which
    `send_400_response` below suppresses for a refused head)."""


def guarded_protocol(
    header_timeout_s: float,
    on_header_timeout: Callable[[], None] = lambda: None,
    in_flight: InFlight | None = None,
    *,
    hot_path: HotPath | None = None,
    max_header_bytes: int = 64 * 1024,
    max_headers: int = 100,
    on_head_refused: Callable[[], None] = lambda: None,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header deadline, limits on the head (431), cancellation on
    disconnect and, with `hot_path`, POST /predict and v2 infer answered below ASGI; it shares
    uvicorn's set of running request tasks with `in_flight`."""

    class GuardedProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if in_flight is not None:
                in_flight.tasks = self.tasks  # the server's one set, the same for every connection
            self._header_deadline: asyncio.TimerHandle | None = None
            self._request_begun = False  # a byte of the next request has arrived
            self._running: asyncio.Task[Any] | None = None  # the task of the request being served
            self._hot: HotRequest | None = None  # the hot-path request being served, if any
            self._head_bytes = 0  # of the request head being read: the request line and the headers
            self._refused = False  # a head over the limits was answered 431: read nothing more
            app = self.app

            async def tracked(scope: Any, receive: Any, send: Any) -> None:
                self._running = asyncio.current_task()
                try:
                    await app(scope, receive, send)
                finally:
                    self._running = None

            self.app = tracked

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._request_begun = False
            self._header_deadline = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_late(self) -> None:
            self._header_deadline = None
            if self.transport.is_closing():
                return
            if self._request_begun:
                # Part of a request came: say why it is cut off. A connection that sent nothing
                # is closed silently, as nginx does, so a client racing the close reads no stray 408.
                on_header_timeout()
                self.transport.write(_TIMEOUT)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            hot = self._hot
            if hot is not None and hot.reading and hot.body_timer is None and not self._refused:
                hot.arm_body_timer()  # the body did not come with the head: it has BODY_TIMEOUT_S

        def send_400_response(self, msg: str) -> None:
            if not self._refused:  # a refused head was answered 431 already
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._request_begun = True
            self._head_bytes = 0

        def on_url(self, url: bytes) -> None:
            self._count_head(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_head(len(name) + len(value) + 4)
            if len(self.headers) >= max_headers:
                self._refuse_head(f"more than {max_headers} request headers (MAX_HEADERS)")
            super().on_header(name, value)

        def _count_head(self, size: int) -> None:
            self._head_bytes += size
            if self._head_bytes > max_header_bytes:
                self._refuse_head(f"the request line and headers are over {max_header_bytes} bytes (MAX_HEADER_BYTES)")

        def _refuse_head(self, why: str) -> None:
            """431 Request Header Fields Too Large (RFC 6585), then close, as nginx refuses a head over its buffers."""
            self._refused = True
            self._disarm()
            on_head_refused()
            body = json.dumps({"detail": f"{why}: send fewer or shorter headers"}).encode()
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            self.transport.close()
            raise _HeadTooLarge(why)

        def on_headers_complete(self) -> None:
            self._disarm()
            previous = self.cycle
            if hot_path is not None and (previous is None or previous.response_complete):
                request = hot_path.begin(self)
                if request is not None:
                    self.cycle = self._hot = request  # type: ignore[assignment]
                    return
            super().on_headers_complete()
            if self.cycle is not previous:  # not an upgrade: a new request's cycle
                self.cycle.transport = _HeadWithBody(self.transport, self.cycle)  # type: ignore[assignment]

        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if type(cycle) is HotRequest:
                if cycle.reading:
                    cycle.body.append(body)
                return
            super().on_body(body)

        def on_message_complete(self) -> None:
            cycle = self.cycle
            if type(cycle) is HotRequest:
                if cycle.reading:
                    cycle.complete()
                return
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Waiting for the next request's headers again, unless a pipelined one is already in.
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            hot = self._hot
            if hot is not None:
                hot.client_gone()  # nothing if it was answered
            if hot is not None and self.cycle is hot:
                self.cycle = None  # type: ignore[assignment]  # uvicorn has nothing to tell it
            elif self._running is not None and self.cycle is not None and not self.cycle.response_complete:
                self._running.cancel(CLIENT_GONE)
            super().connection_lost(exc)

    return GuardedProtocol
