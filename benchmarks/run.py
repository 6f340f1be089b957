"""Our server against a plain FastAPI baseline and LitServe, on this machine, in one run.

    .venv/bin/python -m benchmarks.run [--quick] [--rounds 2] [--duration 10]

Each round starts each server in turn (A B C A B C), waits until it answers, drives multipart PNG
uploads of the same digit with stress_testing.py and hey at each concurrency, and stops it.
Numbers are medians over rounds; ratios compare servers measured in the same run. Writes
benchmarks/results.md and the raw numbers to benchmarks/out/run.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
from pathlib import Path

import torch

from benchmarks.load import TOOLS, Measurement, run_hey, run_stress
from benchmarks.servers import (
    LITSERVE_VENV,
    REPO,
    SERVERS,
    ensure_hey,
    ensure_litserve_venv,
    running,
    server_spec,
)
from mnist_service.tools.images import png_bytes, test_digit, user_digit
from mnist_service.tools.stress import Payload, build_payload

OUT = REPO / "benchmarks" / "out"
SERVERS_TEXT = (
    "Servers: **ours** with its defaults (2 workers, micro-batching, PNGs decoded with libspng); "
    "**baseline**, `benchmarks/baseline_server.py`: async FastAPI with an UploadFile, PIL decoding as the "
    "earlier projects did, the service's own normalisation, one forward pass per request on the event loop; "
    "**litserve**: LitServe with batching on and exactly the service's preprocessing (libspng included)."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digit_image(path: Path | None) -> Path:
    """The image every request uploads: the given file, or test digit 0 drawn black on white."""
    if path is not None:
        return path
    out = OUT / "digit.png"
    out.write_bytes(png_bytes(user_digit(test_digit(0)[0])))
    return out


def measure(tool: str, url: str, image: Path, payload: Payload, concurrency: int, duration_s: float) -> Measurement:
    if tool == "stress":
        return run_stress(url, image, concurrency, duration_s, OUT / "stress.json")
    return run_hey(url, payload, OUT / "body.bin", concurrency, duration_s)


def run_server(
    name: str, spec_args: dict, image: Path, payload: Payload, tools: list[str], concurrencies: list[int],
    duration_s: float, log_name: str,
) -> dict[tuple[str, int], Measurement]:
    """Start one server, warm it up, measure every tool x concurrency point, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    spec = server_spec(name, spec_args["model"], port, **spec_args.get("extra", {}))
    results = {}
    with running(spec, url, payload, OUT / log_name):
        run_hey(url, payload, OUT / "body.bin", 32, min(2.0, duration_s))  # warm-up, not recorded
        for tool in tools:
            for c in concurrencies:
                results[tool, c] = m = measure(tool, url, image, payload, c, duration_s)
                print(f"  {name:<9}{tool:<7}c={c:<4}{m.rps:>8.0f} req/s  p50 {m.p50_ms:7.2f}  "
                      f"p99 {m.p99_ms:7.2f} ms  errors {m.errors}", flush=True)
    return results


def median_of(rounds: list[Measurement]) -> Measurement:
    return Measurement(
        requests=sum(m.requests for m in rounds),
        errors=sum(m.errors for m in rounds),
        rps=statistics.median(m.rps for m in rounds),
        p50_ms=statistics.median(m.p50_ms for m in rounds),
        p99_ms=statistics.median(m.p99_ms for m in rounds),
    )


def machine() -> list[str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    litserve = subprocess.run(
        [LITSERVE_VENV / "bin" / "python", "-c", "import litserve; print(litserve.__version__)"],
        capture_output=True, text=True,
    ).stdout.strip()
    hey = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "hey"], capture_output=True, text=True).stdout
    return [
        f"- date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu}, {os.cpu_count()} cores (nproc), load average at start {os.getloadavg()[0]:.2f}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, LitServe {litserve}, hey {hey}",
    ]


def table(agg: dict[tuple[str, str, int], Measurement], servers: list[str], tools: list[str], cs: list[int]) -> str:
    lines = [
        "| server | tool | concurrency | req/s | p50 ms | p99 ms | errors / requests |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for tool in tools:
        for c in cs:
            for s in servers:
                m = agg[s, tool, c]
                lines.append(f"| {s} | {tool} | {c} | {m.rps:.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | "
                             f"{m.errors} / {m.requests} |")
    return "\n".join(lines)


def ratios(agg: dict[tuple[str, str, int], Measurement], servers: list[str], tools: list[str], cs: list[int]) -> str:
    others = [s for s in servers if s != "ours"]
    head = "| tool | concurrency | " + " | ".join(f"req/s ours/{o} | p99 ours/{o}" for o in others) + " |"
    lines = [head, "|---|--:|" + "--:|--:|" * len(others)]
    for tool in tools:
        for c in cs:
            ours = agg["ours", tool, c]
            cells = [f"{ours.rps / agg[o, tool, c].rps:.2f}x | {ours.p99_ms / agg[o, tool, c].p99_ms:.2f}"
                     for o in others]
            lines.append(f"| {tool} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"))
    parser.add_argument("--image", type=Path, help="image to upload (default: test digit 0, black on white)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per tool x concurrency point")
    parser.add_argument("--litserve-threads", type=int, default=1, help="torch threads in LitServe's worker")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s points")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2.0

    OUT.mkdir(parents=True, exist_ok=True)
    ensure_hey()
    if "litserve" in args.servers:
        ensure_litserve_venv()
    image = digit_image(args.image)
    payload = build_payload(image.read_bytes(), "multipart")
    header = machine()
    spec_args = {"model": args.model, "extra": {}}

    raw: dict[tuple[str, str, int], list[Measurement]] = {}
    for r in range(args.rounds):
        for name in args.servers:
            print(f"round {r + 1}/{args.rounds}: {name}", flush=True)
            extra = {"litserve_threads": args.litserve_threads} if name == "litserve" else {}
            results = run_server(
                name, {**spec_args, "extra": extra}, image, payload, args.tools, args.concurrency, args.duration,
                f"{name}-{r + 1}.log",
            )
            for (tool, c), m in results.items():
                raw.setdefault((name, tool, c), []).append(m)

    agg = {key: median_of(ms) for key, ms in raw.items()}
    rows = [
        {"server": s, "tool": t, "concurrency": c, "rounds": [m.as_dict() for m in ms]} for (s, t, c), ms in raw.items()
    ]
    (OUT / "run.json").write_text(json.dumps(rows, indent=2) + "\n")
    results_table = table(agg, args.servers, args.tools, args.concurrency)
    ratio_table = ratios(agg, args.servers, args.tools, args.concurrency) if "ours" in args.servers else ""
    print(results_table, ratio_table, sep="\n\n")
    command = "python -m benchmarks.run " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k not in ("quick", "results", "image") and v is not None
    )
    args.results.write_text("\n\n".join([
        "# Serving benchmark: ours vs a plain FastAPI baseline vs LitServe",
        "\n".join(header),
        f"Command: `{command}`. Multipart PNG uploads of {image.name} ({len(image.read_bytes())} bytes) on "
        f"loopback; {args.rounds} round(s) of {args.duration:g} s per point, servers alternated; "
        "medians over rounds, errors and requests summed. The load generator runs on the same 2 cores.",
        SERVERS_TEXT,
        "## Results", results_table,
        "## Ratios (ours / other: req/s higher is better, p99 lower is better)", ratio_table,
    ]) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
