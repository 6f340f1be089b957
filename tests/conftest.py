"""Shared fixtures: a quickly trained model (session-wide) and app clients built by the factory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mnist_service.data import load_split
from mnist_service.inference.runtime import RUNTIMES
from mnist_service.registry.repository import METADATA_FILE, MODEL_FILE, Repository
from mnist_service.serving.api import create_app
from mnist_service.settings import Settings
from mnist_service.tools.client import ServerNotReady, wait_until_ready
from mnist_service.training.train import TrainParams, run

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "mnist"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    """Poll /readyz of a server process until 200; fail with its log if it dies or never gets there."""
    try:
        wait_until_ready(url, lambda: proc.poll() is None, timeout)
    except ServerNotReady as exc:
        raise AssertionError(f"{exc}:\n{log.read_text()}") from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `both_runtimes` (a module's pytestmark) run once per runtime: the `runtime` the `settings`
    fixture serves with. Every other test serves with TorchScript, the default where torch is installed."""
    if "runtime" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_runtimes"):
        metafunc.parametrize("runtime", RUNTIMES)


@pytest.fixture
def runtime() -> str:
    return "torchscript"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained for a few seconds: ~95% accurate, enough to tell digits apart; with its ONNX export."""
    out = tmp_path_factory.mktemp("model")
    run(TrainParams(data_dir=DATA_DIR, output=out, epochs=2, max_train=3000, seed=1, drift_images=2000))
    return out


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, weaker model (one short epoch, another seed): it disagrees with the first now and then."""
    out = tmp_path_factory.mktemp("other-model")
    run(TrainParams(data_dir=DATA_DIR, output=out, epochs=1, max_train=600, seed=7, drift_images=2000))
    return out


@pytest.fixture(scope="session")
def old_model_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model_dir's network as published before ONNX export: mnist_cnn.pt + .json, no onnx_sha256, no .onnx."""
    import torch  # only training-side fixtures need it

    from mnist_service.training.export import save_torchscript

    out = tmp_path_factory.mktemp("old-model")
    metadata = json.loads((model_dir / "mnist_cnn.json").read_text())
    for key in ("version", "onnx_sha256", "onnx"):
        del metadata[key]
    save_torchscript(torch.jit.load(str(model_dir / "mnist_cnn.pt")), metadata, out / "mnist_cnn.pt")
    return out


@pytest.fixture(scope="session")
def model_path(model_dir: Path) -> Path:
    return model_dir / "mnist_cnn.pt"


@pytest.fixture(scope="session")
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    """The official test set: (images uint8 N x 28 x 28, labels)."""
    split = load_split(DATA_DIR, "test")
    return split.images, split.labels


def add_version(
    repo: Repository, number: int, source: Path, damage: Callable[[Path], None] | None = None, onnx: bool = True
) -> None:
    """Put a model's files from `source` into `repo` as version `number` (without model.onnx if not `onnx`),
    built in a hidden folder and renamed into place, as publishing does."""
    staging = repo.folder / f".staging-{number}"
    staging.mkdir(parents=True)
    shutil.copy(source / "mnist_cnn.pt", staging / MODEL_FILE)
    shutil.copy(source / "mnist_cnn.json", staging / METADATA_FILE)
    if onnx and (source / "mnist_cnn.onnx").is_file():
        shutil.copy(source / "mnist_cnn.onnx", staging / "model.onnx")
    if damage is not None:
        damage(staging / MODEL_FILE)
    os.rename(staging, repo.folder / str(number))


@pytest.fixture
def settings(model_path: Path, runtime: str) -> Settings:
    return Settings(model_path=model_path, max_batch_delay_ms=1.0, request_timeout_s=10.0, runtime=runtime)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A client of a fully started app (lifespan run: model loaded, verified and warmed)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


# Two forward passes of the same image agree to about 1e-7 when the batch around it differs (the
# kernels sum in another order, and differently with or without AVX-512): never compare exactly.
PROBABILITY_TOLERANCE = 1e-5


def same_answer(a: object, b: object, tolerance: float = PROBABILITY_TOLERANCE) -> bool:
    """Two JSON answers are equal: every key, string, int and digit exactly, floats within `tolerance`."""
    if isinstance(a, float) or isinstance(b, float):
        both_numbers = isinstance(a, int | float) and isinstance(b, int | float)
        return both_numbers and not isinstance(a, bool) and not isinstance(b, bool) and abs(a - b) <= tolerance
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_answer(a[k], b[k], tolerance) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_answer(x, y, tolerance) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def metric_samples(app: FastAPI, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The app's samples of one metric, keyed by their sorted (label, value) pairs."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(app.state.metrics.render().decode())
        for sample in family.samples
        if sample.name == name
    }


@contextlib.contextmanager
def served_in_thread(settings: Settings) -> Iterator[tuple[FastAPI, str]]:
    """The app on a real socket (uvicorn with the production protocol class), in a thread of the
    test process, so a test can reach into the app while real HTTP clients talk to it."""
    from mnist_service.process.server import _uvicorn_config

    settings = settings.model_copy(update={"workers": 1, "host": "127.0.0.1", "port": free_port()})
    app = create_app(settings)
    server = uvicorn.Server(_uvicorn_config(settings, app))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield app, f"http://127.0.0.1:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


class SocketClient(httpx.Client):
    """A TestClient's interface (`.app` included) over a real socket, to an app served in a thread."""

    def __init__(self, app: FastAPI, url: str) -> None:
        super().__init__(base_url=url, timeout=30)
        self.app = app


@contextlib.contextmanager
def socket_client(settings: Settings) -> Iterator[SocketClient]:
    with served_in_thread(settings) as (app, url), SocketClient(app, url) as client:
        yield client


@pytest.fixture(params=["asgi", "hot"])
def serve(request: pytest.FixtureRequest) -> Callable[[Settings], contextlib.AbstractContextManager[httpx.Client]]:
    """serve(settings) -> a client context: in-process ASGI (FastAPI answers every request), or a real
    socket with the hot path on (POST /predict and v2 infer answered below ASGI). Tests that take it
    run both ways and must see the same answers."""

    def start(settings: Settings) -> contextlib.AbstractContextManager[httpx.Client]:
        if request.param == "asgi":
            return TestClient(create_app(settings))
        return socket_client(settings.model_copy(update={"hot_path": True}))

    return start


# Real server processes: `python model_inference.py` on a free port, as a user starts it.
STARTUP_TIMEOUT_S = 120.0  # torch import, model load and warm-up on a busy shared machine


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def start_process(model_path: Path, tmp_path: Path, **env: str) -> Server:
    """Start the server without waiting for it (a test of a failing startup watches it fail)."""
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    # With MODEL_REPOSITORY in env the server serves that repository; otherwise the one model file.
    model = [] if "MODEL_REPOSITORY" in env else ["--model", str(model_path)]
    proc = subprocess.Popen(
        [sys.executable, "model_inference.py", *model, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        # No gRPC port unless the test asks for one: servers of parallel tests would share 8001 (SO_REUSEPORT).
        env={**os.environ, "GRPC_PORT": "0", **env},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    return Server(proc, port, log)


@pytest.fixture
def start_server(model_path: Path, tmp_path: Path) -> Iterator:
    """start(**env) -> a ready Server; every server still running is killed after the test."""
    servers: list[Server] = []

    def start(**env: str) -> Server:
        server = start_process(model_path, tmp_path, **env)
        servers.append(server)
        wait_ready(server.url, server.proc, server.log, STARTUP_TIMEOUT_S)
        # /readyz answers once one worker is ready: wait for every worker, so load splits as in service.
        workers = int(env.get("WORKERS", "2"))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while server.stderr().count("Application startup complete.") < workers:
            assert server.proc.poll() is None and time.monotonic() < deadline, server.stderr()
            time.sleep(0.05)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def exit_code_within(proc: subprocess.Popen[bytes], seconds: float) -> tuple[int | None, float]:
    started = time.monotonic()
    try:
        return proc.wait(timeout=seconds), time.monotonic() - started
    except subprocess.TimeoutExpired:
        return None, time.monotonic() - started


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
