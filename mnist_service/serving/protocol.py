"""uvicorn's HTTP protocol with the limits a reverse proxy would put on a client, and one send per answer.

uvicorn closes a kept-alive connection that stays silent, but a connection that never sends a
byte, or sends its headers a byte every few seconds, is held forever: enough of them exhaust
file descriptors and memory. This subclass adds a deadline for a request's headers (408, then
closed) and, when a client hangs up while its request is still being worked on, cancels that
request's task, so its queued inference is dropped instead of computed for nobody. The body's
deadline lives in the middleware, where the answer is counted and logged like every other.

uvicorn writes a response's head (status line and headers) and its body with two send() calls;
on loopback each one runs the TCP stack and wakes the client, and the two were the largest lines
of a worker's py-spy profile at 128 concurrent uploads (12.5% and 4.9% of its samples). Each
request's cycle here writes through `_HeadWithBody`, which holds the head until the body's first
bytes and sends them together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mnist_service.serving.dataplane import InFlight

# The message a request's task is cancelled with when its client hangs up: the middleware tells
# this cancellation (answered 499) from a shutdown's.
CLIENT_GONE = "client disconnected"

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


def guarded_protocol(
    header_timeout_s: float, on_header_timeout: Callable[[], None] = lambda: None, in_flight: InFlight | None = None
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header deadline and cancellation on disconnect; it shares
    uvicorn's set of running request tasks with `in_flight`."""

    class GuardedProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if in_flight is not None:
                in_flight.tasks = self.tasks  # the server's one set, the same for every connection
            self._header_deadline: asyncio.TimerHandle | None = None
            self._request_begun = False  # a byte of the next request has arrived
            self._running: asyncio.Task[Any] | None = None  # the task of the request being served
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

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._request_begun = True

        def on_headers_complete(self) -> None:
            self._disarm()
            previous = self.cycle
            super().on_headers_complete()
            if self.cycle is not previous:  # not an upgrade: a new request's cycle
                self.cycle.transport = _HeadWithBody(self.transport, self.cycle)  # type: ignore[assignment]

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # Waiting for the next request's headers again, unless a pipelined one is already in.
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._running is not None and self.cycle is not None and not self.cycle.response_complete:
                self._running.cancel(CLIENT_GONE)
            super().connection_lost(exc)

    return GuardedProtocol
