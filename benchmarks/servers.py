"""The servers under test: how to install, start, wait for and stop each one, and what each is sent."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from benchmarks import torchserve_setup
from benchmarks.server_cpu import alive, server_pids
from mnist_service.settings import Settings
from mnist_service.tools.stress import Payload, build_grpc_payload, build_payload, build_v2_payload

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
SERVERS = ("ours", "ours-onnx", "ours-fastapi", "ours-grpc", "baseline", "litserve", "torchserve", "bentoml")


def _service_pins(*names: str) -> tuple[str, ...]:
    """The service's own pins of these packages, from requirements.txt."""
    return tuple(
        line.strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.split("==")[0].strip().lower() in names
    )


@dataclass(frozen=True)
class Venv:
    """A peer's own venv: its pins clash with the service's, or drag in what the service does not need."""

    path: Path
    pins: tuple[str, ...]
    imports: str  # what must import for the venv to count as installed

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


# What each peer's venv shares with the service (its preprocessing imports these; mnist_service.errors
# imports starlette, which LitServe and BentoML bring along) is at the service's pins, torch in the same
# pip command, so pip never swaps in another (CUDA) build. bentoml 1.4.40 needs a certifi newer than
# the registry mirror here has.
VENVS = {
    "litserve": Venv(
        REPO / ".venv-litserve",
        ("litserve==0.2.19", *_service_pins("torch", "pillow", "numpy", "pyspng", "python-multipart")),
        "litserve, multipart, pyspng",
    ),
    "torchserve": Venv(
        REPO / ".venv-torchserve",
        (
            "torchserve==0.12.0", "torch-model-archiver==0.12.0", "pyyaml==6.0.3", "packaging==26.3",
            *_service_pins("torch", "pillow", "numpy", "pyspng", "starlette"),
        ),
        "ts, model_archiver, yaml, pyspng, starlette",
    ),
    "bentoml": Venv(
        REPO / ".venv-bentoml",
        ("bentoml==1.4.39", *_service_pins("torch", "pillow", "numpy", "pyspng")),
        "bentoml, pyspng",
    ),
}


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # What a request is: a multipart upload (field `file`, what `curl -F` sends) or the raw PNG body.
    body: Literal["multipart", "raw"] = "multipart"
    path: str = "/predict"
    # Ours also takes a digit as a v2 tensor: REST's v2 infer route, or gRPC ModelInfer on this port (ours-grpc,
    # which is measured on nothing else).
    takes_tensor: bool = False
    grpc_port: int | None = None

    def payload(self, image: bytes) -> Payload:
        """The request this server is sent for `image` (over HTTP)."""
        if self.body == "raw":
            return Payload(self.path, image, "image/png")
        return replace(build_payload(image, "multipart"), path=self.path)

    def tensor_payload(self, pixels: np.ndarray) -> Payload | None:
        """The request for a 28x28 digit as a UINT8 v2 tensor (gRPC ModelInfer or REST v2), None if not taken."""
        if self.grpc_port is not None:
            return build_grpc_payload(pixels)
        return build_v2_payload(pixels) if self.takes_tensor else None


def _apt_install(package: str) -> None:
    if subprocess.run(["apt-get", "install", "-y", package], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", package], check=True, capture_output=True)


def ensure_hey() -> None:
    """Install Debian's hey if it is missing."""
    if not shutil.which("hey"):
        _apt_install("hey")


def ensure_java() -> None:
    """Install Debian's Java 17 runtime if it is missing: TorchServe's frontend is Java."""
    if not shutil.which("java"):
        _apt_install("openjdk-17-jre-headless")


def ensure_venv(name: str) -> Path:
    """Create the peer's venv with its pinned packages unless they already import; return its python."""
    venv = VENVS[name]
    if venv.python.exists() and subprocess.run([venv.python, "-c", f"import {venv.imports}"]).returncode == 0:
        return venv.python
    subprocess.run([sys.executable, "-m", "venv", venv.path], check=True)
    pip = [venv.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *venv.pins], check=True)
    return venv.python


def ensure_server(name: str) -> None:
    """Whatever `name` needs that the service's venv does not have."""
    if name in VENVS:
        ensure_venv(name)
    if name == "torchserve":
        ensure_java()


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 right now."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def server_spec(
    name: str, model: Path, port: int, *, env: dict[str, str] | None = None, litserve_threads: int = 1
) -> ServerSpec:
    """The command line of one server, listening on 127.0.0.1:port. TorchServe's files are written here."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if name in ("ours", "ours-onnx", "ours-fastapi", "ours-grpc"):
        # No drain window: the benchmark stops the server only when it is idle. ours-fastapi is the
        # same server with the HTTP hot path off: FastAPI answers every request, as before it. ours-grpc
        # is ours (gRPC is on by default in all of them, on a free port) measured through its gRPC door.
        # ours-onnx is ours on ONNX Runtime (the model's .onnx beside it) instead of TorchScript.
        grpc_port = free_port()
        variant = {"ours-fastapi": {"HOT_PATH": "false"}, "ours-onnx": {"RUNTIME": "onnxruntime"}}.get(name, {})
        return ServerSpec(
            name,
            [sys.executable, "model_inference.py", "--model", str(model), *host],
            {"SHUTDOWN_DRAIN_SECONDS": "0", "GRPC_PORT": str(grpc_port), **variant, **(env or {})},
            takes_tensor=True,
            grpc_port=grpc_port if name == "ours-grpc" else None,
        )
    if name == "baseline":
        return ServerSpec(
            name, [sys.executable, "-m", "uvicorn", "benchmarks.baseline_server:app", *host], {"MODEL_PATH": str(model)}
        )
    if name == "litserve":
        command = [
            str(VENVS["litserve"].python), "benchmarks/litserve_server.py", "--model", str(model), *host,
            "--threads", str(litserve_threads),
        ]
        return ServerSpec(name, command, {"PYTHONPATH": str(REPO)})
    if name == "torchserve":
        workdir = OUT / "torchserve"
        ports = [p for p in free_ports(6) if p != port][:5]
        others = dict(zip(("management", "metrics", "grpc_inference", "grpc_management", "worker"), ports, strict=True))
        command = torchserve_setup.prepare(
            VENVS["torchserve"].path, model.resolve(), {"inference": port, **others}, Settings().max_queue, workdir
        )
        env = {"PYTHONPATH": str(REPO), **torchserve_setup.environment(workdir)}
        return ServerSpec(name, command, env, body="raw", path=f"/predictions/{torchserve_setup.MODEL_NAME}")
    if name == "bentoml":
        command = [str(VENVS["bentoml"].path / "bin" / "bentoml"), "serve", "benchmarks.bentoml_service:MnistService",
                   *host]
        return ServerSpec(
            name, command, {"PYTHONPATH": str(REPO), "MODEL_PATH": str(model), "BENTOML_DO_NOT_TRACK": "true"}
        )
    raise ValueError(f"unknown server {name!r}: pick one of {SERVERS}")


def _answers(url: str, payload: Payload) -> bool:
    request = urllib.request.Request(
        url + payload.path, data=payload.body, headers={"Content-Type": payload.content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextmanager
def running(spec: ServerSpec, url: str, payload: Payload, log_path: Path, timeout_s: float = 180) -> Iterator[int]:
    """Start the server, wait until it answers a real prediction, yield its pid, stop it."""
    with log_path.open("wb") as log:
        # A session of its own, so that stopping it also stops its worker processes.
        proc = subprocess.Popen(
            spec.command, cwd=REPO, env={**os.environ, **spec.env}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout_s
            while not _answers(url, payload):
                if proc.poll() is not None:
                    raise RuntimeError(f"{spec.name} exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{spec.name} did not answer within {timeout_s:g}s; see {log_path}")
                time.sleep(0.5)
            yield proc.pid
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the session (SIGKILL after 20 s), wait up to 10 s for the rest of the server, SIGKILL what is left.

    BentoML's workers run in sessions of their own, so the process tree is listed first. TorchServe's
    launcher exits at once and leaves Java to stop its workers: wait, so the next server starts alone.
    """
    pids = server_pids(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # The leader has been reaped: its pid is not ours any more. Its session's members still carry its id.
    rest = (set(pids) | set(server_pids(proc.pid))) - {proc.pid}
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in rest) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in rest:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
