"""Our server under each runtime, on a flat model with its .onnx: start to first correct answer, RSS per
worker after a warm-up, and CPU burnt while idle. The runtimes are alternated over rounds.

    .venv/bin/python -m benchmarks.runtime_idle --model models/mnist_cnn.pt [--idle-s 30] [--rounds 2]

Idle CPU is utime + stime of each worker (benchmarks/server_cpu.py) over --idle-s seconds with no request
after 200 answered ones (what a spinning thread pool would burn shows up here), in CPU milliseconds per
second. RSS is VmRSS from /proc/<pid>/status at the start of that window. The server is ours, as
`model_inference.py` starts it (WORKERS=2, gRPC off); a worker is a child of the supervisor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from benchmarks.server_cpu import cpu_seconds
from benchmarks.servers import REPO, free_port
from benchmarks.soak import rss_mb
from mnist_service.data import load_split
from mnist_service.inference.runtime import RUNTIMES
from mnist_service.process.server import worker_pids
from mnist_service.tools.images import png_bytes


def _workers(supervisor: int) -> list[int]:
    """The supervisor's workers that have loaded a runtime (onnxruntime or libtorch mapped)."""
    return [pid for pid in worker_pids(supervisor) if "onnxruntime" in _maps(pid) or "libtorch" in _maps(pid)]


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def measure(runtime: str, model: Path, idle_s: float, digit: bytes, label: int) -> dict[str, float]:
    """One server's numbers: cold start, RSS and idle CPU per worker (the mean of its workers)."""
    port = free_port()
    env = {**os.environ, "RUNTIME": runtime, "WORKERS": "2", "GRPC_PORT": "0", "LOG_LEVEL": "warning"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "model_inference.py", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            files = {"file": ("d.png", digit, "image/png")}
            while True:
                assert proc.poll() is None, f"the server under {runtime} exited with {proc.returncode}"
                try:
                    if http.post("/predict", files=files).json()["prediction"] == label:
                        break
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                time.sleep(0.02)
            cold_start = time.perf_counter() - started
            deadline = time.monotonic() + 60
            while len(workers := _workers(proc.pid)) < 2:
                assert time.monotonic() < deadline, "the second worker never loaded a runtime"
                time.sleep(0.1)
            for _ in range(200):  # both workers answer some: the supervisor spreads connections
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as one:
                    one.post("/predict", files=files)
        time.sleep(2)  # let whatever a request left behind settle
        rss = [rss_mb(pid) for pid in workers]
        before = [cpu_seconds(pid) for pid in workers]
        time.sleep(idle_s)
        idle = [(cpu_seconds(pid) - b) / idle_s * 1000 for pid, b in zip(workers, before, strict=True)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"cold_start_s": cold_start, "rss_mb": statistics.mean(rss), "idle_cpu_ms_per_s": statistics.mean(idle)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"), help="a flat model with its .onnx")
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    test = load_split(REPO / "data" / "mnist", "test")
    digit, label = png_bytes(Image.fromarray(test.images[0])), int(test.labels[0])
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in RUNTIMES}
    for _ in range(args.rounds):
        for name in RUNTIMES:
            rows[name].append(measure(name, args.model.resolve(), args.idle_s, digit, label))
    print(f"{args.rounds} rounds, runtimes alternated; idle window {args.idle_s:g} s; per worker, mean of 2 workers")
    print(f"{'runtime':<14}{'cold start s':>14}{'RSS MB':>10}{'idle CPU ms/s':>16}")
    for name, runs in rows.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        print(f"{name:<14}{median['cold_start_s']:>14.2f}{median['rss_mb']:>10.0f}{median['idle_cpu_ms_per_s']:>16.2f}")


if __name__ == "__main__":
    main()
