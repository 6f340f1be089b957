"""Our server against a plain FastAPI baseline, LitServe, TorchServe and BentoML, on this machine, in one run.

    .venv/bin/python -m benchmarks.run [--quick] [--rounds 2] [--duration 10] [--images mnist28 photo400 tensor28]

Each round starts each server in turn (A B C D E A B C D E), waits until it answers, and for each
image drives that server's own request (a multipart upload, or the raw PNG body for TorchServe)
with the service's load generator and hey at each concurrency, then stops it. The input tensor28
(the same digit as a v2 tensor) goes to ours over REST's v2 infer route and to ours-grpc, the same
server through its gRPC door (the service's load generator only: hey speaks no gRPC). Around each
point it reads the CPU time of every process of the server, for CPU per request, and of the load
generator. Numbers are medians over rounds; ratios compare servers measured in the same run. Writes
benchmarks/results.md, the raw numbers to benchmarks/out/run.json and each point as measured to
benchmarks/out/run.log (run-quick.log with --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks import floor
from benchmarks.load import TOOLS, Measurement, run_hey, run_stress, tools_for
from benchmarks.server_cpu import cpu_seconds
from benchmarks.servers import (
    OUT,
    REPO,
    SERVERS,
    VENVS,
    ServerSpec,
    ensure_hey,
    ensure_server,
    free_port,
    running,
    server_spec,
)
from mnist_service.settings import Settings
from mnist_service.tools.images import png_bytes, test_digit, user_digit
from mnist_service.tools.stress import GRPC_CONTENT_TYPE, Payload

log = logging.getLogger("benchmarks.run")

SERVER_TEXT = {
    "ours": "**ours** with its defaults (2 workers, micro-batching, PNGs decoded with libspng, the HTTP hot path "
    "answering POST /predict below ASGI); multipart uploads.",
    "ours-onnx": "**ours-onnx**: ours with `RUNTIME=onnxruntime`, the model's ONNX export on ONNX Runtime (one "
    "intra-op thread per worker, no spinning) instead of TorchScript (docs/runtimes.md); multipart uploads.",
    "ours-fastapi": "**ours-fastapi**: the same server with `HOT_PATH=false`, FastAPI answering every request "
    "(the server before the hot path); multipart uploads.",
    "ours-grpc": "**ours-grpc**: ours (the same defaults; every ours here serves gRPC on a free port, as GRPC_PORT "
    "does by default) sent tensor28 through its gRPC door, `inference.GRPCInferenceService/ModelInfer` with the "
    "tensor in `raw_input_contents`, answered in `raw_output_contents`, by the service's load generator on one "
    "channel (one HTTP/2 connection) per concurrent caller; ours and ours-fastapi get the same tensor over REST "
    "(`POST /v2/models/mnist/infer`, the binary tensor data extension, answered in binary).",
    "baseline": "**baseline**, `benchmarks/baseline_server.py`: async FastAPI with an UploadFile, PIL decoding as "
    "the earlier projects did, the service's own normalisation, one forward pass per request on the event loop; "
    "multipart uploads.",
    "litserve": "**litserve**, `benchmarks/litserve_server.py`: LitServe {litserve} with batching on (up to 32, "
    "2 ms timeout), one worker with 1 torch thread, and exactly the service's preprocessing (libspng included); "
    "multipart uploads.",
    "torchserve": "**torchserve**: TorchServe {torchserve} (Java frontend, Python workers) serving a .mar that "
    "torch-model-archiver builds from the same TorchScript file, handler `benchmarks/torchserve_handler.py` "
    "(the service's preprocessing, one forward pass per batch, 1 torch thread per worker); model config "
    "`minWorkers: 2, maxWorkers: 2, batchSize: 32, maxBatchDelay: 5` (ms), `job_queue_size` = our MAX_QUEUE "
    "({max_queue}), token auth off, system metrics off, log level WARN (its default logging writes ~1.5 KB per "
    "request); a lone request waits out the 5 ms batch delay; the raw PNG as the body of "
    "`POST /predictions/mnist` (`Content-Type: image/png`), its API.",
    "bentoml": "**bentoml**, `benchmarks/bentoml_service.py`: BentoML {bentoml}, `@bentoml.service(workers=2)`, "
    "`@bentoml.api(batchable=True, max_batch_size=32)` (adaptive batching: it holds each batch about as long as "
    "its recent batches waited, queueing included, so after a busy point a lone client waits tens of ms), the "
    "service's preprocessing, 1 torch thread per worker; multipart uploads (field `file`, as ours), each answer a "
    "JSON list of one prediction.",
}


def digit_image(path: Path | None) -> Path:
    """The photo-like image: the given file, or test digit 0 drawn black on white on a 400x300 page."""
    if path is not None:
        return path
    out = OUT / "digit.png"
    out.write_bytes(png_bytes(user_digit(test_digit(0)[0])))
    return out


def mnist_image() -> Path:
    """Test digit 0 as MNIST has it, 28x28 white on black: what most API clients send."""
    out = OUT / "mnist28.png"
    out.write_bytes(png_bytes(Image.fromarray(test_digit(0)[0])))
    return out


def tensor_file() -> Path:
    """Test digit 0's 784 pixels (white on black), the UINT8 [1, 28, 28] tensor a v2 client sends."""
    out = OUT / "digit28.u8"
    out.write_bytes(test_digit(0)[0].astype(np.uint8).tobytes())
    return out


IMAGES = {
    "mnist28": ("a 28x28 MNIST PNG (test digit 0, white on black, as most API clients send)", mnist_image),
    "photo400": ("a 400x300 photo-like PNG (the same digit drawn black on white, larger, off-centre)",
                 lambda: digit_image(None)),
    "tensor28": ("test digit 0 as a UINT8 [1, 28, 28] v2 tensor, its raw pixels: to ours over REST v2 (binary "
                 "tensor data) and over gRPC (raw_input_contents); no peer takes it", tensor_file),
}
TENSORS = {"tensor28"}  # the inputs that are tensors, not image files


def request_for(spec: ServerSpec, image: str, data: bytes) -> Payload | None:
    """What `spec` is sent for one input, None if it is not measured on it (ours-grpc takes only tensors)."""
    if image in TENSORS:
        return spec.tensor_payload(np.frombuffer(data, np.uint8).reshape(28, 28))
    return None if spec.grpc_port is not None else spec.payload(data)


def measure(tool: str, url: str, payload: Payload, concurrency: int, duration_s: float) -> Measurement:
    if tool == "stress":
        return run_stress(url, payload, OUT / "request.bin", concurrency, duration_s, OUT / "stress.json")
    return run_hey(url, payload, OUT / "request.bin", concurrency, duration_s)


def warm_up(url: str, payload: Payload, duration_s: float, timeout_s: float = 60) -> None:
    """Load not recorded; over gRPC, repeated until every call succeeds: the HTTP door answers first."""
    if payload.content_type != GRPC_CONTENT_TYPE:
        run_hey(url, payload, OUT / "request.bin", 32, duration_s)
        return
    deadline = time.monotonic() + timeout_s
    while (m := measure("stress", url, payload, 32, duration_s)).errors or not m.requests:
        if time.monotonic() > deadline:
            raise RuntimeError(f"gRPC at {url} still failing after {timeout_s:g}s: {m}")


def run_server(
    name: str, spec_args: dict, images: dict[str, Path], tools: list[str], concurrencies: list[int],
    duration_s: float, log_name: str,
) -> dict[tuple[str, str, int], Measurement]:
    """Start one server, warm it up, measure every image x tool x concurrency point, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = server_spec(name, spec_args["model"], port, **spec_args.get("extra", {}))
    payloads = {image: request_for(spec, image, path.read_bytes()) for image, path in images.items()}
    # gRPC goes to host:port, everything else to the HTTP URL.
    target = f"127.0.0.1:{spec.grpc_port}" if spec.grpc_port is not None else url
    results = {}
    with running(spec, url, spec.payload(mnist_image().read_bytes()), OUT / log_name) as pid:
        for payload in filter(None, payloads.values()):
            warm_up(target if payload.content_type == GRPC_CONTENT_TYPE else url, payload, min(2.0, duration_s))
        for image, payload in payloads.items():
            if payload is None:
                continue
            where = target if payload.content_type == GRPC_CONTENT_TYPE else url
            for tool in (t for t in tools if t in tools_for(payload)):
                for c in concurrencies:
                    before = cpu_seconds(pid)
                    m = measure(tool, where, payload, c, duration_s)
                    answered = m.requests - m.errors
                    cpu_ms = (cpu_seconds(pid) - before) * 1000 / answered if answered else float("nan")
                    results[image, tool, c] = m = dataclasses.replace(m, cpu_ms=cpu_ms)
                    log.info(f"  {name:<13}{image:<9}{tool:<7}c={c:<4}{m.rps:>8.0f} req/s  p50 {m.p50_ms:7.2f}  "
                             f"p99 {m.p99_ms:7.2f} ms  cpu {m.cpu_ms:6.2f} ms/req  client cpu "
                             f"{m.client_cpu_ms:6.2f} ms/req  errors {m.errors}")
    return results


def median_of(rounds: list[Measurement]) -> Measurement:
    return Measurement(
        requests=sum(m.requests for m in rounds),
        errors=sum(m.errors for m in rounds),
        rps=statistics.median(m.rps for m in rounds),
        p50_ms=statistics.median(m.p50_ms for m in rounds),
        p99_ms=statistics.median(m.p99_ms for m in rounds),
        cpu_ms=statistics.median(m.cpu_ms for m in rounds),
        client_cpu_ms=statistics.median(m.client_cpu_ms for m in rounds),
    )


def peer_versions() -> dict[str, str]:
    """The installed version of each peer whose venv exists, '-' for the others."""
    versions = {}
    for name, venv in VENVS.items():
        versions[name] = "-"
        if venv.python.exists():
            code = f"from importlib.metadata import version; print(version({name!r}))"
            found = subprocess.run([venv.python, "-c", code], capture_output=True, text=True)
            versions[name] = found.stdout.strip() if found.returncode == 0 else "-"
    return versions


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    peers = peer_versions()
    hey = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "hey"], capture_output=True, text=True).stdout
    java = ["-"]
    if shutil.which("java"):
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    return [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}, {os.cpu_count()} cores (nproc), load average at start {os.getloadavg()[0]:.2f}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, LitServe {peers['litserve']}, "
        f"TorchServe {peers['torchserve']}, BentoML {peers['bentoml']}, hey {hey}",
        f"- Java (TorchServe's frontend): {java[0]}",
    ]


def _num(x: float, suffix: str = "") -> str:
    """A table cell; hey gives no p99 under 100 requests, which shows as n/a."""
    return "n/a" if math.isnan(x) else f"{x:.2f}{suffix}"


def table(agg: dict[tuple[str, str, str, int], Measurement], image: str, servers: list[str], tools: list[str],
          cs: list[int]) -> str:
    lines = [
        "| server | tool | concurrency | req/s | p50 ms | p99 ms | server CPU ms / request | "
        "load generator CPU ms / request | errors / requests |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for tool in tools:
        for c in cs:
            for s in servers:
                if (m := agg.get((s, image, tool, c))) is None:  # not measured: a server's input or tool
                    continue
                lines.append(f"| {s} | {tool} | {c} | {m.rps:.0f} | {_num(m.p50_ms)} | {_num(m.p99_ms)} | "
                             f"{_num(m.cpu_ms)} | {_num(m.client_cpu_ms)} | {m.errors} / {m.requests} |")
    return "\n".join(lines)


def ratios(agg: dict[tuple[str, str, str, int], Measurement], image: str, servers: list[str], tools: list[str],
           cs: list[int]) -> str:
    lines = [
        "| other | tool | concurrency | req/s ours/other | p99 ours/other | CPU per request ours/other |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for other in (s for s in servers if s != "ours"):
        for tool in tools:
            for c in cs:
                if ("ours", image, tool, c) not in agg or (other, image, tool, c) not in agg:
                    continue
                ours, them = agg["ours", image, tool, c], agg[other, image, tool, c]
                lines.append(f"| {other} | {tool} | {c} | {_num(ours.rps / them.rps, 'x')} | "
                             f"{_num(ours.p99_ms / them.p99_ms)} | {_num(ours.cpu_ms / them.cpu_ms)} |")
    return "\n".join(lines)


def over_floor(agg: dict[tuple[str, str, str, int], Measurement], image: str, servers: list[str], tools: list[str],
               cs: list[int], floor_ms: float) -> str:
    lines = ["| server | tool | concurrency | CPU ms / request | over the floor |", "|---|---|--:|--:|--:|"]
    for s in servers:
        for tool in tools:
            for c in cs:
                if (m := agg.get((s, image, tool, c))) is None:
                    continue
                lines.append(f"| {s} | {tool} | {c} | {_num(m.cpu_ms)} | {_num(m.cpu_ms / floor_ms, 'x')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"))
    parser.add_argument("--images", nargs="+", choices=IMAGES, default=list(IMAGES))
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per image x tool x concurrency point")
    parser.add_argument("--litserve-threads", type=int, default=1, help="torch threads in LitServe's worker")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s points")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results.md")
    parser.add_argument("--log", type=Path, help="each point as measured (default benchmarks/out/run.log, "
                        "run-quick.log with --quick); also on stdout")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2.0

    OUT.mkdir(parents=True, exist_ok=True)
    log_file = args.log or OUT / ("run-quick.log" if args.quick else "run.log")
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(log_file, mode="w")])
    log.info(f"benchmarks.run {' '.join(sys.argv[1:])}: load average {os.getloadavg()[0]:.2f}")
    ensure_hey()
    for name in args.servers:
        ensure_server(name)
    images = {name: IMAGES[name][1]() for name in args.images}
    header = machine()
    # What a request costs without HTTP (decode, preprocess, a forward pass per batch of 32), measured
    # here so that each server's CPU per request reads as a multiple of it from the same run.
    floors = {name: floor.measure(args.model, path.read_bytes())
              for name, path in images.items() if name not in TENSORS}
    for name in TENSORS & set(images):  # nothing to decode: the forward pass of the same digit is the floor
        floors[name] = floor.Floor(0.0, floor.measure(args.model, mnist_image().read_bytes()).forward_us)
    for name, f in floors.items():
        log.info(f"floor {name}: preprocess {f.preprocess_us:.1f} + forward {f.forward_us:.1f} us/image")

    raw: dict[tuple[str, str, str, int], list[Measurement]] = {}
    for r in range(args.rounds):
        for name in args.servers:
            log.info(f"round {r + 1}/{args.rounds}: {name}")
            extra = {"litserve_threads": args.litserve_threads} if name == "litserve" else {}
            results = run_server(
                name, {"model": args.model, "extra": extra}, images, args.tools, args.concurrency, args.duration,
                f"{name}-{r + 1}.log",
            )
            for (image, tool, c), m in results.items():
                raw.setdefault((name, image, tool, c), []).append(m)

    agg = {key: median_of(ms) for key, ms in raw.items()}
    rows = [
        {"server": s, "image": i, "tool": t, "concurrency": c, "rounds": [m.as_dict() for m in ms]}
        for (s, i, t, c), ms in raw.items()
    ]
    (OUT / "run.json").write_text(json.dumps(rows, indent=2) + "\n")
    command = "python -m benchmarks.run " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("quick", "results") and v is not None
    )
    sections = []
    for image in args.images:
        size = len(images[image].read_bytes())
        sections += [f"## {image}: {IMAGES[image][0]}, {size} bytes", table(agg, image, args.servers, args.tools,
                                                                            args.concurrency)]
        f = floors[image]
        sections += [
            f"### {image}: server CPU per request over the irreducible work",
            f"`benchmarks/floor.py` in this run, one thread, no HTTP: decode + preprocess {f.preprocess_us:.1f} us "
            f"(none for a tensor), "
            f"forward pass {f.forward_us:.1f} us per image at batch 32, **{f.total_us:.1f} us** in all.",
            over_floor(agg, image, args.servers, args.tools, args.concurrency, f.total_us / 1000),
        ]
        if "ours" in args.servers and len(args.servers) > 1:
            sections += [f"### {image}: ours / other (req/s: higher is better; p99 and CPU per request: lower is "
                         "better)", ratios(agg, image, args.servers, args.tools, args.concurrency)]
    log.info("\n\n".join(sections))
    versions = {**peer_versions(), "max_queue": Settings().max_queue}
    args.results.write_text("\n\n".join([
        "# Serving benchmark: ours (hot path on and off, REST and gRPC) vs a plain FastAPI baseline, LitServe, "
        "TorchServe and BentoML",
        "\n".join(header),
        f"Command: `{command}`. On loopback; {args.rounds} round(s) of {args.duration:g} s per point, servers "
        "alternated; medians over rounds, errors and requests summed. The load generators run on the same 2 "
        "cores. **stress** is the service's own load generator (`mnist_service/tools/stress.py`, what "
        "stress_testing.py runs), started by `benchmarks/stress_client.py` so that it posts each server's own "
        "request; **hey** posts the same bytes. **Server CPU ms / request**: user + system CPU of every process "
        "of the server (its session and descendants, from /proc; reaped children through cutime/cstime) during "
        "the point, over the requests answered 200. **Load generator CPU ms / request**: user + system CPU of the "
        "tool's process during the point, over the requests it sent (on the same cores, the tool's CPU is CPU "
        "the server did not get). Requests: ours, baseline, LitServe and BentoML get a "
        "multipart upload (what `curl -F` sends, the historic numbers); TorchServe gets the raw PNG body, as its "
        "API takes it; tensor28 is the same digit as a v2 tensor, to ours over REST and over gRPC (ours-grpc).",
        "Servers: " + " ".join(SERVER_TEXT[s].format(**versions) for s in args.servers),
        *sections,
    ]) + "\n")
    log.info(f"wrote {args.results} and {log_file}")


if __name__ == "__main__":
    main()
