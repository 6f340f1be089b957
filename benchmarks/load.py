"""The two load generators, the service's own (stress) and hey, reduced to one Measurement each."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.servers import REPO
from mnist_service.tools.stress import Payload

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

    def as_dict(self) -> dict[str, float | None]:
        """The fields, NaN as None so that run.json stays valid JSON."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}


def run_stress(url: str, payload: Payload, body_file: Path, concurrency: int, duration_s: float,
               out_json: Path) -> Measurement:
    """The service's load generator (what stress_testing.py runs) for `duration_s` seconds, posting `payload`."""
    body_file.write_bytes(payload.body)
    command = [
        sys.executable, "-m", "benchmarks.stress_client", "--url", url, "--path", payload.path,
        "--body", str(body_file), "--content-type", payload.content_type, "--concurrency", str(concurrency),
        "--duration", str(duration_s), "--json", str(out_json),
    ]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=duration_s + 120)
    s = json.loads(out_json.read_text())["concurrent"]
    lat = s["latency_ms"]
    return Measurement(s["requests"], s["errors"], s["throughput_rps"], lat["p50"], lat["p99"])


def run_hey(url: str, payload: Payload, body_file: Path, concurrency: int, duration_s: float) -> Measurement:
    """hey -z for `duration_s` seconds, posting `payload`."""
    body_file.write_bytes(payload.body)
    command = [
        "hey", "-z", f"{duration_s:g}s", "-c", str(concurrency), "-t", "20", "-m", "POST",
        "-D", str(body_file), "-T", payload.content_type, url + payload.path,
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=duration_s + 120).stdout
    return parse_hey(out)


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
