"""The two load generators, the service's own (stress) and hey, reduced to one Measurement each."""

from __future__ import annotations

import json
import math
import re
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.servers import REPO
from mnist_service.tools.stress import GRPC_CONTENT_TYPE, Payload

TOOLS = ("stress", "hey")


@dataclass(frozen=True)
class Measurement:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    # Server CPU (user + system, every process of the server) per answered request; NaN when not measured.
    cpu_ms: float = math.nan
    # The load generator's own CPU per request sent: on the same cores, it competes with the server.
    client_cpu_ms: float = math.nan

    def as_dict(self) -> dict[str, float | None]:
        """The fields, NaN as None so that run.json stays valid JSON."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def tools_for(payload: Payload) -> tuple[str, ...]:
    """The tools that can send `payload`: hey speaks HTTP/1.1 only."""
    return ("stress",) if payload.content_type == GRPC_CONTENT_TYPE else TOOLS


def _client_cpu_ms(run: Callable[[], Measurement]) -> Measurement:
    """`run()`'s measurement with the CPU of the tool it ran (a child, waited for) per request sent; hey's
    start-up is a few ms, the stress client measures its own without Python's start-up."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return replace(m, client_cpu_ms=seconds * 1000 / m.requests if m.requests else math.nan)


def run_stress(url: str, payload: Payload, body_file: Path, concurrency: int, duration_s: float,
               out_json: Path) -> Measurement:
    """The service's load generator (what stress_testing.py runs) for `duration_s` seconds, sending `payload`
    (over gRPC for a gRPC payload, `url` then host:port)."""
    body_file.write_bytes(payload.body)
    command = [
        sys.executable, "-m", "benchmarks.stress_client", "--url", url, "--path", payload.path,
        "--body", str(body_file), "--content-type", payload.content_type, "--concurrency", str(concurrency),
        "--duration", str(duration_s), "--json", str(out_json),
        *(f"--header={name}: {value}" for name, value in payload.headers),
    ]

    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=duration_s + 120)
    report = json.loads(out_json.read_text())
    s, lat = report["concurrent"], report["concurrent"]["latency_ms"]
    client_ms = report["client_cpu_s"] * 1000 / s["requests"] if s["requests"] else math.nan
    return Measurement(s["requests"], s["errors"], s["throughput_rps"], lat["p50"], lat["p99"], client_cpu_ms=client_ms)


def run_hey(url: str, payload: Payload, body_file: Path, concurrency: int, duration_s: float) -> Measurement:
    """hey -z for `duration_s` seconds, posting `payload`."""
    body_file.write_bytes(payload.body)
    command = [
        "hey", "-z", f"{duration_s:g}s", "-c", str(concurrency), "-t", "20", "-m", "POST",
        "-D", str(body_file), "-T", payload.content_type, *(f"-H={n}: {v}" for n, v in payload.headers),
        url + payload.path,
    ]
    return _client_cpu_ms(lambda: parse_hey(
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=duration_s + 120).stdout
    ))


def parse_hey(out: str) -> Measurement:
    """The numbers from hey's text summary. Requests cut off by the end of -z are not errors."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {int(p): float(s) * 1000 for p, s in re.findall(r"(\d+)%+ in ([\d.]+) secs", out)}
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    transport_errors = sum(
        int(n) for n, text in re.findall(r"\[(\d+)\]\s+(.*)", out.split("Error distribution:")[-1])
        if "Error distribution:" in out and "context deadline exceeded" not in text and "canceled" not in text
    )
    ok = statuses.get(200, 0)
    errors = sum(statuses.values()) - ok + transport_errors
    return Measurement(ok + errors, errors, rps, latency.get(50, float("nan")), latency.get(99, float("nan")))
