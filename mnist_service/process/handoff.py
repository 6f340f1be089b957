"""Connection hand-off: the supervisor accepts, each worker serves the connections it is given.

Why not let every worker accept on the shared socket, as uvicorn and gunicorn do? Whichever
worker wakes first accepts a whole burst: hey opening 32 keep-alive connections at once put all
32 on one worker in one of our runs (about half the req/s of an even split: docs/performance.md),
and other runs had bimodal latencies, the mark of an uneven split; it lasts as long as the
connections. Here the supervisor
accepts every connection and passes its file descriptor (SCM_RIGHTS over a Unix socket pair) to
the ready worker with the fewest open connections, so keep-alive load splits evenly.

The cost is one accept and one sendmsg in the supervisor per *connection*, not per request.

Keep-alive connections stay where they landed, so a worker that starts late (the successor of
a dead one) would get none of the existing load. `rebalance` asks an over-loaded worker to close
some of its connections politely, with `Connection: close` on their next answer; their clients
reconnect, and the new connections go to the least-loaded worker.

A worker holds at most `max_connections` at once: when every ready worker is at the cap, the
supervisor answers the new connection 503 itself and closes it, so a flood of idle clients can
exhaust neither the workers' file descriptors nor their memory. A worker that dies is taken out
of the rotation the moment its channel breaks, and `replace` gives its successor a fresh link.

A worker that hangs (stopped, stuck in a C call, a forward pass that never returns) keeps its
channel open, so each ready worker also beats: its event loop stamps the time in shared memory
every BEAT_INTERVAL_S, and the hand-off skips a worker whose stamp is over LATE_AFTER_S old.
Killing it, once silent for WORKER_TIMEOUT_S, is the supervisor's part (server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing.context
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_TOKEN = b"c"
BEAT_INTERVAL_S = 0.25
# Four beats missed: a loop turn never takes that long in a healthy worker, even under a burst.
LATE_AFTER_S = 1.0
_DOING_BYTES = 200  # room for one line on what a hung worker was doing
# What a connection over the cap gets: a complete answer the client can act on, written at once.
_BUSY_BODY = b'{"detail":"the server is at its connection limit (MAX_CONNECTIONS per worker); retry shortly"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY
)


@dataclass
class WorkerLink:
    """What a supervisor and one worker share: the fd channel and counters in shared memory.

    Each value has a single writer at a time, so none needs a lock: `ready`, `closed`, `shed_done`,
    `beat` and `doing` are written by the worker (and `ready` cleared by the supervisor once the
    worker is gone or hung), `shed_asked` by the supervisor, which counts what it sent itself.
    """

    channel: socket.socket  # the worker's end of a SOCK_SEQPACKET pair
    ready: Any  # multiprocessing Value('b'): 1 while the worker takes connections
    closed: Any  # multiprocessing Value('q'): connections the worker has finished with
    shed_asked: Any  # multiprocessing Value('q'): connections the supervisor asked it to close, in all
    shed_done: Any  # multiprocessing Value('q'): connections it has closed for that, in all
    beat: Any  # multiprocessing Value('d'): time.monotonic() when the worker was last seen healthy; 0 before
    doing: Any  # multiprocessing Array('c'): what a worker that stopped beating was stuck in, if it knows

    def silent_for(self, now: float) -> float:
        """Seconds since the worker last proved healthy (`now` from time.monotonic()); 0 before its first beat."""
        beat = self.beat.value
        return now - beat if beat else 0.0

    def on_time(self, now: float) -> bool:
        """Ready, and beating: the hand-off may give it a connection."""
        return bool(self.ready.value) and self.silent_for(now) <= LATE_AFTER_S


class Dispatcher:
    """The supervisor's side: accept on the listening socket, hand each connection to a worker."""

    def __init__(
        self,
        listener: socket.socket,
        workers: int,
        context: multiprocessing.context.BaseContext,
        backlog: int,
        max_connections: int = 1_000_000,
        on_refused: Callable[[], None] = lambda: None,
    ) -> None:
        self.listener = listener
        self.listener.listen(backlog)
        self.listener.setblocking(False)
        self.max_connections = max_connections
        self._on_refused = on_refused  # called for each connection answered 503 at the cap
        self._context = context
        self._ends: list[socket.socket] = []
        self.links: list[WorkerLink] = []
        self._sent: list[int] = []
        for _ in range(workers):
            ours, link = self._new_link()
            self._ends.append(ours)
            self.links.append(link)
            self._sent.append(0)
        self._next = 0  # where the search for the least-loaded worker starts: ties rotate
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self.accepting = True

    def _new_link(self) -> tuple[socket.socket, WorkerLink]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)  # a stuck worker must never block the accept loop
        context = self._context
        ready, *counters = (context.Value(kind, 0, lock=False) for kind in "bqqqd")
        doing = context.Array("c", _DOING_BYTES, lock=False)
        return ours, WorkerLink(theirs, ready, *counters, doing)

    def replace(self, worker: int) -> WorkerLink:
        """A fresh link for the successor of a dead worker; the old channel and counts are dropped."""
        self.links[worker].ready.value = 0
        self._ends[worker].close()
        self._ends[worker], self.links[worker] = self._new_link()
        self._sent[worker] = 0
        return self.links[worker]

    def forget_worker_ends(self) -> None:
        """Close our copies of the workers' channel ends once the workers hold their own.

        Only the worker must hold its end: then its death breaks the channel at once."""
        for link in self.links:
            link.channel.close()

    def open_connections(self) -> list[int]:
        return [sent - link.closed.value for sent, link in zip(self._sent, self.links, strict=True)]

    def rebalance(self) -> None:
        """Ask each ready worker holding over its fair share (+1) of connections to close the excess.

        Called from the supervisor's loop; a request already pending is not asked again.
        """
        now = time.monotonic()
        ready = [i for i, link in enumerate(self.links) if link.on_time(now)]
        if len(ready) < 2:
            return
        load = self.open_connections()
        fair = -(-sum(load[i] for i in ready) // len(ready))  # ceiling
        for i in ready:
            link = self.links[i]
            pending = link.shed_asked.value - link.shed_done.value
            excess = load[i] - fair - pending
            if load[i] > fair + 1 and excess > 0:
                link.shed_asked.value += excess

    def poll(self, timeout: float) -> None:
        """Wait up to `timeout` for connections and hand them out; waits idle while no worker is ready and beating."""
        now = time.monotonic()
        if not self.accepting or not any(link.on_time(now) for link in self.links):
            # Connections wait in the kernel's backlog until a worker can take them.
            time.sleep(timeout)
            return
        if not self._selector.select(timeout):
            return
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # e.g. EMFILE: the backlog holds the rest. Pause, or the still-readable listener
                # would spin this loop and the log.
                logger.warning("accept failed: %s", exc)
                time.sleep(timeout)
                return
            with conn:
                with contextlib.suppress(OSError):  # the client may already have hung up
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._hand_off(conn)

    def _hand_off(self, conn: socket.socket) -> None:
        n = len(self.links)
        load = self.open_connections()
        order = sorted(range(n), key=lambda i: (load[i], (i - self._next) % n))
        self._next = (self._next + 1) % n
        now = time.monotonic()
        for i in order:
            if not self.links[i].on_time(now):  # loading, gone, or late: a connection there would wait
                continue
            if load[i] >= self.max_connections:
                break  # the least loaded is at the cap, so every ready worker is
            try:
                socket.send_fds(self._ends[i], [_TOKEN], [conn.fileno()])
            except (BrokenPipeError, ConnectionError) as exc:
                # The worker is gone (its exit is reaped by the supervisor's loop): never try it again.
                self.links[i].ready.value = 0
                logger.warning("worker %d's channel is closed (%s): handing the connection to another", i, exc)
                continue
            except OSError as exc:  # a full channel: that worker is stuck, try another
                logger.warning("could not hand a connection to worker %d: %s", i, exc)
                continue
            self._sent[i] += 1
            return
        else:
            logger.warning("no worker could take a connection: closing it")
            return
        self._on_refused()
        with contextlib.suppress(OSError):  # a small answer on a fresh socket: never blocks
            conn.send(_BUSY)
            conn.shutdown(socket.SHUT_WR)

    def stop_accepting(self) -> None:
        """Close the listening socket: new connections are refused from now on."""
        if self.accepting:
            self.accepting = False
            self._selector.unregister(self.listener)
            self.listener.close()

    def close(self) -> None:
        self.stop_accepting()
        self._selector.close()
        for end in self._ends:
            end.close()


def _not_stuck() -> tuple[float, str]:
    return 0.0, ""


class Receiver:
    """The worker's side: take connections off the channel and serve them on this event loop.

    While it serves, it beats (see WorkerLink.beat) unless `stuck` reports work stuck for longer
    than `timeout_s`: then it owns up to being hung since that work began, and says what it was.
    """

    def __init__(self, link: WorkerLink, timeout_s: float = float("inf")) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self._orphaned: Callable[[], None] = lambda: None
        self._stuck: Callable[[], tuple[float, str]] = _not_stuck
        self._beater: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    def counted(self, protocol_class: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
        """A subclass of uvicorn's protocol that tells the supervisor when a connection ends, and
        closes connections the supervisor asks it to shed (after answering their current request)."""
        link = self.link

        class Counted(protocol_class):  # type: ignore[valid-type,misc]
            def on_headers_complete(self) -> None:
                super().on_headers_complete()
                if link.shed_done.value < link.shed_asked.value and self.cycle is not None:
                    # The answer carries `Connection: close`: the client reconnects, elsewhere.
                    self.cycle.keep_alive = False
                    link.shed_done.value += 1

            def connection_lost(self, exc: Exception | None) -> None:
                link.closed.value += 1
                super().connection_lost(exc)

        return Counted

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        orphaned: Callable[[], None] = lambda: None,
        stuck: Callable[[], tuple[float, str]] = _not_stuck,
    ) -> None:
        """Serve handed-off connections on `loop` and beat; call `orphaned` if the supervisor goes away.

        `stuck()` gives the seconds the worker's longest-running piece of work (a forward pass) has
        run, and what it is; it is called on the loop at each beat.
        """
        self._loop, self._factory, self._orphaned, self._stuck = loop, factory, orphaned, stuck
        self.link.channel.setblocking(False)
        loop.add_reader(self.link.channel.fileno(), self._take)
        self._beat()  # before `ready`: a ready worker always has a beat to judge it by
        self.link.ready.value = 1

    def _beat(self) -> None:
        if self._loop is None:  # stopped
            return
        now = time.monotonic()
        stuck_for, doing = self._stuck()
        if stuck_for > self.timeout_s:
            # The loop turns but the work does not: healthy last when it began. Written once.
            if not self.link.doing.value:
                self.link.doing.value = doing.encode()[: len(self.link.doing) - 1]
                self.link.beat.value = now - stuck_for
        else:
            if self.link.doing.value:
                self.link.doing.value = b""
            self.link.beat.value = now
        self._beater = self._loop.call_later(BEAT_INTERVAL_S, self._beat)

    def stop(self) -> None:
        """Take no more connections; the ones already served finish under uvicorn's shutdown."""
        self.link.ready.value = 0
        if self._beater is not None:
            self._beater.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self.link.channel.fileno())
            self._loop = None
        self.link.channel.close()

    def _take(self) -> None:
        loop, factory = self._loop, self._factory
        if loop is None or factory is None:  # stopped
            return
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self.link.channel, len(_TOKEN), 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                message, fds = b"", []
                logger.warning("connection channel failed: %s", exc)
            if not message:
                # The supervisor is gone: no connection will ever come again, so this worker
                # would idle forever. Stop like on SIGTERM.
                self.stop()
                self._orphaned()
                return
            for fd in fds:
                conn = socket.socket(fileno=fd)
                task = loop.create_task(loop.connect_accepted_socket(factory, conn))
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The client hung up between accept and hand-off: nothing to serve.
            logger.debug("could not serve a handed-off connection: %s", task.exception())
