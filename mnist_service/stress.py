"""Load generator: a sequential phase, then a concurrent one, with latency percentiles.

The request body is encoded once up front, so the client spends its CPU on sending,
not on re-encoding multipart forms: on a shared 2-core box the client competes with the server.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

ENDPOINTS = ("multipart", "raw", "pixels")


@dataclass(frozen=True)
class Payload:
    path: str
    body: bytes
    content_type: str


def build_payload(image: bytes, mode: str = "multipart", pixels: list[int] | None = None) -> Payload:
    """The request to repeat: a multipart upload, a raw image body, or a pixels JSON."""
    if mode == "multipart":
        boundary = uuid.uuid4().hex
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="digit.png"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode() + image + f"\r\n--{boundary}--\r\n".encode()
        return Payload("/predict", body, f"multipart/form-data; boundary={boundary}")
    if mode == "raw":
        return Payload("/predict", image, "image/png")
    if mode == "pixels":
        if pixels is None:
            raise ValueError("pixels mode needs the 784 pixel values")
        return Payload("/predict/pixels", json.dumps({"pixels": pixels}).encode(), "application/json")
    raise ValueError(f"mode must be one of {ENDPOINTS}")


@dataclass
class PhaseResult:
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if not status.startswith("2"))

    def summary(self) -> dict[str, Any]:
        """The JSON shape: requests, errors, throughput_rps, latency_ms {mean, p50, ..., max}."""
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        pct = {f"p{q}": round(float(np.percentile(lat, q)), 3) for q in (50, 90, 95, 99)}
        return {
            "requests": self.requests,
            "errors": self.errors,
            "throughput_rps": round(self.requests / self.seconds, 1) if self.seconds > 0 else 0.0,
            "latency_ms": {"mean": round(float(lat.mean()), 3), **pct, "max": round(float(lat.max()), 3)},
        }


async def _one(client: httpx.AsyncClient, payload: Payload, result: PhaseResult) -> None:
    start = time.perf_counter()
    try:
        response = await client.post(payload.path, content=payload.body, headers={"Content-Type": payload.content_type})
        await response.aread()
        status = str(response.status_code)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    result.latencies_ms.append((time.perf_counter() - start) * 1000)
    result.statuses[status] += 1


async def run_phase(
    url: str,
    payload: Payload,
    *,
    requests: int,
    concurrency: int,
    duration_s: float | None = None,
    timeout_s: float = 30.0,
    progress: bool = True,
    label: str = "",
) -> PhaseResult:
    """Send `requests` requests (or keep going for `duration_s`) with `concurrency` in flight."""
    result = PhaseResult()
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    total = None if duration_s else requests
    bar = tqdm(total=total, desc=label, unit="req", disable=not progress, leave=False)
    sent = 0
    started = time.perf_counter()
    deadline = started + duration_s if duration_s else None

    def more() -> bool:
        nonlocal sent
        if deadline is not None:
            if time.perf_counter() >= deadline:
                return False
        elif sent >= requests:
            return False
        sent += 1
        return True

    async def worker() -> None:
        # One client with one connection per worker: httpx's pool search grows with its size,
        # and with a shared pool of 128 connections the tester, not the server, was the bottleneck.
        async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
            while more():
                await _one(client, payload, result)
                bar.update(1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    bar.close()
    return result


def format_report(name: str, result: PhaseResult) -> str:
    s = result.summary()
    lat = s["latency_ms"]
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses.items()) if not k.startswith("2")) or "none"
    return (
        f"{name}: {s['requests']} requests in {result.seconds:.2f}s, {s['throughput_rps']} req/s, errors {errors}\n"
        f"  latency ms: mean {lat['mean']:.2f}  p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  "
        f"p95 {lat['p95']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}"
    )


async def run(
    url: str,
    payload: Payload,
    *,
    requests: int,
    concurrency: int,
    sequential_requests: int,
    duration_s: float | None = None,
    timeout_s: float = 30.0,
    progress: bool = True,
) -> dict[str, PhaseResult]:
    """Both phases, sequential first; a sequential phase of 0 requests reports zeros."""
    results: dict[str, PhaseResult] = {"sequential": PhaseResult()}
    if sequential_requests > 0:
        results["sequential"] = await run_phase(
            url, payload, requests=sequential_requests, concurrency=1, timeout_s=timeout_s,
            progress=progress, label="sequential",
        )
    results["concurrent"] = await run_phase(
        url, payload, requests=requests, concurrency=concurrency, duration_s=duration_s,
        timeout_s=timeout_s, progress=progress, label=f"concurrent x{concurrency}",
    )
    return results


def write_json(path: Path, results: dict[str, PhaseResult]) -> None:
    path.write_text(json.dumps({name: r.summary() for name, r in results.items()}, indent=2) + "\n")
