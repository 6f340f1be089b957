"""The three servers under test: how to install, start, wait for and stop each one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from mnist_service.tools.stress import Payload

REPO = Path(__file__).resolve().parent.parent
LITSERVE_VENV = REPO / ".venv-litserve"
# What LitServe's venv shares with the service (its preprocessing imports these), at the
# service's pins; torch in the same pip command, so pip never swaps in another (CUDA) build.
_SHARED = ("torch", "pillow", "numpy", "pyspng", "python-multipart")
LITSERVE_PINS = (
    "litserve==0.2.19",
    *(
        line.strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.split("==")[0].strip().lower() in _SHARED
    ),
)
SERVERS = ("ours", "baseline", "litserve")


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)


def ensure_hey() -> None:
    """Install Debian's hey if it is missing."""
    if shutil.which("hey"):
        return
    if subprocess.run(["apt-get", "install", "-y", "hey"], capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "hey"], check=True, capture_output=True)


def ensure_litserve_venv() -> Path:
    """Create .venv-litserve with the pinned LitServe and the service's torch; return its python."""
    python = LITSERVE_VENV / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import litserve, multipart, pyspng"]).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", LITSERVE_VENV], check=True)
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *LITSERVE_PINS], check=True)
    return python


def server_spec(
    name: str, model: Path, port: int, *, env: dict[str, str] | None = None, litserve_threads: int = 1
) -> ServerSpec:
    """The command line of one server, listening on 127.0.0.1:port."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if name == "ours":
        # No drain window: the benchmark stops the server only when it is idle.
        return ServerSpec(
            name,
            [sys.executable, "model_inference.py", "--model", str(model), *host],
            {"SHUTDOWN_DRAIN_SECONDS": "0", **(env or {})},
        )
    if name == "baseline":
        return ServerSpec(
            name, [sys.executable, "-m", "uvicorn", "benchmarks.baseline_server:app", *host], {"MODEL_PATH": str(model)}
        )
    if name == "litserve":
        command = [
            str(LITSERVE_VENV / "bin" / "python"), "benchmarks/litserve_server.py", "--model", str(model), *host,
            "--threads", str(litserve_threads),
        ]
        return ServerSpec(name, command, {"PYTHONPATH": str(REPO)})
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
        # A session of its own, so that stopping it also stops LitServe's worker processes.
        proc = subprocess.Popen(
            spec.command, cwd=REPO, env={**os.environ, **spec.env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
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
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            # The leader is gone; make sure its worker processes are too.
            os.killpg(proc.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
        return
