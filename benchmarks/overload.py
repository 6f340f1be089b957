"""Overload benchmark: the server under 256 concurrent clients must shed load, not fall over.

    python benchmarks/overload.py [--duration 60] [--concurrency 256] [--model models/mnist_cnn.pt]

Starts `model_inference.py` with its defaults (plus any --env KEY=VALUE), measures a baseline
single-request latency, then drives POST /predict (raw PNG body) with `hey` for --duration
seconds while it samples the server's RSS every second and probes with httpx that 503s carry
Retry-After. Then it checks how soon a single request is fast again. Pass criteria:
  - every status is 200 or 503 (no 5xx other than 503, no connection errors);
  - every 503 seen by the probe carries Retry-After;
  - p99 latency of the 200s is under REQUEST_TIMEOUT_S;
  - RSS growth from the mean of the first 10 s to the mean of the last 10 s is under 10%;
  - within 2 s of the load stopping, a single request takes normal time again.
Writes the figures to benchmarks/overload_results.md (or --out) and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.servers import free_port  # noqa: E402
from mnist_service.settings import Settings  # noqa: E402
from mnist_service.tools.client import ServerNotReady, wait_until_ready  # noqa: E402
from mnist_service.tools.images import png_bytes, test_digit, user_digit  # noqa: E402


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        kids.extend(int(k) for k in text)
    return kids


def rss_mb(pid: int) -> float:
    """Resident memory of the server and all its worker processes, in MB."""
    total_kb = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
            pending.extend(_children(current))
        except FileNotFoundError:
            continue  # a process that exited between the listing and the read
    if not total_kb:
        raise RuntimeError("no VmRSS")
    return total_kb / 1024


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    try:
        wait_until_ready(url, lambda: proc.poll() is None, timeout, interval=0.2)
    except ServerNotReady as exc:
        raise SystemExit(f"{exc} (exit code {proc.returncode})") from None


def single_latencies(client: httpx.Client, body: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post("/predict", content=body, headers={"Content-Type": "image/png"})
        out.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return out


class Sampler(threading.Thread):
    """RSS of the server every second, and a probe that reads the headers of 503 answers."""

    def __init__(self, pid: int, url: str, body: bytes) -> None:
        super().__init__(daemon=True)
        self.pid, self.url, self.body = pid, url, body
        self.rss: list[tuple[float, float]] = []
        self.probe = Counter[str]()
        self.stop = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        next_sample = started
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                if time.monotonic() >= next_sample:
                    self.rss.append((time.monotonic() - started, rss_mb(self.pid)))
                    next_sample += 1.0
                try:
                    r = client.post("/predict", content=self.body, headers={"Content-Type": "image/png"})
                    key = str(r.status_code)
                    if r.status_code == 503:
                        key += " with Retry-After" if r.headers.get("retry-after") else " WITHOUT Retry-After"
                    self.probe[key] += 1
                except httpx.HTTPError as exc:
                    self.probe[type(exc).__name__] += 1
                self.stop.wait(0.05)


def run_hey(url: str, body_file: Path, duration: float, concurrency: int, timeout_s: int) -> list[tuple[float, int]]:
    """(latency ms, status) per request; status 0 for a request that got no HTTP answer."""
    out = subprocess.run(
        ["hey", "-z", f"{duration}s", "-c", str(concurrency), "-m", "POST", "-T", "image/png",
         "-D", str(body_file), "-t", str(timeout_s), "-o", "csv", f"{url}/predict"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = csv.DictReader(io.StringIO(out))
    return [(float(r["response-time"]) * 1000, int(r["status-code"] or 0)) for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mnist_cnn.pt")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--env", action="append", default=[], help="server env override KEY=VALUE (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "overload_results.md")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        raise SystemExit("needs the hey load generator: apt-get install -y hey")

    env_overrides = dict(kv.split("=", 1) for kv in args.env)
    settings = Settings(**{k.lower(): v for k, v in env_overrides.items()})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = png_bytes(user_digit(test_digit(0)[0]))
    fd, name = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    body_file = Path(name)
    body_file.write_bytes(body)
    log = tempfile.NamedTemporaryFile(prefix="overload-server-", suffix=".log", delete=False)
    print(f"server log: {log.name}", flush=True)
    proc = subprocess.Popen(
        [sys.executable, "model_inference.py", "--model", str(args.model), "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, **env_overrides}, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        wait_ready(url, proc)
        with httpx.Client(base_url=url, timeout=30) as client:
            single_latencies(client, body, 20)  # warm the connection and the code paths
            baseline = single_latencies(client, body, 100)
        base_p50, base_p99 = np.percentile(baseline, 50), np.percentile(baseline, 99)
        normal_ms = max(3 * base_p50, base_p99)

        sampler = Sampler(proc.pid, url, body)
        sampler.start()
        print(f"load: {args.concurrency} clients for {args.duration:g}s against {url} ...", flush=True)
        results = run_hey(url, body_file, args.duration, args.concurrency, int(settings.request_timeout_s * 4))
        load_end = time.monotonic()
        sampler.stop.set()

        # Recovery: single requests right after the load, until one takes normal time again.
        recovery_s, recovered_ms = None, []
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.monotonic() - load_end < 5 and recovery_s is None:
                ms = single_latencies(client, body, 1)[0]
                recovered_ms.append(ms)
                if ms <= normal_ms:
                    recovery_s = time.monotonic() - load_end
        sampler.join(timeout=35)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        body_file.unlink(missing_ok=True)

    statuses = Counter(status for _, status in results)
    ok_ms = [ms for ms, status in results if status == 200]
    other = {s: n for s, n in statuses.items() if s not in (200, 503)}
    p = {q: float(np.percentile(ok_ms, q)) if ok_ms else float("nan") for q in (50, 90, 99)}
    rss = [mb for _, mb in sampler.rss]
    first, last = statistics.mean(rss[:10]), statistics.mean(rss[-10:])
    growth = (last - first) / first
    missing_retry_after = sum(n for k, n in sampler.probe.items() if "WITHOUT" in k)
    probe_other = {k: n for k, n in sampler.probe.items() if not (k == "200" or k.startswith("503"))}

    probed_503 = sum(n for k, n in sampler.probe.items() if k.startswith("503"))
    checks: dict[str, bool | None] = {
        "only 200 and 503 (no other status, no connection error)": not other and not probe_other,
        # None (n/a) when the probe met no 503 at all: nothing was shown either way.
        "every probed 503 has Retry-After": missing_retry_after == 0 if probed_503 else None,
        f"p99 of 200s under REQUEST_TIMEOUT_S ({settings.request_timeout_s:g} s)":
            bool(ok_ms) and p[99] < settings.request_timeout_s * 1000,
        "RSS growth first 10 s -> last 10 s under 10%": len(rss) >= 20 and growth < 0.10,
        "a single request is normal again within 2 s": recovery_s is not None and recovery_s <= 2.0,
        "server still alive": alive,
    }
    total = len(results)
    lines = [
        "# Overload benchmark results",
        "",
        f"`python benchmarks/overload.py --duration {args.duration:g} --concurrency {args.concurrency}"
        + "".join(f" --env {kv}" for kv in args.env) + "`",
        "",
        f"- machine: {os.cpu_count()} cores ({platform.machine()}), shared with the load generator (hey) "
        "and other jobs; figures are noisy",
        f"- server settings: MAX_QUEUE={settings.max_queue}, REQUEST_TIMEOUT_S={settings.request_timeout_s:g}, "
        f"MAX_BATCH_SIZE={settings.max_batch_size}, MAX_BATCH_DELAY_MS={settings.max_batch_delay_ms:g}, "
        f"TORCH_THREADS={settings.torch_threads}",
        f"- baseline single request (idle server, keep-alive): p50 {base_p50:.2f} ms, p99 {base_p99:.2f} ms",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests (hey) | {total} in {args.duration:g} s = {total / args.duration:.0f} req/s |",
        f"| 200 | {statuses.get(200, 0)} ({statuses.get(200, 0) / max(total, 1):.1%}) |",
        f"| 503 | {statuses.get(503, 0)} ({statuses.get(503, 0) / max(total, 1):.1%}) |",
        f"| anything else | {sum(other.values())} {dict(other) or ''} |",
        f"| probe (httpx, 1 client, every 50 ms) | {dict(sampler.probe)} |",
        f"| latency of 200s | p50 {p[50]:.0f} ms, p90 {p[90]:.0f} ms, p99 {p[99]:.0f} ms |",
        f"| RSS | first 10 s {first:.0f} MB, last 10 s {last:.0f} MB, growth {growth:+.1%}, "
        f"max {max(rss):.0f} MB ({len(rss)} samples) |",
        f"| recovery | first normal single request (<= {normal_ms:.1f} ms) "
        + (f"{recovery_s:.2f} s after the load" if recovery_s is not None else "NOT within 5 s")
        + f"; latencies {', '.join(f'{ms:.1f}' for ms in recovered_ms[:5])} ms |",
        "",
        "| check | result |",
        "|---|---|",
        *(f"| {name} | {'n/a' if ok is None else 'PASS' if ok else 'FAIL'} |" for name, ok in checks.items()),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    args.out.write_text(report)
    return 0 if all(ok is not False for ok in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
