"""Where our server spends its CPU under load: py-spy samples, grouped by thread and by stage.

    .venv/bin/python -m benchmarks.profile_server [--concurrency 32] [--duration 15]

Starts our server, loads it with hey (multipart PNG uploads), records it with py-spy twice (every
active thread, then only the thread holding the GIL), and prints the share of samples per stage.
Needs py-spy in the venv (`pip install py-spy`); the flame graphs land in benchmarks/out/.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.run import OUT, digit_image
from benchmarks.servers import ensure_hey, free_port, running, server_spec
from mnist_service.process.server import worker_pids
from mnist_service.tools.stress import build_payload

# First match wins, checked from the leaf frame up: the stage a sample is spent in.
STAGES = (
    ("torch forward", ("torch/", "forward (mnist_service/inference/predictor.py", "_call_impl")),
    (
        "image decode + preprocess (libspng, PIL, numpy)",
        ("pyspng/", "PIL/", "mnist_service/inference/preprocess.py", "numpy/"),
    ),
    ("multipart parsing", ("multipart/", "formparsers.py", "datastructures.py", "mnist_service/serving/multipart.py")),
    ("logging", ("logging/",)),
    ("metrics", ("prometheus_client/", "mnist_service/metrics.py")),
    ("response encoding (pydantic, json)", ("pydantic", "json/", "encoders.py", "prediction_dicts", "encode_json")),
    ("data plane + batcher", ("mnist_service/serving/dataplane.py", "mnist_service/inference/predictor.py")),
    (
        "HTTP protocol (uvicorn, httptools, the hot path)",
        ("uvicorn/protocols", "httptools", "mnist_service/serving/protocol.py", "mnist_service/serving/hotpath.py",
         "mnist_service/serving/upload_codec.py"),
    ),
    ("routing + middleware (fastapi, starlette)", ("fastapi/", "starlette/", "mnist_service/serving/middleware.py")),
    ("thread handoff (concurrent.futures, threading)", ("concurrent/futures", "threading.py", "queue.py")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop", "run_until_complete")),
)


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other"


def summarise(raw_file: Path) -> tuple[Counter[str], Counter[str], int]:
    """Samples per stage and per thread from py-spy's collapsed ('raw') output."""
    stages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        threads[frames[0].split(": ", 1)[-1]] += n  # "thread (1234): decode_0" -> "decode_0"
        stages[stage_of(frames)] += n
    return stages, threads, sum(stages.values())


def report(title: str, raw_file: Path) -> str:
    stages, threads, total = summarise(raw_file)
    lines = [f"{title}: {total} samples"]
    lines += [f"  {100 * n / total:5.1f}%  {stage}" for stage, n in stages.most_common()]
    lines += ["  by thread:"] + [f"  {100 * n / total:5.1f}%  {t}" for t, n in threads.most_common(8)]
    return "\n".join(lines)


def a_worker(supervisor: int) -> int:
    """The pid of one worker process: the supervisor only accepts connections, workers serve them."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = worker_pids(supervisor)
        if workers:
            return workers[0]
        time.sleep(0.1)
    return supervisor  # WORKERS=1: the server is one process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=int, default=15, help="seconds per py-spy recording")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--image", type=Path, help="image to upload (default: the 400x300 test digit)")
    parser.add_argument("--env", action="append", default=[], help="server env override KEY=VALUE (repeatable)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    OUT.mkdir(parents=True, exist_ok=True)
    ensure_hey()
    image = digit_image(args.image)
    payload = build_payload(image.read_bytes(), "multipart")
    body = OUT / "body.bin"
    body.write_bytes(payload.body)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    sections = []
    env = dict(item.split("=", 1) for item in args.env)
    with running(server_spec("ours", args.model, port, env=env), url, payload, OUT / "profile-server.log") as pid:
        worker = a_worker(pid)
        hey = subprocess.Popen(
            ["hey", "-z", f"{2 * args.duration + 6}s", "-c", str(args.concurrency), "-m", "POST", "-D", str(body),
             "-T", payload.content_type, url + payload.path],
            stdout=subprocess.PIPE, text=True,
        )
        for name, extra in (("all-threads", ["--threads"]), ("gil", ["--threads", "--gil"])):
            raw = OUT / f"profile-{name}.txt"
            record = [py_spy, "record", "--pid", str(worker), "--duration", str(args.duration),
                      "--rate", str(args.rate), "--nonblocking", *extra]
            subprocess.run([*record, "--format", "raw", "-o", str(raw)], check=True, capture_output=True)
            sections.append(report(f"{name} ({' '.join(extra)})", raw))
        hey_out = hey.communicate()[0]
    print("\n\n".join(sections))
    print("\nhey during the recordings:\n" + "\n".join(hey_out.splitlines()[:12]))


if __name__ == "__main__":
    main()
