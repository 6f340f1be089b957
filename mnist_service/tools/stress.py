"""Load generator: a sequential phase, then a concurrent one, with latency percentiles.

The whole request (line, headers, body) is encoded once up front and replayed on keep-alive
HTTP/1.1 connections by a minimal client (`Connection`), so the tester spends its CPU on the
socket, not on building requests: on a shared 2-core box the client competes with the server.
httpx cost many times this client's CPU per request, which capped what the tester could measure
(the figures are in docs/performance.md). Over gRPC (`build_grpc_payload`, `GrpcConnection`) the same
holds: the ModelInfer message is serialized once and sent as bytes on a channel of its own per worker.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from tqdm import tqdm

ENDPOINTS = ("multipart", "raw", "pixels", "v2")
PROTOCOLS = ("http", "grpc")
GRPC_CONTENT_TYPE = "application/grpc"


@dataclass(frozen=True)
class Payload:
    path: str
    body: bytes
    content_type: str
    api_key: str | None = None  # sent as X-API-Key (metadata x-api-key over gRPC)
    headers: tuple[tuple[str, str], ...] = ()  # more HTTP headers (the v2 binary extension's header length)


def build_payload(image: bytes, mode: str = "multipart", pixels: list[int] | None = None) -> Payload:
    """The request to repeat: a multipart upload, a raw image body, a pixels JSON, or the pixels as a v2 tensor."""
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
    if mode == "v2":
        if pixels is None:
            raise ValueError("v2 mode needs the 784 pixel values")
        return build_v2_payload(np.asarray(pixels))
    raise ValueError(f"mode must be one of {ENDPOINTS}")


def build_v2_payload(pixels: np.ndarray, model_name: str = "mnist") -> Payload:
    """REST's twin of `build_grpc_payload`: the same UINT8 [1, 28, 28] tensor to the v2 infer route, as bytes
    after a JSON header (the binary tensor data extension, as tritonclient.http sends it), answered in binary."""
    digit = np.asarray(pixels, dtype=np.uint8).reshape(1, 28, 28)
    tensor = {"name": "input", "shape": list(digit.shape), "datatype": "UINT8",
              "parameters": {"binary_data_size": digit.nbytes}}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    return Payload(f"/v2/models/{model_name}/infer", header + digit.tobytes(), "application/octet-stream",
                   headers=(("Inference-Header-Content-Length", str(len(header))),))


def build_grpc_payload(pixels: np.ndarray, model_name: str = "mnist") -> Payload:
    """A serialized gRPC ModelInfer request for one digit (28 x 28 pixels, white on black) as raw UINT8."""
    # Imported here: our generated modules can't share a process with tritonclient.grpc's (mnist_service/protos).
    from mnist_service.protos import grpc_predict_v2_pb2 as pb

    digit = np.asarray(pixels, dtype=np.uint8).reshape(1, 28, 28)
    tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="UINT8", shape=digit.shape)
    request = pb.ModelInferRequest(model_name=model_name, inputs=[tensor], raw_input_contents=[digit.tobytes()])
    return Payload("/inference.GRPCInferenceService/ModelInfer", request.SerializeToString(), GRPC_CONTENT_TYPE)


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
        return sum(n for status, n in self.statuses.items() if not _success(status))

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


class Connection:
    """One keep-alive HTTP/1.1 connection that sends the same prebuilt request over and over.

    Reads exactly what a server may answer: a status line, headers, then a body framed by
    Content-Length or chunked encoding. Reconnects after an error or `Connection: close`.
    """

    def __init__(self, url: str, payload: Payload, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the URL must look like http://host:port, got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.timeout_s = timeout_s
        path = parts.path.rstrip("/") + payload.path
        headers = ((("X-API-Key", payload.api_key),) if payload.api_key else ()) + payload.headers
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: mnist-stress\r\n{extra}"
            f"Content-Type: {payload.content_type}\r\nContent-Length: {len(payload.body)}\r\n\r\n"
        ).encode() + payload.body
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self) -> str:
        """The response's status code, or the name of what went wrong."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._exchange()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
            await self.close()
            return type(exc).__name__

    async def _exchange(self) -> str:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
        reader = self.reader
        self.writer.write(self.request)
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        status = head[9:12].decode("ascii")
        if not head.startswith(b"http/1.") or not status.isdigit():
            raise ValueError("not an HTTP/1.x response")
        length = _header(head, b"content-length")
        if length is not None:
            await reader.readexactly(int(length))
        elif _header(head, b"transfer-encoding") == b"chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")
        elif status not in ("204", "304") and status[0] != "1":
            await reader.read()  # a body that ends with the connection
            await self.close()
            return status
        if _header(head, b"connection") == b"close":
            await self.close()
        return status

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


class GrpcConnection:
    """One gRPC channel, a connection of its own, that sends the same serialized request over and over.

    The call takes and returns bytes (no serializer), so the tester decodes nothing; the status is the
    gRPC code's name ("OK", "UNAVAILABLE", ...).
    """

    def __init__(self, url: str, payload: Payload, timeout_s: float) -> None:
        import grpc  # only the gRPC mode needs it

        self.grpc = grpc
        target = url.split("://", 1)[-1].rstrip("/")
        # A local subchannel pool: channels to one target would otherwise share one connection (one worker).
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.call = self.channel.unary_unary(payload.path)
        self.body = payload.body
        self.metadata = (("x-api-key", payload.api_key),) if payload.api_key else None
        self.timeout_s = timeout_s

    async def send(self) -> str:
        try:
            await self.call(self.body, timeout=self.timeout_s, metadata=self.metadata)
        except self.grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"

    async def close(self) -> None:
        await self.channel.close()


def connect(url: str, payload: Payload, timeout_s: float) -> Connection | GrpcConnection:
    """The connection that sends `payload`: gRPC for a gRPC payload, else HTTP/1.1."""
    if payload.content_type == GRPC_CONTENT_TYPE:
        return GrpcConnection(url, payload, timeout_s)
    return Connection(url, payload, timeout_s)


def _success(status: str) -> bool:
    return status.startswith("2") or status == "OK"


def _header(head: bytes, name: bytes) -> bytes | None:
    """A header's value from a lower-cased response head, or None."""
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return None
    start += len(name) + 3
    return head[start : head.find(b"\r\n", start)].strip()


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
        connection = connect(url, payload, timeout_s)
        try:
            while more():
                start = time.perf_counter()
                status = await connection.send()
                result.latencies_ms.append((time.perf_counter() - start) * 1000)
                result.statuses[status] += 1
                bar.update(1)
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    bar.close()
    return result


def format_report(name: str, result: PhaseResult) -> str:
    s = result.summary()
    lat = s["latency_ms"]
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(result.statuses.items()) if not _success(k)) or "none"
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


def write_json(path: Path, results: dict[str, PhaseResult], **extra: float) -> None:
    """The phases' summaries, and any `extra` numbers beside them (the benchmark's client CPU)."""
    path.write_text(json.dumps({**{name: r.summary() for name, r in results.items()}, **extra}, indent=2) + "\n")
