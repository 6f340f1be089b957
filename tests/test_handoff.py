"""Connection hand-off from the supervisor to the workers, in one process with real sockets."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import time
from collections.abc import Iterator

import pytest

from mnist_service.process.handoff import BEAT_INTERVAL_S, LATE_AFTER_S, Dispatcher, Receiver


@pytest.fixture
def dispatcher() -> Iterator[Dispatcher]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    d = Dispatcher(listener, 2, multiprocessing.get_context("spawn"), backlog=64)
    yield d
    d.close()
    d.forget_worker_ends()


def _connect(d: Dispatcher, n: int) -> list[socket.socket]:
    return [socket.create_connection(d.listener.getsockname()) for _ in range(n)]


def _hand_out(d: Dispatcher, expected: int) -> None:
    deadline = time.monotonic() + 5
    while sum(d.open_connections()) < expected:
        assert time.monotonic() < deadline, f"handed out {d.open_connections()}, expected {expected} in all"
        d.poll(timeout=0.05)


def _received(d: Dispatcher, worker: int) -> int:
    channel = d.links[worker].channel
    channel.setblocking(False)
    count = 0
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(channel, 1, 16)
        except BlockingIOError:
            return count
        for fd in fds:
            socket.socket(fileno=fd).close()
        count += len(fds)


def test_a_burst_of_connections_splits_evenly(dispatcher: Dispatcher) -> None:
    for link in dispatcher.links:
        link.ready.value = 1
    clients = _connect(dispatcher, 8)
    _hand_out(dispatcher, 8)
    assert dispatcher.open_connections() == [4, 4]
    assert [_received(dispatcher, 0), _received(dispatcher, 1)] == [4, 4]
    for c in clients:
        c.close()


def test_new_connections_go_to_the_worker_with_fewest_open(dispatcher: Dispatcher) -> None:
    for link in dispatcher.links:
        link.ready.value = 1
    clients = _connect(dispatcher, 4)
    _hand_out(dispatcher, 4)
    dispatcher.links[0].closed.value = 2  # worker 0 finished both of its connections
    clients += _connect(dispatcher, 2)
    _hand_out(dispatcher, 4)
    assert dispatcher.open_connections() == [2, 2]
    assert [_received(dispatcher, 0), _received(dispatcher, 1)] == [4, 2]
    for c in clients:
        c.close()


def test_connections_wait_until_a_worker_is_ready(dispatcher: Dispatcher) -> None:
    clients = _connect(dispatcher, 3)
    for _ in range(3):
        dispatcher.poll(timeout=0.02)
    assert dispatcher.open_connections() == [0, 0]  # still in the kernel's backlog
    dispatcher.links[1].ready.value = 1
    _hand_out(dispatcher, 3)
    assert dispatcher.open_connections() == [0, 3]
    for c in clients:
        c.close()


def test_stop_accepting_refuses_new_connections(dispatcher: Dispatcher) -> None:
    address = dispatcher.listener.getsockname()
    dispatcher.stop_accepting()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=1)


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def test_a_worker_serves_what_it_is_handed_and_reports_the_close(dispatcher: Dispatcher) -> None:
    receiver = Receiver(dispatcher.links[0])
    protocol = receiver.counted(_Echo)

    async def scenario() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        receiver.start(loop, protocol)
        assert dispatcher.links[0].ready.value == 1
        reader, writer = await asyncio.open_connection(*dispatcher.listener.getsockname())
        await loop.run_in_executor(None, _hand_out, dispatcher, 1)
        writer.write(b"ping")
        answer = await asyncio.wait_for(reader.readexactly(4), 5)
        writer.close()
        await writer.wait_closed()
        deadline = time.monotonic() + 5
        while dispatcher.links[0].closed.value == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        receiver.stop()
        return answer, dispatcher.links[0].closed.value

    assert asyncio.run(scenario()) == (b"PING", 1)
    assert dispatcher.links[0].ready.value == 0


def test_a_worker_whose_supervisor_is_gone_is_told_so(dispatcher: Dispatcher) -> None:
    receiver = Receiver(dispatcher.links[0])

    async def scenario() -> bool:
        orphaned = asyncio.Event()
        receiver.start(asyncio.get_running_loop(), _Echo, orphaned.set)
        dispatcher.close()  # what the kernel does to the supervisor's ends when it dies
        await asyncio.wait_for(orphaned.wait(), 5)
        return orphaned.is_set()

    assert asyncio.run(scenario())
    assert dispatcher.links[0].ready.value == 0


def test_a_late_worker_gets_no_connections_until_it_beats_again(dispatcher: Dispatcher) -> None:
    now = time.monotonic()
    for link in dispatcher.links:
        link.ready.value = 1
        link.beat.value = now
    dispatcher.links[0].beat.value = now - 2 * LATE_AFTER_S  # its loop has not turned for a while
    clients = _connect(dispatcher, 4)
    _hand_out(dispatcher, 4)
    assert [_received(dispatcher, 0), _received(dispatcher, 1)] == [0, 4]
    dispatcher.links[0].beat.value = time.monotonic()  # it beats again: back in the rotation
    clients += _connect(dispatcher, 2)
    _hand_out(dispatcher, 6)
    assert [_received(dispatcher, 0), _received(dispatcher, 1)] == [2, 0]
    for c in clients:
        c.close()


def test_connections_wait_while_every_ready_worker_is_late(dispatcher: Dispatcher) -> None:
    for link in dispatcher.links:
        link.ready.value = 1
        link.beat.value = time.monotonic() - 2 * LATE_AFTER_S
    clients = _connect(dispatcher, 2)
    for _ in range(3):
        dispatcher.poll(timeout=0.02)
    assert dispatcher.open_connections() == [0, 0]  # in the backlog, not on a worker that would not answer
    dispatcher.links[1].beat.value = time.monotonic()
    _hand_out(dispatcher, 2)
    assert dispatcher.open_connections() == [0, 2]
    for c in clients:
        c.close()


def test_a_worker_beats_while_its_loop_turns_and_says_what_is_stuck(dispatcher: Dispatcher) -> None:
    link = dispatcher.links[0]
    receiver = Receiver(link, timeout_s=1.0)
    stuck = (0.0, "")

    async def settle() -> None:
        await asyncio.sleep(2 * BEAT_INTERVAL_S)

    async def scenario() -> list[tuple[bool, float, bytes]]:
        nonlocal stuck
        seen = []

        def look() -> None:
            now = time.monotonic()
            seen.append((link.on_time(now), round(link.silent_for(now)), link.doing.value))

        receiver.start(asyncio.get_running_loop(), _Echo, stuck=lambda: stuck)
        await settle()
        look()  # a forward pass well within the timeout is healthy work
        stuck = (0.6, "forward pass of version 1 running for 0.6s")
        await settle()
        look()
        stuck = (5.0, "forward pass of version 1 running for 5.0s")  # over timeout_s: hung since it began
        await settle()
        look()
        stuck = (0.0, "")  # it returned after all
        await settle()
        look()
        time.sleep(2 * LATE_AFTER_S)  # the loop itself stops turning
        look()
        receiver.stop()
        return seen

    assert asyncio.run(scenario()) == [
        (True, 0, b""),
        (True, 0, b""),
        (False, 5, b"forward pass of version 1 running for 5.0s"),
        (True, 0, b""),
        (False, 2, b""),
    ]
