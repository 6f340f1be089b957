"""The supervisor under bad luck, with real processes: a worker killed under load, a crash loop, a
flood of connections. Each test starts `python model_inference.py` (two workers) on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from PIL import Image

from mnist_service.process.server import worker_pids
from mnist_service.tools.images import png_bytes
from mnist_service.tools.images import test_digit as mnist_digit
from mnist_service.tools.stress import Connection, build_payload

from .conftest import DATA_DIR, exit_code_within, running

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# An access line: "<date> <time>,<ms> INFO <pid> mnist_service.access method=POST path=/predict status=200 ..."
_ACCESS = re.compile(r"^(\S+ \S+) INFO (\d+) mnist_service\.access .*status=(\d+)")


def _served(log: str) -> list[tuple[float, int, int]]:
    """(time, pid, status) of every access line in a server log."""
    out = []
    for line in log.splitlines():
        if m := _ACCESS.match(line):
            when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append((when, int(m[2]), int(m[3])))
    return out


def _refused(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("mnist_connections_refused_total "):
            return float(line.split()[1])
    return 0.0


def _statuses(url: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith("mnist_requests_total{"):
            counts[re.search(r'status="(\d+)"', line)[1]] += float(line.rsplit(" ", 1)[1])  # type: ignore[index]
    return counts


def _connections_held(pid: int, port: int) -> int:
    """How many TCP connections to `port` the process `pid` holds open, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                inodes.add(target[8:-1])
    held = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            held += local_port == port and state == "01" and inode in inodes  # 01: ESTABLISHED
    return held


class _FreshReadiness(threading.Thread):
    """Asks /readyz on a new connection every 20 ms (so each probe may land on any worker)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.results, self.stop = url, Counter[str](), threading.Event()
        self.probes: list[tuple[float, str]] = []  # (wall-clock time the probe started, status or error name)

    def run(self) -> None:
        while not self.stop.wait(0.02):
            started = time.time()
            try:
                outcome = str(httpx.get(f"{self.url}/readyz", timeout=5).status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            self.results[outcome] += 1
            self.probes.append((started, outcome))


class _Load(threading.Thread):
    """Steady load: `concurrency` keep-alive connections (the stress tester's client) sending a raw
    PNG upload in a closed loop, recording when each answer (or failure) came back. It stops after
    `seconds`, or sooner when `stop` is set."""

    def __init__(self, url: str, concurrency: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.url, self.concurrency, self.seconds = url, concurrency, seconds
        self.results: list[tuple[float, str]] = []  # (wall-clock time, status or error name)
        self.stop = threading.Event()

    def run(self) -> None:
        payload = build_payload(png_bytes(Image.fromarray(mnist_digit(0, DATA_DIR)[0])), "raw")

        async def client() -> None:
            connection = Connection(self.url, payload, timeout_s=10)
            end = time.monotonic() + self.seconds
            while time.monotonic() < end and not self.stop.is_set():
                status = await connection.send()
                self.results.append((time.time(), status))
            await connection.close()

        async def main() -> None:
            await asyncio.gather(*(client() for _ in range(self.concurrency)))

        asyncio.run(main())


@pytest.mark.parametrize("hot_path", ["true", "false"], ids=["hot", "fastapi"])
def test_a_killed_worker_is_replaced_while_the_other_keeps_serving(start_server, hot_path: str) -> None:
    server = start_server(ACCESS_LOG="all", HOT_PATH=hot_path)
    concurrency = 8
    load = _Load(server.url, concurrency, seconds=14)
    load.start()
    readiness = _FreshReadiness(server.url)
    readiness.start()
    time.sleep(3)
    before = worker_pids(server.proc.pid)
    assert len(before) == 2, before
    victim, survivor = before
    held = _connections_held(victim, server.port)
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)

    deadline = time.monotonic() + 60
    while len(new := [p for p in worker_pids(server.proc.pid) if p not in before]) != 1:
        assert time.monotonic() < deadline, "no replacement worker was started"
        time.sleep(0.05)
    replacement = new[0]
    load.join(timeout=60)
    readiness.stop.set()
    readiness.join(timeout=10)
    log = server.stderr()
    served = _served(log)

    # Only requests in flight on the dead worker failed, all at the moment of the kill; every other
    # answer was a 200. At most two per connection it held: the request in flight, and at most one
    # retry by the same client that reconnected within the millisecond the kernel took to close
    # the dying worker's sockets (its hand-off channel closes last; measured: 4 or 5 failures for 4).
    failed = [(round(t - killed_at, 3), status) for t, status in load.results if status != "200"]
    print(f"{len(load.results)} requests; the dead worker held {held} connections; failed: {failed}")
    assert 0 < held <= concurrency, held
    assert len(failed) <= 2 * held, failed
    assert all(0 <= t < 0.5 and not status.isdigit() for t, status in failed), failed
    assert not [s for s, n in _statuses(server.url).items() if s.startswith("5") and n], _statuses(server.url)
    # The replacement served, soon after the death.
    first = min((t for t, pid, status in served if pid == replacement and status == 200), default=None)
    assert first is not None, f"the replacement never answered a request\n{log[-3000:]}"
    print(f"replacement pid {replacement} answering {first - killed_at:.2f}s after the kill")
    assert first - killed_at < 30, first - killed_at
    # Back to full speed: in the last 3 s of load both workers took a fair share of it.
    end = max(t for t, _ in load.results)
    window = Counter(pid for t, pid, status in served if t > end - 3 and status == 200)
    rate_before = sum(1 for t, status in load.results if killed_at - 2.5 < t < killed_at - 0.5) / 2
    rate_after = sum(1 for t, status in load.results if t > end - 3 and status == "200") / 3
    print(f"req/s: {rate_before:.0f} in the 2 s before the kill, {rate_after:.0f} in the last 3 s; "
          f"split {dict(window)}")
    assert set(window) == {survivor, replacement}, window
    assert min(window.values()) >= 0.3 * sum(window.values()), window
    # Readiness never failed: some worker was always ready. A probe in flight on the dead worker
    # may have been cut off with it, like any request there.
    errors = {k: n for k, n in readiness.results.items() if k != "200"}
    assert readiness.results["200"] > 0 and sum(errors.values()) <= 1 and "503" not in errors, readiness.results
    assert "died (SIGKILL): starting a replacement" in log
    assert 'mnist_worker_deaths_total{cause="SIGKILL"} 1.0' in httpx.get(f"{server.url}/metrics").text
    assert "Traceback" not in log, log


def test_a_crash_loop_stops_the_server_with_a_nonzero_exit(start_server) -> None:
    server = start_server(WORKER_RESTART_LIMIT="2", WORKER_RESTART_WINDOW_S="60", SHUTDOWN_DRAIN_SECONDS="0")
    killed: set[int] = set()
    deadline = time.monotonic() + 120
    while server.proc.poll() is None:
        assert time.monotonic() < deadline, f"still running after {len(killed)} deaths\n{server.stderr()}"
        for pid in worker_pids(server.proc.pid):
            if pid not in killed and len(killed) < 3:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.05)
    code, _ = exit_code_within(server.proc, 1)
    log = server.stderr()
    assert code == 3, f"exit code {code}\n{log}"
    assert len(killed) == 3  # two deaths are replaced, the third is one over the limit
    assert log.count("starting a replacement") == 2, log
    assert "3 deaths within 60s is over WORKER_RESTART_LIMIT=2" in log, log
    time.sleep(1)
    assert not [p for p in killed if running(p)]


def test_connections_over_the_cap_are_answered_503_at_once(start_server) -> None:
    server = start_server(MAX_CONNECTIONS="3")
    refused_before = _refused(server.url)  # read now: at the cap, this scrape itself would be refused
    workers = worker_pids(server.proc.pid)
    deadline = time.monotonic() + 30
    while True:  # until both workers take connections (a worker logs "startup complete" just before)
        held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(6)]  # 3 per worker
        time.sleep(0.5)
        if [_connections_held(pid, server.port) for pid in workers] == [3, 3]:
            break
        for s in held:
            s.close()
        assert time.monotonic() < deadline, "the six connections never split 3 and 3"
        time.sleep(0.5)
    with socket.create_connection(("127.0.0.1", server.port)) as extra:
        extra.settimeout(5)
        started = time.monotonic()
        answer = extra.recv(4096)
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"retry-after: 1" in answer.lower() and b"MAX_CONNECTIONS" in answer
    assert time.monotonic() - started < 2
    for s in held:
        s.close()
    time.sleep(0.5)
    # With the idle connections gone, clients are served again.
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    assert _refused(server.url) > refused_before  # counted (retried splits above may add more)


def test_the_supervisor_loads_no_torch(start_server) -> None:
    """The supervisor only accepts and hands off connections: torch (and the serving layer that brings
    it) stays in the workers, or the supervisor's RSS grows by ~200 MB and its metrics go astray."""
    server = start_server()
    maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" not in maps, "the supervisor process has torch loaded"
    workers = worker_pids(server.proc.pid)
    assert workers and all("libtorch" in Path(f"/proc/{pid}/maps").read_text() for pid in workers)
