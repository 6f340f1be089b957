"""A hung worker, with real processes: stopped by SIGSTOP or stuck in a forward pass that never returns,
it is skipped by the hand-off, killed after WORKER_TIMEOUT_S and replaced; a worker merely busy with
slow forward passes is left alone. Each test starts `python model_inference.py` (two workers).

The model of the last two tests is a real TorchScript file the server loads and verifies: the trained
network behind a forward pass that spins for a set time on real digits, and blocks for good, in the
open() of a FIFO nobody writes to, on an input whose top-left pixel is white (a marker no centred
digit has). TorchScript has no sleep: prim::TimePoint and a loop stand in for a slow computation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from mnist_service.process.handoff import BEAT_INTERVAL_S, LATE_AFTER_S
from mnist_service.process.server import worker_pids
from mnist_service.registry.repository import Repository
from mnist_service.training.export import save_torchscript

from .conftest import Server, add_version, running
from .test_supervisor import _connections_held, _FreshReadiness, _Load, _served

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT_S = 3.0  # WORKER_TIMEOUT_S in these tests
# From a hang to its worker's death: the timeout, a beat, the supervisor's loop, on a busy machine.
DETECTION_BOUND_S = TIMEOUT_S + 3
# A log line's time: "2026-12-06 02:32:41,123 ..."
_STAMP = re.compile(r"^\S+ \S+,\d{3}")


class _Controlled(torch.nn.Module):
    """The trained network, slowed by `base_ns` on every pass and `slow_ns` more on real digits; blocked
    for good on the marker input (a white top-left pixel), in the open() of the FIFO `gate`."""

    def __init__(self, net: torch.nn.Module, gate: str, base_ns: int, slow_ns: int) -> None:
        super().__init__()
        self.net, self.gate, self.base_ns, self.slow_ns = net, gate, base_ns, slow_ns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wait = self.base_ns
        if bool(x.max() > x.min()):  # a real digit, not warm-up's blank image
            wait += self.slow_ns
        end = torch.ops.prim.TimePoint() + wait
        while torch.ops.prim.TimePoint() < end:
            pass
        if bool((x[:, 0, 0, 0] > 2.0).any()):  # the marker, normalised: (1 - 0.13) / 0.31
            # The size depends on the input, so that freezing cannot run the call at load time.
            x = x + torch.from_file(self.gate, False, x.shape[0], dtype=torch.uint8).float().sum()
        return self.net(x)


def _controlled_repository(model_dir: Path, tmp_path: Path, base_s: float, slow_s: float = 0.0) -> Path:
    """A repository whose version 1 is the trained model wrapped in _Controlled; returns its root."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    net = torch.jit.load(str(model_dir / "mnist_cnn.pt"))
    metadata = json.loads((model_dir / "mnist_cnn.json").read_text())
    del metadata["version"], metadata["onnx_sha256"]  # the new file's sha256 is recorded; it has no ONNX export
    source = tmp_path / "controlled"
    source.mkdir()
    controlled = torch.jit.script(_Controlled(net, str(gate), int(base_s * 1e9), int(slow_s * 1e9)).eval())
    save_torchscript(controlled, metadata, source / "mnist_cnn.pt")
    repo = Repository(tmp_path / "models", "mnist")
    add_version(repo, 1, source)
    return repo.root


def _marked_digit() -> dict:
    """A v2 inference body whose forward pass never returns in _Controlled."""
    image = np.zeros((28, 28), dtype=np.uint8)
    image[0, 0] = 255
    return {"inputs": [{"name": "input", "shape": [1, 28, 28], "datatype": "UINT8", "data": image.ravel().tolist()}]}


def _logged_at(log: str, pattern: str) -> tuple[float, re.Match[str]]:
    """The wall-clock time of the first log line matching `pattern`, and the match."""
    for line in log.splitlines():
        if (m := re.search(pattern, line)) is not None and (stamp := _STAMP.match(line)) is not None:
            return datetime.strptime(stamp[0], "%Y-%m-%d %H:%M:%S,%f").timestamp(), m
    raise AssertionError(f"no log line matches {pattern!r}:\n{log[-3000:]}")


def _logged_at_within(server: Server, pattern: str) -> tuple[float, re.Match[str]]:
    deadline = time.monotonic() + DETECTION_BOUND_S + 10
    while True:
        try:
            return _logged_at(server.stderr(), pattern)
        except AssertionError:
            assert time.monotonic() < deadline, f"nothing logged {pattern!r}\n{server.stderr()[-3000:]}"
            time.sleep(0.1)


def _deaths(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if m := re.match(r'mnist_worker_deaths_total\{cause="([^"]+)"\} (\S+)', line):
            out[m[1]] = float(m[2])
    return out


@contextlib.contextmanager
def _under_load(url: str, concurrency: int) -> Iterator[tuple[_Load, _FreshReadiness]]:
    """Steady load on `concurrency` connections and a fresh /readyz every 20 ms, for the block's length."""
    load, readiness = _Load(url, concurrency, seconds=120), _FreshReadiness(url)
    load.start()
    readiness.start()
    try:
        yield load, readiness
    finally:
        load.stop.set()
        readiness.stop.set()
        load.join(timeout=30)
        readiness.join(timeout=10)


def _failures(results: list[tuple[float, str]], since: float) -> list[tuple[float, str]]:
    """The outcomes other than 200, with their times in seconds after `since`."""
    return [(round(t - since, 2), outcome) for t, outcome in results if outcome != "200"]


def _probes_kept_open(url: str, n: int) -> list[str]:
    """/readyz on `n` new connections opened one after the other, all kept open until the last answers."""
    clients = [httpx.Client(timeout=10) for _ in range(n)]
    outcomes = []
    try:
        for client in clients:
            try:
                outcomes.append(str(client.get(f"{url}/readyz").status_code))
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)
    finally:
        for client in clients:
            client.close()
    return outcomes


def _replacement(server: Server, before: list[int], victim: int) -> int:
    """The new worker's pid, once the victim is gone and a new worker stands in its place."""
    deadline = time.monotonic() + DETECTION_BOUND_S + 30
    while running(victim) or len(new := [p for p in worker_pids(server.proc.pid) if p not in before]) != 1:
        assert time.monotonic() < deadline, f"the hung worker was not replaced\n{server.stderr()[-3000:]}"
        time.sleep(0.05)
    return new[0]


def _first_answer_by(server: Server, pid: int, load: _Load) -> float:
    """When worker `pid` first answered 200 (from the access log), waiting for it while `load` runs."""
    deadline = time.monotonic() + 60
    while not (times := [t for t, p, status in _served(server.stderr()) if p == pid and status == 200]):
        assert load.is_alive() and time.monotonic() < deadline, f"pid {pid} never answered\n{server.stderr()[-3000:]}"
        time.sleep(0.1)
    return min(times)


def test_a_stopped_worker_is_skipped_at_once_then_killed_and_replaced(start_server) -> None:
    server = start_server(ACCESS_LOG="all", WORKER_TIMEOUT_S=str(TIMEOUT_S))
    with _under_load(server.url, concurrency=8) as (load, readiness):
        time.sleep(2)
        before = worker_pids(server.proc.pid)
        victim, survivor = before
        held = _connections_held(victim, server.port)
        stopped_at = time.time()
        os.kill(victim, signal.SIGSTOP)
        try:
            late_at, _ = _logged_at_within(server, rf"worker-\d \(pid {victim}\) is late")
            kept_open = _probes_kept_open(server.url, 6)
            replacement = _replacement(server, before, victim)
            first = _first_answer_by(server, replacement, load)
        finally:
            if running(victim):  # not killed: let it go, so that the fixture can stop the server
                os.kill(victim, signal.SIGCONT)
    log = server.stderr()
    killed_at, _ = _logged_at(log, rf"worker-\d \(pid {victim}\) hung: .*process is stopped by a signal")
    failed, probes_failed = _failures(load.results, stopped_at), _failures(readiness.probes, stopped_at)
    print(
        f"skipped {late_at - stopped_at:.2f}s after SIGSTOP, killed after {killed_at - stopped_at:.2f}s, replacement "
        f"answering after {first - stopped_at:.2f}s; {len(load.results)} requests, the stopped worker held {held} "
        f"connections, failed: {failed}; {len(readiness.probes)} fresh /readyz, failed: {probes_failed}; "
        f"/readyz on connections kept open after the skip: {kept_open}"
    )

    assert late_at - stopped_at <= LATE_AFTER_S + 1, "the hand-off kept feeding the stopped worker"
    assert TIMEOUT_S - BEAT_INTERVAL_S <= killed_at - stopped_at <= DETECTION_BOUND_S
    assert survivor in worker_pids(server.proc.pid)
    # Only the requests in flight on the stopped worker failed, each once, when it was killed.
    assert 0 < held <= 8 and len(failed) <= held, failed
    assert all(killed_at - stopped_at - 0.5 <= t and not status.isdigit() for t, status in failed), failed
    # Readiness answered throughout: a fresh probe failed only if it reached the stopped worker
    # before the hand-off skipped it; every probe from then on got a 200.
    assert readiness.results["200"] > 0 and "503" not in readiness.results, readiness.results
    assert all(-0.1 <= t < late_at - stopped_at + 0.05 for t, _ in probes_failed), probes_failed
    # Connections that stay open weigh on the least-loaded choice, which would soon pick the stopped
    # worker if the hand-off did not skip it.
    assert kept_open == ["200"] * 6, kept_open
    assert _deaths(server.url)["hung"] == 1
    assert "died (hung): starting a replacement" in log
    assert "Traceback" not in log, log


def test_a_forward_pass_that_never_returns_gets_its_worker_killed(
    start_server, model_dir: Path, tmp_path: Path
) -> None:
    repository = _controlled_repository(model_dir, tmp_path, base_s=0.003)  # over INLINE_MAX_S: never on the loop
    server = start_server(MODEL_REPOSITORY=str(repository), ACCESS_LOG="all", WORKER_TIMEOUT_S=str(TIMEOUT_S))
    marked: list[str] = []

    def send_marked() -> None:
        try:
            marked.append(str(httpx.post(f"{server.url}/v2/models/mnist/infer", json=_marked_digit(), timeout=30)))
        except httpx.HTTPError as exc:
            marked.append(type(exc).__name__)

    with _under_load(server.url, concurrency=4) as (load, readiness):
        time.sleep(1)
        before = worker_pids(server.proc.pid)
        held = {pid: _connections_held(pid, server.port) for pid in before}
        sender = threading.Thread(target=send_marked, daemon=True)
        sent_at = time.time()
        sender.start()
        killed_at, hung = _logged_at_within(server, r"worker-\d \(pid (\d+)\) hung: (.*)")
        victim = int(hung[1])
        replacement = _replacement(server, before, victim)
        first = _first_answer_by(server, replacement, load)
    sender.join(timeout=10)
    log = server.stderr()
    failed, probes_failed = _failures(load.results, sent_at), _failures(readiness.probes, sent_at)
    print(
        f"killed {killed_at - sent_at:.2f}s after the marked request ({hung[2]}); replacement answering after "
        f"{first - sent_at:.2f}s; {len(load.results)} requests, failed: {failed}; the marked request: {marked}; "
        f"{len(readiness.probes)} fresh /readyz, failed: {probes_failed}"
    )

    assert victim in before and set(before) - {victim} <= set(worker_pids(server.proc.pid))
    assert "in a stuck forward pass: model version 1's batcher busy for" in hung[2]
    assert TIMEOUT_S <= killed_at - sent_at <= DETECTION_BOUND_S
    assert marked and not marked[0].startswith("<Response"), marked  # it died with its worker
    # Only the requests queued behind the stuck pass failed, cut at its worker's death, once each.
    assert len(failed) <= held[victim] and all(not status.isdigit() for _, status in failed), (held, failed)
    # Its loop kept turning, so it answered /readyz itself until it was killed (a probe in flight
    # at that moment may be cut off with it).
    assert readiness.results["200"] > 0 and len(probes_failed) <= 1, readiness.results
    assert _deaths(server.url)["hung"] == 1
    assert "Traceback" not in log, log


def test_a_busy_worker_with_slow_forward_passes_is_never_killed(start_server, model_dir: Path, tmp_path: Path) -> None:
    slow_s = TIMEOUT_S / 2
    repository = _controlled_repository(model_dir, tmp_path, base_s=0.003, slow_s=slow_s)
    server = start_server(MODEL_REPOSITORY=str(repository), ACCESS_LOG="all", WORKER_TIMEOUT_S=str(TIMEOUT_S))
    before = worker_pids(server.proc.pid)
    load = _Load(server.url, concurrency=4, seconds=4 * TIMEOUT_S)
    load.start()
    load.join(timeout=60)
    log = server.stderr()
    served = _served(log)
    statuses = [status for _, status in load.results]
    print(f"{len(statuses)} requests of {slow_s}s forward passes: {dict(Counter(statuses))}; "
          f"answered by {dict(Counter(pid for _, pid, _ in served))}")

    assert worker_pids(server.proc.pid) == before
    assert {pid for _, pid, _ in served} == set(before), "both workers served"
    assert statuses and set(statuses) == {"200"}
    assert "is late" not in log and ") hung: " not in log, log
    assert _deaths(server.url)["hung"] == 0


def test_worker_deaths_are_counted_at_zero_from_the_start(start_server) -> None:
    server = start_server()
    deaths = _deaths(server.url)
    assert deaths and set(deaths.values()) == {0.0}, deaths
    assert {"hung", "SIGKILL"} <= set(deaths)
