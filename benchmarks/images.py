"""The serving images side by side: size, cold start, RSS per worker and idle CPU (docs/deploy.md's table).

    .venv/bin/python -m benchmarks.images mnist-service:1.0.0 mnist-service:1.0.0-slim [--rounds 3] [--idle-s 30]

Runs each image the way scripts/container_smoke.sh does (podman with runc, host network, read-only root,
no capabilities, uid 10001, the baked-in repository), the images alternated round by round so that a
shared machine's load falls on both alike. Per round and image:
- cold start: from `podman run` to the first 200 of POST /predict that names the right digit (MNIST test
  image 0 as a user draws it), polled every 20 ms; the table gives the median of the rounds;
- RSS (VmRSS, read from the host's /proc, in MiB) of each worker and of the supervisor after 200
  predictions and 5 s without requests;
- idle CPU of each worker: utime + stime over --idle-s seconds without requests, in % of one core.
Needs root (podman, and /proc of the containers' processes). Prints a Markdown table and writes
benchmarks/out/images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.server_cpu import cpu_seconds
from benchmarks.servers import free_ports
from benchmarks.soak import rss_mb
from mnist_service.process.server import worker_pids
from mnist_service.tools.images import png_bytes, test_digit, user_digit

OUT = Path("benchmarks/out/images.json")
RUN_FLAGS = [
    "--network=host", "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
    "--cap-drop=ALL", "--security-opt=no-new-privileges",
]  # fmt: skip


def podman(*args: str) -> str:
    """podman with runc (the machine's crun fails), as scripts/container_smoke.sh runs it; stdout."""
    runtime = os.environ.get("PODMAN_RUNTIME", "/usr/sbin/runc")
    cmd = ["podman", *(["--runtime", runtime] if runtime else []), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def first_answer(url: str, body: bytes, label: int, timeout_s: float = 120) -> None:
    """Wait until POST /predict answers 200 with `label`; RuntimeError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, files={"file": ("digit.png", body, "image/png")}, timeout=5)
            if r.status_code == 200 and r.json()["prediction"] == label:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"no correct answer from {url} within {timeout_s} s")


def measure(image: str, body: bytes, label: int, idle_s: float) -> dict[str, Any]:
    """One cold start of `image`, then its memory and idle CPU."""
    port, grpc_port = free_ports(2)
    name = f"mnist-images-{os.getpid()}-{port}"
    url = f"http://127.0.0.1:{port}/predict"
    start = time.monotonic()
    podman("run", "-d", "--name", name, *RUN_FLAGS, "-e", f"PORT={port}", "-e", f"GRPC_PORT={grpc_port}", image)
    try:
        first_answer(url, body, label)
        cold_start_s = time.monotonic() - start
        with httpx.Client() as client:
            for _ in range(200):
                client.post(url, files={"file": ("digit.png", body, "image/png")}).raise_for_status()
        time.sleep(5)
        supervisor = int(podman("inspect", "--format", "{{.State.Pid}}", name))
        workers = worker_pids(supervisor)
        rss = {pid: rss_mb(pid) for pid in [supervisor, *workers]}
        before = {pid: cpu_seconds(pid) for pid in workers}
        time.sleep(idle_s)
        idle = [100 * (cpu_seconds(pid) - before[pid]) / idle_s for pid in workers]
    finally:
        podman("rm", "-f", "-t", "0", name)
    return {
        "cold_start_s": cold_start_s,
        "supervisor_rss_mb": rss[supervisor],
        "worker_rss_mb": [rss[pid] for pid in workers],
        "worker_idle_cpu_pct": idle,
    }


def summary(image: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median cold start; per-worker RSS and idle CPU over every round's workers (min-max)."""
    rss = [mb for r in rounds for mb in r["worker_rss_mb"]]
    idle = [pct for r in rounds for pct in r["worker_idle_cpu_pct"]]
    return {
        "image": image,
        "size_mb": int(podman("image", "inspect", "--format", "{{.Size}}", image)) / 1e6,
        "cold_start_s": statistics.median(r["cold_start_s"] for r in rounds),
        "cold_starts_s": [r["cold_start_s"] for r in rounds],
        "worker_rss_mb": (min(rss), max(rss)),
        "supervisor_rss_mb": statistics.median(r["supervisor_rss_mb"] for r in rounds),
        "worker_idle_cpu_pct": (min(idle), max(idle)),
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", help="image names, e.g. mnist-service:1.0.0 mnist-service:1.0.0-slim")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=30.0, help="how long idle CPU is measured")
    args = parser.parse_args()
    if "CONTAINERS_CONF" not in os.environ:
        # Podman's default ulimits can't be set in some sandboxes (as in scripts/container_smoke.sh).
        conf = Path(tempfile.mkdtemp()) / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        os.environ["CONTAINERS_CONF"] = str(conf)
    digit, label = test_digit(0)
    body = png_bytes(user_digit(digit))
    results: dict[str, list[dict[str, Any]]] = {image: [] for image in args.images}
    for n in range(args.rounds):
        for image in args.images if n % 2 == 0 else reversed(args.images):
            results[image].append(measure(image, body, label, args.idle_s))
            print(f"round {n + 1} {image}: {json.dumps(results[image][-1])}", flush=True)
    table = [summary(image, rounds) for image, rounds in results.items()]
    OUT.write_text(json.dumps(table, indent=1))
    print("\n| image | size | cold start (median) | RSS per worker | supervisor RSS | idle CPU per worker |")
    print("|---|---|---|---|---|---|")
    for row in table:
        print(
            f"| `{row['image']}` | {row['size_mb']:.0f} MB | {row['cold_start_s']:.2f} s "
            f"({', '.join(f'{s:.2f}' for s in row['cold_starts_s'])}) "
            f"| {row['worker_rss_mb'][0]:.0f}-{row['worker_rss_mb'][1]:.0f} MiB | {row['supervisor_rss_mb']:.0f} MiB "
            f"| {row['worker_idle_cpu_pct'][0]:.2f}-{row['worker_idle_cpu_pct'][1]:.2f} % |"
        )


if __name__ == "__main__":
    main()
