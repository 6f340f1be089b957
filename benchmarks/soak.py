"""Soak benchmark: minutes of mixed good, bad, aborted and slow traffic against one server.

    .venv/bin/python -m benchmarks.soak [--duration 600] [--url http://127.0.0.1:PORT] [--json out.json]

A service that passes its tests can still leak a little memory per odd request, or slow down as
some buffer or table grows. This keeps a realistic mix going for --duration seconds and watches
for exactly that, minute by minute:

  - good traffic: every accepted upload format (PNG grey/RGB/RGBA/16-bit, JPEG, BMP, GIF, WebP,
    TIFF; 28x28 digits and larger photo-like pages) as multipart and raw bodies, /predict/batch,
    /predict/pixels, and the v2 protocol (JSON and binary tensors), plus probe and metrics scrapes;
  - bad inputs of every kind, each with the 4xx it must get (never a 5xx);
  - clients that hang up mid-headers, mid-body (FIN and RST), or before reading the answer;
  - --slow connections kept open at all times that send nothing, dribble their headers or dribble
    their body a few bytes a second: the server should answer them 408 and close (HEADER_TIMEOUT_S,
    BODY_TIMEOUT_S); the script only counts what happens to them, the main loop never waits on them.

--concurrency asyncio tasks in this one process share the mix, each on its own keep-alive
connection, through the stress tester's minimal HTTP client (about 55 us of client CPU per request;
httpx costs 0.8 ms, and the client shares the machine's cores with the server). Latency is
measured per good request. Every --interval seconds (default a minute) one line gives the answers
by status, p50/p99 of the good requests, the RSS of every server process (the supervisor and each
worker, re-listed each time since a worker may be replaced) and the client's own CPU. The summary
checks: no 5xx, no failed connections, every answer the expected one, RSS of each process within
5% from the first interval to the last, p99 per interval flat (max <= --p99-ratio x min, first
interval excluded as warm-up), the same server processes throughout, no traceback or ERROR line in
the server log. Exit code 0 when every check passes, else 1. A check that needs more intervals than
the run had is n/a and doesn't fail it: `--duration 60` is a smoke run of every kind of traffic;
the flatness checks need a few minutes (or a shorter --interval).

Without --url it starts model_inference.py on a free loopback port, with MAX_UPLOAD_BYTES lowered
to 1 MiB (so the oversized-body case stays cheap) and its stderr in a temp dir, printed at start.
With --url the server must be on this machine's loopback: the script finds its processes from the
listening socket, and reads the limits its bad inputs must cross (MAX_UPLOAD_BYTES,
MAX_IMAGE_PIXELS, MAX_BATCH_FILES) from this process's environment, which should match the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageFilter

from benchmarks.overload import wait_ready
from benchmarks.servers import free_port
from mnist_service.process.server import worker_pids
from mnist_service.settings import Settings
from mnist_service.tools.client import ServerNotReady, wait_until_ready
from mnist_service.tools.images import noise_image, png_bytes, test_digit, user_digit
from mnist_service.tools.stress import Connection, build_payload

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data" / "mnist"
REQUEST_TIMEOUT_S = 30.0
DRIBBLE_EVERY_S = 1.0  # a slow client sends DRIBBLE_BYTES this often
DRIBBLE_BYTES = 3
SLOW_KINDS = ("silent", "slow headers", "slow body")


# ---------------------------------------------------------------- the traffic catalogue


@dataclass(frozen=True)
class Request:
    """One kind of request, encoded once up front and replayed (the client spends no CPU building it).

    group: "good" (latency measured, must be 200), "probe" (must be 200, latency not counted),
    "bad" (must get `expect`), "abort" (sent on a fresh connection that is then dropped: `hangup`
    is "fin" or "rst"; no answer is read).
    """

    name: str
    group: str
    data: bytes
    expect: int | None = 200
    weight: float = 1.0
    hangup: str | None = None


def http_request(netloc: str, method: str, path: str, body: bytes = b"", content_type: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An HTTP/1.1 request as bytes; Content-Length is added unless `headers` frame the body themselves."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {netloc}", "User-Agent: mnist-soak"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in headers]
    if not any(name.lower() in ("transfer-encoding", "content-length") for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def form(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, filename or None for a text field, data) and its Content-Type.

    stress.build_payload makes the one-file `file` form; batches and wrong fields need this.
    """
    boundary = uuid.uuid4().hex
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def chunked(body: bytes, size: int = 64 * 1024) -> bytes:
    """The body in Transfer-Encoding: chunked framing, so the server can't refuse it by its length up front."""
    out = [f"{len(body[i:i + size]):x}\r\n".encode() + body[i:i + size] + b"\r\n" for i in range(0, len(body), size)]
    return b"".join(out) + b"0\r\n\r\n"


def encoded(img: Image.Image, fmt: str, **options: Any) -> bytes:
    """png_bytes with encoder options (JPEG quality); png_bytes itself where none are needed."""
    if not options:
        return png_bytes(img, fmt)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def photo(digit: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A 1280x960 RGB phone photo of the digit: tinted paper, light falling off across it, blur, sensor noise."""
    page = user_digit(digit, scale=24, canvas=(1280, 960), offset=(420, 180)).filter(ImageFilter.GaussianBlur(1.5))
    light = 150 + 90 * np.linspace(0, 1, page.width)[None, :]
    grey = light * (1 - 0.7 * (255 - np.asarray(page, np.float32)) / 255)
    rgb = grey[..., None] * np.array([1.0, 0.96, 0.88]) + rng.normal(0, 4, (page.height, page.width, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def canvas(digit: np.ndarray) -> Image.Image:
    """A 280x280 transparent canvas export: black strokes whose alpha is the ink."""
    rgba = np.zeros((280, 280, 4), np.uint8)
    rgba[..., 3] = np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BILINEAR))
    return Image.fromarray(rgba)


def good_requests(netloc: str) -> list[Request]:
    """Every way of sending a digit the API accepts; each must be answered 200."""
    rng = np.random.default_rng(0)
    digits = [test_digit(i, DATA_DIR)[0] for i in range(6)]
    page = user_digit(digits[1])  # 400x300, black on white, off-centre
    files = {
        "png 28x28 grey (raw MNIST)": encoded(Image.fromarray(digits[0]), "PNG"),
        "png 400x300 grey": encoded(page, "PNG"),
        "png 400x300 rgb": encoded(user_digit(digits[2]).convert("RGB"), "PNG"),
        "png 280x280 rgba canvas": encoded(canvas(digits[3]), "PNG"),
        "png 400x300 16-bit grey": encoded(Image.fromarray(np.asarray(page, np.uint16) * 257), "PNG"),
        "jpeg 400x300 grey q75": encoded(page, "JPEG", quality=75),
        "jpeg 1280x960 rgb photo": encoded(photo(digits[4], rng), "JPEG", quality=85),
        "bmp 400x300 rgb": encoded(user_digit(digits[5]).convert("RGB"), "BMP"),
        "gif 400x300 grey": encoded(page, "GIF"),
        "webp 400x300 rgb": encoded(page.convert("RGB"), "WEBP"),
        "tiff 400x300 grey": encoded(page, "TIFF"),
        "tiff 28x28 rgba": encoded(Image.fromarray(digits[0]).convert("RGBA"), "TIFF"),
    }
    out = []
    for name, data in files.items():
        p = build_payload(data, "multipart")
        out.append(Request(f"multipart {name}", "good", http_request(netloc, "POST", p.path, p.body, p.content_type)))
    for name in ("png 400x300 grey", "jpeg 1280x960 rgb photo"):
        media_type = "image/png" if name.startswith("png") else "image/jpeg"
        out.append(Request(f"raw body {name}", "good",
                           http_request(netloc, "POST", "/predict", files[name], media_type)))
    p = build_payload(files["png 28x28 grey (raw MNIST)"], "multipart")
    out.append(Request("multipart png ?debug=1", "good",
                       http_request(netloc, "POST", "/predict?debug=1", p.body, p.content_type)))
    batch = [("files", f"{n}.img", files[n]) for n in
             ("png 400x300 grey", "jpeg 400x300 grey q75", "webp 400x300 rgb", "bmp 400x300 rgb", "gif 400x300 grey")]
    body, ctype = form(batch)
    out.append(Request("batch of 5 mixed formats", "good", http_request(netloc, "POST", "/predict/batch", body, ctype)))
    flat = digits[0].reshape(-1).tolist()
    p = build_payload(b"", "pixels", flat)
    out.append(Request("pixels flat 784", "good", http_request(netloc, "POST", p.path, p.body, p.content_type)))
    nested = json.dumps({"pixels": digits[1].tolist()}).encode()
    out.append(Request("pixels 28x28 nested", "good",
                       http_request(netloc, "POST", "/predict/pixels", nested, "application/json")))
    infer = "/v2/models/mnist/infer"
    uint8 = {"inputs": [{"name": "input", "shape": [1, 784], "datatype": "UINT8", "data": flat}]}
    out.append(Request("v2 json UINT8 [1,784]", "good",
                       http_request(netloc, "POST", infer, json.dumps(uint8).encode(), "application/json")))
    fp32 = np.stack(digits[:2]).astype(np.float32) / 255
    tensor = {"inputs": [{"name": "input", "shape": [2, 1, 28, 28], "datatype": "FP32",
                          "data": np.round(fp32, 4).tolist()}]}
    out.append(Request("v2 json FP32 [2,1,28,28]", "good",
                       http_request(netloc, "POST", infer, json.dumps(tensor).encode(), "application/json")))
    raw = np.stack(digits[:4]).astype(np.uint8).tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [4, 784], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}}).encode()
    out.append(Request("v2 binary UINT8 [4,784]", "good", http_request(
        netloc, "POST", infer, header + raw, "application/octet-stream",
        (("Inference-Header-Content-Length", str(len(header))),))))
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
        out.append(Request(f"GET {path}", "probe", http_request(netloc, "GET", path), weight=0.1))
    return out


def bad_requests(netloc: str, limits: Settings) -> list[Request]:
    """Every kind of client mistake, each with the status it must get (4xx: the client's fault, never 5xx)."""
    png = png_bytes(user_digit(test_digit(0, DATA_DIR)[0]))
    out: list[Request] = []

    def add(name: str, expect: int, path: str, body: bytes = b"", ctype: str | None = None,
            headers: tuple[tuple[str, str], ...] = ()) -> None:
        out.append(Request(name, "bad", http_request(netloc, "POST", path, body, ctype, headers), expect))

    def upload(name: str, expect: int, data: bytes, field_name: str = "file") -> None:
        add(name, expect, "/predict", *form([(field_name, "x.png", data)]))

    upload("not an image", 422, b"hello, this is text, not a picture")
    upload("empty file", 422, b"")
    upload("truncated png", 422, png[: len(png) // 2])
    upload("blank image", 422, png_bytes(Image.new("L", (64, 64), 255)))
    upload("wrong field name", 400, png, "image")
    add("text field, not a file", 400, "/predict", *form([("file", None, b"digit.png")]))
    add("wrong content type text/plain", 415, "/predict", png, "text/plain")
    add("json to /predict", 415, "/predict", b'{"file": "x"}', "application/json")
    add("bad ?debug value", 422, "/predict?debug=maybe", png, "image/png")
    over = os.urandom(limits.max_upload_bytes + 4096)
    add("oversized body (Content-Length)", 413, "/predict", over, "image/png")
    add("oversized body (chunked)", 413, "/predict", chunked(over), "image/png", (("Transfer-Encoding", "chunked"),))
    side = int(limits.max_image_pixels**0.5) + 64  # a mostly empty 1-bit page: small file, huge when decoded
    upload(f"decompression bomb {side}x{side}", 413, png_bytes(Image.new("1", (side, side), 1)))
    body, ctype = form([("file", "x.png", png)])
    add("multipart without closing boundary", 400, "/predict", body[: -len(b"--\r\n") - 40], ctype)
    add("multipart without boundary parameter", 400, "/predict", body, "multipart/form-data")
    add("multipart garbage after boundary", 400, "/predict", body.replace(b"\r\n", b"xx", 1), ctype)
    add("batch over MAX_BATCH_FILES", 400, "/predict/batch",
        *form([("files", f"{i}.png", png) for i in range(limits.max_batch_files + 1)]))
    for name, pixels_body in {
        "pixels: 10 values": b'{"pixels": [0,0,0,0,0,0,0,0,0,0]}',
        "pixels: value 300": json.dumps({"pixels": [300] * 784}).encode(),
        "pixels: floats": json.dumps({"pixels": [0.5] * 784}).encode(),
        "pixels: a string": b'{"pixels": "abc"}',
        "pixels: missing key": b"{}",
        "pixels: malformed json": b'{"pixels": [0, 0,',
    }.items():
        add(name, 422, "/predict/pixels", pixels_body, "application/json")
    infer = "/v2/models/mnist/infer"

    def tensor(**fields: Any) -> bytes:
        tensor = {"name": "input", "shape": [1, 784], "datatype": "UINT8", "data": [0] * 784, **fields}
        return json.dumps({"inputs": [tensor]}).encode()

    for name, v2_body in {
        "v2: datatype INT64": tensor(datatype="INT64"),
        "v2: shape [1,3,28,28]": tensor(shape=[1, 3, 28, 28]),
        "v2: 783 values": tensor(data=[0] * 783),
        "v2: N over MAX_BATCH_FILES": tensor(shape=[limits.max_batch_files + 1, 784]),
        "v2: FP32 out of [0,1]": tensor(datatype="FP32", data=[2.0] * 784),
        "v2: not json": b'{"inputs": [',
    }.items():
        add(name, 400, infer, v2_body, "application/json")
    header = json.dumps({"inputs": [{"name": "x", "shape": [1, 784], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": 784}}]}).encode()
    add("v2: binary size mismatch", 400, infer, header + b"\0" * 780, "application/octet-stream",
        (("Inference-Header-Content-Length", str(len(header))),))
    add("v2: unknown model", 404, "/v2/models/resnet/infer", tensor(), "application/json")
    return out


def abort_requests(netloc: str) -> list[Request]:
    """Clients that hang up: mid-headers, mid-body (FIN or RST), and after a full request, unread."""
    png = png_bytes(user_digit(test_digit(0, DATA_DIR)[0]))
    big = png_bytes(noise_image(400, seed=1))  # ~160 KB: the server is mid-read when the client goes
    full = http_request(netloc, "POST", "/predict", png, "image/png")
    partial = http_request(netloc, "POST", "/predict", big, "image/png")
    return [
        Request("hang up mid-headers", "abort", full[:40], None, hangup="fin"),
        Request("hang up mid-body (FIN)", "abort", partial[: len(partial) // 2], None, hangup="fin"),
        Request("hang up mid-body (RST)", "abort", partial[: len(partial) // 2], None, hangup="rst"),
        Request("hang up before the answer (FIN)", "abort", full, None, hangup="fin"),
        Request("hang up before the answer (RST)", "abort", full, None, hangup="rst"),
    ]


def catalogue(netloc: str, limits: Settings, bad_share: float, abort_share: float) -> list[Request]:
    """All requests with weights set so bad inputs and hang-ups are the given shares of the mix."""
    groups = {
        "good": good_requests(netloc),
        "bad": bad_requests(netloc, limits),
        "abort": abort_requests(netloc),
    }
    for request in groups["good"]:
        if request.group == "good" and len(request.data) > limits.max_upload_bytes:
            raise SystemExit(f"{request.name} is {len(request.data)} bytes, over MAX_UPLOAD_BYTES: raise the limit")
    shares = {"good": 1.0 - bad_share - abort_share, "bad": bad_share, "abort": abort_share}
    out = []
    for group, requests in groups.items():
        total = sum(r.weight for r in requests)
        out += [Request(r.name, r.group, r.data, r.expect, shares[group] * r.weight / total, r.hangup)
                for r in requests]
    return out


# ---------------------------------------------------------------- measuring


@dataclass
class Period:
    """What happened in one interval (a minute by default)."""

    started: float
    statuses: Counter[str] = field(default_factory=Counter)
    good_ms: list[float] = field(default_factory=list)
    slow: Counter[str] = field(default_factory=Counter)
    cpu_started: float = field(default_factory=time.process_time)


@dataclass
class Tally:
    """Everything the run measured: per interval, per request kind, per slow-client kind."""

    period: Period
    by_request: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    slow: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    slow_open: int = 0

    def record(self, request: Request, status: str, ms: float) -> None:
        self.period.statuses[status] += 1
        self.by_request[request.name][status] += 1
        if request.group == "good" and status == "200":
            self.period.good_ms.append(ms)

    def record_slow(self, kind: str, outcome: str, seconds: float) -> None:
        self.period.slow[outcome] += 1
        self.slow[(kind, outcome)].append(seconds)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None  # gone, or a zombie without memory


def server_rss(supervisor: int) -> dict[int, float]:
    """RSS in MB of the supervisor and each of its current workers, by pid (the supervisor first)."""
    try:
        workers = worker_pids(supervisor)
    except OSError:  # a child exited between the listing and the read: list again
        time.sleep(0.05)
        workers = worker_pids(supervisor)
    sizes = {pid: rss_mb(pid) for pid in [supervisor, *workers]}
    return {pid: mb for pid, mb in sizes.items() if mb is not None}


def listening_pid(port: int) -> int | None:
    """The process holding the listening socket on `port` (the supervisor), found through /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    owners = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                    owners.add(int(proc.name))
            except OSError:
                continue
    # A child that inherited the socket is not the one to start from: take the owner whose parent isn't one.
    for pid in owners:
        status = Path(f"/proc/{pid}/status").read_text()
        if int(status.split("PPid:")[1].split()[0]) not in owners:
            return pid
    return None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# ---------------------------------------------------------------- the clients


async def hang_up(host: str, port: int, request: Request) -> str:
    """Send part or all of a request on a fresh connection, then drop it: FIN, or RST via SO_LINGER 0."""
    try:
        _, writer = await asyncio.open_connection(host, port)
        writer.write(request.data)
        await writer.drain()
        if request.hangup == "rst":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
            await writer.wait_closed()
    except OSError as exc:
        return f"hang-up {type(exc).__name__}"
    return "hung up"


async def mixer(url: str, items: list[Request], tally: Tally, deadline: float, seed: int) -> None:
    """One keep-alive connection replaying requests drawn from the weighted mix until the deadline.

    Reuses the stress tester's client: it replays `connection.request`, set here before each send.
    """
    rng = random.Random(seed)
    cumulative = list(np.cumsum([r.weight for r in items]))
    parts = urlsplit(url)
    connection = Connection(url, build_payload(b"", "raw"), REQUEST_TIMEOUT_S)
    try:
        while time.monotonic() < deadline:
            request = rng.choices(items, cum_weights=cumulative)[0]
            started = time.perf_counter()
            if request.hangup:
                status = await hang_up(parts.hostname or "", parts.port or 80, request)
            else:
                connection.request = request.data
                status = await connection.send()
            tally.record(request, status, (time.perf_counter() - started) * 1000)
    finally:
        await connection.close()


async def slow_client(host: str, port: int, netloc: str, kind: str, give_up: float) -> str:
    """One slow connection until the server answers or closes it, or `give_up` (monotonic) comes.

    silent: connects and sends nothing. slow headers: a request whose headers never end, a few
    bytes a second. slow body: complete headers, then the body a few bytes a second.
    """
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        return f"connect failed ({type(exc).__name__})"
    if kind == "slow headers":
        head, drip = f"POST /predict HTTP/1.1\r\nHost: {netloc}\r\nX-Slow: ".encode(), b"a" * DRIBBLE_BYTES
    elif kind == "slow body":
        head = http_request(netloc, "POST", "/predict", b"", "image/png", (("Content-Length", "500000"),))
        drip = b"\0" * DRIBBLE_BYTES
    else:
        head, drip = b"", b""
    answer = asyncio.ensure_future(reader.read(4096))
    try:
        writer.write(head)
        while not answer.done():
            left = give_up - time.monotonic()
            if left <= 0:
                return "still open"
            await asyncio.wait({answer}, timeout=min(DRIBBLE_EVERY_S, left))
            if not answer.done() and drip:
                writer.write(drip)
        data = answer.result()
        if not data:
            return "closed by server, no answer"
        status = data[9:12].decode("ascii", "replace")
        if status != "408":
            return f"answered {status}"
        return "408 then closed" if await closes(reader) else "408, left open"
    except (ConnectionResetError, BrokenPipeError):
        return "reset by server"
    finally:
        answer.cancel()
        writer.transport.abort()


async def closes(reader: asyncio.StreamReader, within_s: float = 3.0) -> bool:
    """True if the server closes the connection within `within_s` (after its answer)."""
    try:
        async with asyncio.timeout(within_s):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


async def slow_slot(url: str, slot: int, tally: Tally, deadline: float, max_age: float) -> None:
    """Keeps one slow connection open at all times, cycling through the kinds."""
    parts = urlsplit(url)
    n = slot
    while time.monotonic() < deadline:
        kind = SLOW_KINDS[n % len(SLOW_KINDS)]
        n += 1
        started = time.monotonic()
        tally.slow_open += 1
        try:
            outcome = await slow_client(parts.hostname or "", parts.port or 80, parts.netloc, kind,
                                        min(deadline, started + max_age))
        finally:
            tally.slow_open -= 1
        if outcome == "still open":
            outcome = "still open at the end" if time.monotonic() >= deadline - 0.5 else f"open {max_age:g}s, dropped"
        tally.record_slow(kind, outcome, time.monotonic() - started)
        if outcome.startswith("connect failed"):
            await asyncio.sleep(1.0)


# ---------------------------------------------------------------- reporting


def period_line(index: int, period: Period, since: float, seconds: float, rss: dict[int, float],
                supervisor: int | None, open_slow: int) -> str:
    """One report line: answers by status, good-request latency, RSS per server process, slow clients."""
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(period.statuses.items())) or "none"
    p50, p99 = percentile(period.good_ms, 50), percentile(period.good_ms, 99)
    latency = f"p50 {p50:.1f} p99 {p99:.1f} ms" if p50 is not None and p99 is not None else "no good answers"
    memory = " ".join(f"{'sup' if pid == supervisor else 'w'}[{pid}] {mb:.1f}" for pid, mb in rss.items()) or "n/a"
    slow = " ".join(f"{k}:{v}" for k, v in sorted(period.slow.items()))
    cpu = (time.process_time() - period.cpu_started) / seconds
    return (f"minute {index:>2} ({since:.0f}-{since + seconds:.0f}s) {sum(period.statuses.values())} req "
            f"[{statuses}]  good {latency}  RSS MB {memory}  slow: open {open_slow}{' ' + slow if slow else ''}  "
            f"client CPU {cpu:.0%}")


def scan_log(path: Path | None) -> dict[str, Any] | None:
    """Tracebacks and ERROR lines in the server's log, with the first few for the report."""
    if path is None:
        return None
    lines = path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if " ERROR " in line or " CRITICAL " in line]
    return {"tracebacks": sum("Traceback (most recent call last)" in line for line in lines),
            "error_lines": len(errors), "first_errors": errors[:5]}


def summarise(args: argparse.Namespace, periods: list[dict[str, Any]], tally: Tally, items: list[Request],
              log: dict[str, Any] | None, alive: bool) -> tuple[list[str], dict[str, Any]]:
    """The summary lines, the checks and the JSON document."""
    totals: Counter[str] = Counter()
    for counts in tally.by_request.values():
        totals.update(counts)
    by_name = {r.name: r for r in items}
    five_xx = {s: n for s, n in totals.items() if s.startswith("5")}
    transport = {f"{name}: {s}": n for name, counts in tally.by_request.items() for s, n in counts.items()
                 if not s[0].isdigit() and s != "hung up"}
    unexpected = {
        f"{name} (expects {by_name[name].expect})": {s: n for s, n in counts.items() if s != str(by_name[name].expect)}
        for name, counts in tally.by_request.items()
        if by_name[name].expect is not None and any(s[0].isdigit() and s != str(by_name[name].expect) for s in counts)
    }
    # Intervals long enough to judge (a trailing stub of a few seconds is not), the first one as warm-up.
    judged = [p for p in periods if p["seconds"] >= args.interval / 2]
    after_first = judged[1:]
    rss_change: dict[str, float] = {}
    same_processes: bool | None = None
    if len(judged) >= 2 and judged[0]["rss_mb"]:
        first, last = judged[0]["rss_mb"], judged[-1]["rss_mb"]
        same_processes = set(first) == set(last)
        rss_change = {pid: (last[pid] - first[pid]) / first[pid] for pid in first if pid in last}
    p99s = [p["good_p99_ms"] for p in after_first if p["good_p99_ms"] is not None]
    all_p99 = [(p["minute"], p["good_p99_ms"]) for p in periods if p["good_p99_ms"] is not None]

    checks: dict[str, bool | None] = {
        "no 5xx answers": not five_xx,
        "no failed connections or timeouts (hang-ups aside)": not transport,
        "every answer the expected one (good 200, bad their 4xx)": not unexpected,
        f"RSS of each process within {args.rss_tolerance:.0%} from the first interval to the last":
            all(abs(c) <= args.rss_tolerance for c in rss_change.values()) if rss_change else None,
        "the same server processes throughout (no worker replaced)": same_processes,
        f"p99 flat after the first interval (max <= {args.p99_ratio:g} x min)":
            max(p99s) <= args.p99_ratio * min(p99s) if len(p99s) >= 2 else None,
        "server alive at the end": alive,
        "no traceback or ERROR line in the server log": (log["tracebacks"] == 0 and log["error_lines"] == 0)
        if log else None,
    }
    verdict = all(ok is not False for ok in checks.values())

    lines = [
        "",
        f"summary: {sum(totals.values())} requests in {sum(p['seconds'] for p in periods):.0f}s",
        "  answers: " + " ".join(f"{k}:{v}" for k, v in sorted(totals.items())),
        f"  5xx: {sum(five_xx.values())} {five_xx or ''}",
    ]
    if transport:
        lines.append(f"  failed connections: {transport}")
    for name, counts in unexpected.items():
        lines.append(f"  UNEXPECTED {name}: {counts}")
    lines.append("  slow clients (kind: outcome x count, seconds min/median/max):")
    for (kind, outcome), secs in sorted(tally.slow.items()):
        lines.append(f"    {kind}: {outcome} x{len(secs)}, "
                     f"{min(secs):.1f}/{statistics.median(secs):.1f}/{max(secs):.1f}s")
    if rss_change:
        first, last = judged[0]["rss_mb"], judged[-1]["rss_mb"]
        lines.append(f"  RSS MB, minute {judged[0]['minute']} -> {judged[-1]['minute']}: " + ", ".join(
            f"[{pid}] {first[pid]:.1f} -> {last[pid]:.1f} ({rss_change[pid]:+.1%})" for pid in rss_change))
        if not same_processes:
            lines.append(f"  server processes changed: {sorted(first)} -> {sorted(last)}")
    else:
        lines.append("  RSS change: n/a (needs two intervals and the server's pid)")
    if all_p99:
        lo, hi = min(all_p99, key=lambda x: x[1]), max(all_p99, key=lambda x: x[1])
        lines.append(f"  good p99 per interval: min {lo[1]:.1f} ms (minute {lo[0]}), "
                     f"max {hi[1]:.1f} ms (minute {hi[0]})"
                     + ("" if len(p99s) >= 2 else "; flatness n/a with fewer than two intervals after the first"))
    if log is not None:
        lines.append(f"  server log {args.log_path}: {log['tracebacks']} tracebacks, {log['error_lines']} ERROR lines")
        lines += [f"    {line[:300]}" for line in log["first_errors"]]
    lines += ["", "checks:"]
    lines += [f"  {'n/a ' if ok is None else 'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks.items()]
    lines.append(f"verdict: {'PASS' if verdict else 'FAIL'}")

    document = {
        "duration_s": args.duration, "url": args.url, "concurrency": args.concurrency, "slow": args.slow,
        "server_log": str(args.log_path) if args.log_path else None,
        "intervals": periods,
        "totals": dict(totals),
        "by_request": {name: dict(counts) for name, counts in sorted(tally.by_request.items())},
        "slow_clients": {f"{kind}: {outcome}": {"count": len(s), "median_s": round(statistics.median(s), 2)}
                         for (kind, outcome), s in sorted(tally.slow.items())},
        "rss_change": {str(pid): round(c, 4) for pid, c in rss_change.items()},
        "server_log_scan": log,
        "checks": checks,
        "verdict": "PASS" if verdict else "FAIL",
    }
    return lines, document


# ---------------------------------------------------------------- the run


async def soak(args: argparse.Namespace, items: list[Request], supervisor: int | None,
               server: subprocess.Popen[bytes] | None) -> tuple[list[dict[str, Any]], Tally, bool]:
    """Runs the mix, the slow clients and the per-interval report side by side until --duration is up."""
    start = time.monotonic()
    deadline = start + args.duration
    tally = Tally(Period(start))
    tasks = [asyncio.create_task(mixer(args.url, items, tally, deadline, args.seed + i))
             for i in range(args.concurrency)]
    tasks += [asyncio.create_task(slow_slot(args.url, i, tally, deadline, args.slow_max_age))
              for i in range(args.slow)]
    periods: list[dict[str, Any]] = []
    alive = True
    index = 0
    while True:
        index += 1
        boundary = min(start + index * args.interval, deadline)
        await asyncio.sleep(max(0.0, boundary - time.monotonic()))
        if boundary >= deadline:
            await asyncio.gather(*tasks)  # the mixers finish their last request, slow clients hang up
        period, tally.period = tally.period, Period(time.monotonic())
        seconds = time.monotonic() - period.started
        rss = server_rss(supervisor) if supervisor is not None and rss_mb(supervisor) is not None else {}
        print(period_line(index, period, period.started - start, seconds, rss, supervisor, tally.slow_open),
              flush=True)
        periods.append({
            "minute": index, "seconds": round(seconds, 1), "statuses": dict(period.statuses),
            "good_requests": len(period.good_ms),
            "good_p50_ms": percentile(period.good_ms, 50), "good_p99_ms": percentile(period.good_ms, 99),
            "rss_mb": rss, "slow": dict(period.slow),
            "client_cpu": round((time.process_time() - period.cpu_started) / seconds, 3),
        })
        alive = server is None or server.poll() is None
        if boundary >= deadline:
            break
        if not alive:
            print(f"the server exited (code {server.returncode if server else '?'}): stopping", flush=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            break
    return periods, tally, alive


def check_loopback(url: str) -> None:
    """This load is for a server on this machine only: a loopback IP or localhost, never a name to resolve."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise SystemExit(f"--url must look like http://127.0.0.1:PORT, got {url!r}")
    try:
        loopback = parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url must be on loopback (127.0.0.1, ::1 or localhost), got {parts.hostname}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--url", help="a running server on loopback; default: start one on a free port")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mnist_cnn.pt")
    parser.add_argument("--env", action="append", default=[], help="server env override KEY=VALUE (repeatable)")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive request tasks (default 16)")
    parser.add_argument("--slow", type=int, default=20, help="slow connections kept open (default 20)")
    parser.add_argument("--slow-max-age", type=float, default=90.0,
                        help="drop a slow connection the server still holds after this long (default 90 s)")
    parser.add_argument("--bad-share", type=float, default=0.08, help="share of bad inputs in the mix")
    parser.add_argument("--abort-share", type=float, default=0.02, help="share of hang-ups in the mix")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds per report line (default 60)")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--p99-ratio", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    server: subprocess.Popen[bytes] | None = None
    args.log_path = None
    env_overrides = dict(kv.split("=", 1) for kv in args.env)
    if args.url:
        check_loopback(args.url)
        args.url = args.url.rstrip("/")
        limits = Settings()
        supervisor = listening_pid(urlsplit(args.url).port or 80)
        if supervisor is None:
            print("could not find the server's process from its listening socket: RSS not measured", flush=True)
    else:
        if "MAX_UPLOAD_BYTES" not in os.environ:
            env_overrides.setdefault("MAX_UPLOAD_BYTES", str(1024 * 1024))
        limits = Settings(**{k.lower(): v for k, v in env_overrides.items()})
        port = free_port()
        args.url = f"http://127.0.0.1:{port}"
        args.log_path = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
        print(f"server log: {args.log_path}", flush=True)
        with args.log_path.open("wb") as log:
            server = subprocess.Popen(
                [sys.executable, "model_inference.py", "--model", str(args.model), "--host", "127.0.0.1",
                 "--port", str(port)],
                cwd=ROOT, env={**os.environ, **env_overrides}, stdout=subprocess.DEVNULL, stderr=log,
            )
        supervisor = server.pid
    try:
        if server is not None:
            wait_ready(args.url, server)
        else:
            try:
                wait_until_ready(args.url, lambda: True, timeout=10)
            except ServerNotReady as exc:
                raise SystemExit(f"{args.url}: {exc}") from None
        items = catalogue(urlsplit(args.url).netloc, limits, args.bad_share, args.abort_share)
        counts = Counter(r.group for r in items)
        print(f"soak: {args.duration:g}s against {args.url}, {args.concurrency} keep-alive tasks over "
              f"{counts['good']} good, {counts['probe']} probe, {counts['bad']} bad and {counts['abort']} hang-up "
              f"request kinds, {args.slow} slow connections; MAX_UPLOAD_BYTES={limits.max_upload_bytes}", flush=True)
        periods, tally, alive = asyncio.run(soak(args, items, supervisor, server))
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    lines, document = summarise(args, periods, tally, items, scan_log(args.log_path), alive)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if document["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
