"""The model lifecycle with real processes: publish, promote, roll back and unload versions while the
stress tester keeps the multi-worker server busy; nothing may fail and every worker must follow.

Which worker answered with which version is read from the server's access log (ACCESS_LOG=all:
each line carries the worker's pid and the version).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from mnist_service.registry.repository import ModelConfig, Repository

from .conftest import ROOT, Server, add_version

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_ACCESS = re.compile(r"^(\S+ \S+) INFO (\d+) mnist_service\.access .*path=/predict status=(\d+) version=(\S+)")
FOLLOW_S = 10.0  # a change must reach every worker within this (REPOSITORY_POLL_S is 1 here)


def _answers(log: str) -> list[tuple[float, int, int, str]]:
    """(time, pid, status, version) of every /predict answer in the log."""
    out = []
    for line in log.splitlines():
        if m := _ACCESS.match(line):
            out.append((datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(m[2]), int(m[3]), m[4]))
    return out


def _followed(server: Server, since: float, version: str, workers: int = 2) -> float:
    """Seconds from `since` until every worker had answered with `version`; fails after FOLLOW_S."""
    deadline = time.monotonic() + FOLLOW_S + 5
    while True:
        firsts: dict[int, float] = {}
        for t, pid, status, v in _answers(server.stderr()):
            if t >= since and v == version and status == 200:
                firsts.setdefault(pid, t)
        if len(firsts) >= workers:
            return max(firsts.values()) - since
        assert time.monotonic() < deadline, f"workers answering with {version}: {firsts}\n{server.stderr()[-3000:]}"
        time.sleep(0.1)


def test_publish_promote_roll_back_and_unload_under_load(start_server, tmp_path: Path, model_dir: Path) -> None:
    repo = Repository(tmp_path / "models", "mnist")
    add_version(repo, 1, model_dir)
    repo.write_config(ModelConfig(labels={"stable": 1}))
    server = start_server(MODEL_REPOSITORY=str(repo.root), REPOSITORY_POLL_S="1", ACCESS_LOG="all")
    stress_json = tmp_path / "stress.json"
    stress = subprocess.Popen(
        [sys.executable, "stress_testing.py", "--url", server.url, "--concurrency", "8", "--duration", "25",
         "--sequential-requests", "0", "--mode", "raw", "--json", str(stress_json), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    time.sleep(2)

    # Publish version 2: it loads beside 1, and the default stays 1.
    add_version(repo, 2, model_dir)
    deadline = time.monotonic() + FOLLOW_S
    while [v["version"] for v in httpx.get(f"{server.url}/model").json()["versions"]] != ["1", "2"]:
        assert time.monotonic() < deadline, httpx.get(f"{server.url}/model").json()["versions"]
        time.sleep(0.1)
    # Promote it: every worker answers with 2 within seconds.
    promoted = time.time()
    repo.set_label("stable", 2)
    took_promote = _followed(server, promoted, "2")
    # Pinning 1 works while it is loaded (latest 2 keeps it).
    for _ in range(4):  # fresh connections: each may land on either worker
        pinned = httpx.post(f"{server.url}/predict/pixels?version=1", json={"pixels": [0] * 784})
        assert pinned.status_code == 200 and pinned.json()["model_version"] == "1", pinned.text
    # Roll back: every worker answers with 1 again.
    rolled = time.time()
    assert repo.rollback() == (2, 1)
    took_rollback = _followed(server, rolled, "1")
    # Serve only 2 (stable) and drop 1: once unloaded everywhere, pinning 1 is a 404 naming what is loaded.
    unloaded = time.time()
    repo.write_config(ModelConfig(version_policy={"specific": {"versions": [2]}}, labels={"stable": 2}))
    took_switch = _followed(server, unloaded, "2")
    deadline = time.monotonic() + FOLLOW_S
    misses = 0
    while misses < 6:  # six fresh connections in a row (they spread over both workers) without version 1
        response = httpx.post(f"{server.url}/predict/pixels?version=1", json={"pixels": [0] * 784})
        misses = misses + 1 if response.status_code == 404 else 0
        assert time.monotonic() < deadline, f"version 1 still answers: {response.status_code} {response.text}"
        time.sleep(0.05)
    assert "model version 1 is not loaded; loaded: 2 (stable)" in response.json()["detail"]

    output = stress.communicate(timeout=90)[0].decode()
    summary = json.loads(stress_json.read_text())["concurrent"]
    print(f"every worker on the new version: promote {took_promote:.2f}s, rollback {took_rollback:.2f}s, "
          f"drop 1 {took_switch:.2f}s; load: {summary['requests']} requests, {summary['errors']} errors, "
          f"{summary['throughput_rps']} req/s")
    assert stress.returncode == 0 and summary["errors"] == 0, output
    assert max(took_promote, took_rollback, took_switch) < FOLLOW_S
    log = server.stderr()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_unload_and_load_through_the_api_reach_every_worker(start_server, tmp_path: Path, model_dir: Path) -> None:
    repo = Repository(tmp_path / "models", "mnist")
    add_version(repo, 1, model_dir)
    server = start_server(MODEL_REPOSITORY=str(repo.root), ADMIN_API_KEY="adm")
    admin = {"Authorization": "Bearer adm"}

    def readiness_everywhere(status: int) -> None:
        """Six fresh connections in a row (spread over both workers) answer /readyz with `status`."""
        streak, deadline = 0, time.monotonic() + FOLLOW_S
        while streak < 6:
            streak = streak + 1 if httpx.get(f"{server.url}/readyz").status_code == status else 0
            assert time.monotonic() < deadline, f"/readyz never {status} on every worker"
            time.sleep(0.05)

    assert httpx.post(f"{server.url}/v2/repository/models/mnist/unload", headers=admin).status_code == 200
    readiness_everywhere(503)
    response = httpx.post(f"{server.url}/predict/pixels", json={"pixels": [0] * 784})
    assert response.status_code == 503 and "unloaded through the repository API" in response.json()["detail"]
    assert httpx.post(f"{server.url}/v2/repository/models/mnist/load", headers=admin).status_code == 200
    readiness_everywhere(200)
    assert httpx.post(f"{server.url}/predict/pixels", json={"pixels": [0] * 784}).json()["model_version"] == "1"


def test_a_repository_with_nothing_to_serve_stops_startup_with_one_line(tmp_path: Path, model_path: Path) -> None:
    from .conftest import exit_code_within, start_process

    server = start_process(model_path, tmp_path, MODEL_REPOSITORY=str(tmp_path / "empty"))
    code, _ = exit_code_within(server.proc, 60)
    errors = [line for line in server.stderr().splitlines() if " ERROR " in line]
    assert code == 2 and len(errors) == 1, server.stderr()
    assert "no model version in" in errors[0] and "model_train.py --repository" in errors[0]
