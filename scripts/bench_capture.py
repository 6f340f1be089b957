"""What capture costs on the request path: req/s and server CPU per request at concurrency 32, with
CAPTURE_SAMPLE=1 (every prediction captured into a SQLite file) against CAPTURE_SAMPLE=0.

    .venv/bin/python scripts/bench_capture.py [--model models/mnist_cnn.pt] [--rounds 3] [--seconds 10]

The same real server (model_inference.py, 2 workers, hot path on) is started once per setting and
round, alternating, and loaded with the service's own load generator (benchmarks/stress_client.py)
posting one 28x28 MNIST PNG; CPU is every server process's user + system time from /proc. Prints a
Markdown table of the medians and the relative cost.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load import run_stress  # noqa: E402
from benchmarks.server_cpu import cpu_seconds  # noqa: E402
from mnist_service.capture.store import CaptureStore  # noqa: E402
from mnist_service.data import load_split  # noqa: E402
from mnist_service.inference.images import png_bytes  # noqa: E402
from mnist_service.tools.stress import build_payload  # noqa: E402


def _measure(model: Path, sample: str, folder: Path, concurrency: int, seconds: float, port: int) -> dict[str, float]:
    database = folder / f"captures-{time.monotonic_ns()}.sqlite3"
    env = {**os.environ, "CAPTURE_SAMPLE": sample, "CAPTURE_DATABASE": str(database), "WORKERS": "2",
           "ACCESS_LOG": "off"}
    proc = subprocess.Popen(
        [sys.executable, "model_inference.py", "--model", str(model), "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(folder / "server.log").open("ab"),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the server did not start: see {folder / 'server.log'}")
            time.sleep(0.2)
        time.sleep(2)  # both workers up
        image = png_bytes(Image.fromarray(load_split(ROOT / "data" / "mnist", "test").images[0]))
        payload = build_payload(image)
        run_stress(url, payload, folder / "body", concurrency, 2, folder / "warm.json")  # warm-up
        time.sleep(1.5)  # the warm-up's captures written
        captured_before = CaptureStore(str(database)).count() if database.exists() else 0
        cpu_before = cpu_seconds(proc.pid)
        result = run_stress(url, payload, folder / "body", concurrency, seconds, folder / "run.json")
        cpu = cpu_seconds(proc.pid) - cpu_before
        time.sleep(1.5)  # the writers' last batch
        captured = (CaptureStore(str(database)).count() if database.exists() else 0) - captured_before
        return {"rps": result.rps, "cpu_ms": 1000 * cpu / max(result.requests, 1), "p99_ms": result.p99_ms,
                "errors": result.errors, "requests": result.requests, "captured": captured}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mnist_cnn.pt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        for round_ in range(args.rounds):
            for sample in ("0", "1") if round_ % 2 == 0 else ("1", "0"):
                run = _measure(args.model, sample, Path(tmp), args.concurrency, args.seconds, args.port)
                runs[sample].append(run)
                print(f"round {round_ + 1} CAPTURE_SAMPLE={sample}: {run}", file=sys.stderr)
    median = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    off, on = median["0"], median["1"]
    print(f"| CAPTURE_SAMPLE | req/s | server CPU ms/request | p99 ms | errors | captured |  (c={args.concurrency}, "
          f"median of {args.rounds} x {args.seconds:g} s)")
    print("|---|---|---|---|---|---|")
    for sample, m in (("0", off), ("1", on)):
        print(f"| {sample} | {m['rps']:.0f} | {m['cpu_ms']:.3f} | {m['p99_ms']:.1f} | {m['errors']:.0f} | "
              f"{m['captured']:.0f} of {m['requests']:.0f} |")
    print(f"cost of capture: req/s {100 * (1 - on['rps'] / off['rps']):+.1f} % lower, "
          f"CPU per request {100 * (on['cpu_ms'] / off['cpu_ms'] - 1):+.1f} %")


if __name__ == "__main__":
    main()
