"""What capture costs on the request path: req/s and server CPU per request at concurrency 32, with
CAPTURE_SAMPLE=1 (every prediction captured into a SQLite file, or a PostgreSQL server of its own
with `--database postgresql`) against CAPTURE_SAMPLE=0. The issue's limit is 10 % on both.

    .venv/bin/python scripts/bench_capture.py [--rounds 10] [--seconds 6] [--prefill 0] [--database sqlite]

Two real servers (model_inference.py, 2 workers, hot path on) run side by side for the whole
benchmark, one per setting; the idle one uses next to no CPU. Each round loads one, then the other,
for `--seconds` each, in alternating order, with the service's own load generator
(benchmarks/stress_client.py) posting one 28x28 MNIST PNG. Short bursts alternated many times, rather
than a server started per run, put the two settings a few seconds apart, so that the shared machine's
drift moves both sides of a round alike.

CPU is every server process's user + system time from /proc, read before a burst and again once the
captured server's writers have written the burst's last batch, so every capture's write counts. After
each burst (either setting) the disk is synced, so the kernel writes the burst's pages back before
the next burst starts, not during it; that write-back is kernel work outside the server's processes
and is not counted. With PostgreSQL, its server's processes are measured apart from the service's
(in production they run elsewhere) and printed as the database's CPU per captured image. The
captured server's table grows through the run, as a serving one's does; `--prefill N` starts it
with N rows already stored.

The verdict is the median over rounds of each round's ratio (on / off). The captured server's own
mnist_capture_writer_cpu_seconds_total gives the writer threads' CPU per captured image, a direct
measure that the machine's drift does not blur. Prints a Markdown table, the per-round ratios with
their quartiles, the writers' CPU, the rows the database gained, and a verdict line, and writes them all to
benchmarks/out/capture-cost.json with the load average during the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load import run_stress  # noqa: E402
from benchmarks.postgres import temporary_postgres  # noqa: E402
from benchmarks.server_cpu import cpu_seconds  # noqa: E402
from benchmarks.servers import running, server_spec  # noqa: E402
from mnist_service.capture.store import CaptureStore, as_batches  # noqa: E402
from mnist_service.data import load_split  # noqa: E402
from mnist_service.inference.images import png_bytes  # noqa: E402
from mnist_service.serving.middleware import request_id_for  # noqa: E402
from mnist_service.tools.stress import Payload, build_payload  # noqa: E402

LIMIT = 0.10  # the issue's: capture may cost at most 10 % of req/s and of CPU per request


def _prefill(url: str, rows: int, digits: np.ndarray) -> None:
    """Store `rows` captures of the last hour, with server-made request ids, of the first 1,000 `digits`."""
    store = CaptureStore(url)
    probs = np.full((1, 10), 0.1, dtype=np.float32)
    start = time.time() - 3600
    for done in range(0, rows, 5000):
        chunk = range(done, min(rows, done + 5000))
        store.insert_batches(as_batches([(request_id_for(None), "/predict", "1", digits[i % 1000][None], probs,
                                          start + 3600 * i / rows) for i in chunk]))
    store.close()


def _burst(url: str, pid: int, database_pid: int | None, payload: Payload, concurrency: int, seconds: float,
           folder: Path) -> dict[str, float]:
    """Load one server for `seconds`; its req/s, and its CPU per request once its writers are done (and
    a PostgreSQL server's, per captured image)."""
    writer_before, captured_before = _capture_counters(url)
    cpu_before = cpu_seconds(pid)
    database_before = cpu_seconds(database_pid) if database_pid else 0.0
    result = run_stress(url, payload, folder / "body", concurrency, seconds, folder / "run.json")
    time.sleep(1.5)  # the writers' last batch (they write every 0.5 s), for either setting alike
    cpu = cpu_seconds(pid) - cpu_before
    database_cpu = cpu_seconds(database_pid) - database_before if database_pid else 0.0
    writer_after, captured_after = _capture_counters(url)
    captured = captured_after - captured_before
    os.sync()  # this burst's pages go to the disk now, not during the next burst
    time.sleep(0.5)
    return {"rps": result.rps, "cpu_ms": 1000 * cpu / max(result.requests, 1), "p99_ms": result.p99_ms,
            "errors": result.errors, "requests": result.requests, "captured": captured,
            "writer_us": 1e6 * (writer_after - writer_before) / max(captured, 1),
            "database_us": 1e6 * database_cpu / max(captured, 1), "load_average": os.getloadavg()[0]}


def _capture_counters(url: str) -> tuple[float, float]:
    """The server's capture writer threads' CPU so far (mnist_capture_writer_cpu_seconds_total) and the
    images they have written (mnist_captures_total)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:  # nosec B310  # our server
        text = response.read().decode()
    values = {sample.name: sample.value for family in text_string_to_metric_families(text)
              for sample in family.samples}
    return values["mnist_capture_writer_cpu_seconds_total"], values["mnist_captures_total"]


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mnist_cnn.pt")
    parser.add_argument("--rounds", type=int, default=10, help="rounded up to an even number")
    parser.add_argument("--seconds", type=float, default=6.0, help="each burst's length")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=0, help="captures already stored when the run starts")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                        help="a SQLite file, or a PostgreSQL server of the benchmark's own (benchmarks/postgres.py)")
    parser.add_argument("--port", type=int, default=8765, help="the uncaptured server's; the captured one's is next")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "capture-cost.json")
    args = parser.parse_args()
    args.rounds += args.rounds % 2
    runs: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
    load_before = os.getloadavg()[0]
    digits = load_split(ROOT / "data" / "mnist", "test").images
    payload = build_payload(png_bytes(Image.fromarray(digits[0])))
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        database, database_pid = str(folder / "captures.sqlite3"), None
        if args.database == "postgresql":
            postgres = stack.enter_context(temporary_postgres())
            database, database_pid = postgres.url, postgres.pid
        if args.prefill:
            _prefill(database, args.prefill, digits)
        servers: dict[str, tuple[str, int]] = {}
        for sample, port in (("0", args.port), ("1", args.port + 1)):
            env = {"CAPTURE_SAMPLE": sample, "CAPTURE_DATABASE": database, "WORKERS": "2", "ACCESS_LOG": "off",
                   "GRPC_PORT": "0"}
            url = f"http://127.0.0.1:{port}"
            pid = stack.enter_context(running(server_spec("ours", args.model, port, env=env), url, payload,
                                              folder / f"server-{sample}.log"))
            servers[sample] = (url, pid)
        time.sleep(2)  # both workers of each up
        for url, _ in servers.values():  # warm-up
            run_stress(url, payload, folder / "body", args.concurrency, 2, folder / "warm.json")
        time.sleep(1.5)
        stored_before = CaptureStore(database).count()
        for round_ in range(args.rounds):
            for sample in ("0", "1") if round_ % 2 == 0 else ("1", "0"):
                run = _burst(*servers[sample], database_pid, payload, args.concurrency, args.seconds, folder)
                runs[sample].append(run)
                print(f"round {round_ + 1} CAPTURE_SAMPLE={sample}: {run}", file=sys.stderr)
        stored = CaptureStore(database).count() - stored_before
    off_runs, on_runs = runs["0"], runs["1"]
    rps_cost = [1 - on["rps"] / off["rps"] for off, on in zip(off_runs, on_runs, strict=True)]
    cpu_cost = [on["cpu_ms"] / off["cpu_ms"] - 1 for off, on in zip(off_runs, on_runs, strict=True)]
    median = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    rps_q, cpu_q = _quartiles(rps_cost), _quartiles(cpu_cost)
    rps, cpu = rps_q[1], cpu_q[1]
    verdict = "PASS" if rps <= LIMIT and cpu <= LIMIT else "FAIL"
    loads = [load_before] + [r["load_average"] for rs in runs.values() for r in rs]
    print(f"| CAPTURE_SAMPLE | req/s | server CPU ms/request | p99 ms | errors | captured |  (c={args.concurrency}, "
          f"median of {args.rounds} bursts of {args.seconds:g} s, {args.prefill} rows stored before)")
    print("|---|---|---|---|---|---|")
    for sample, m in (("0", median["0"]), ("1", median["1"])):
        captured, requests = (sum(r[k] for r in runs[sample]) for k in ("captured", "requests"))
        print(f"| {sample} | {m['rps']:.0f} | {m['cpu_ms']:.3f} | {m['p99_ms']:.1f} | {m['errors']:.0f} | "
              f"{captured:.0f} of {requests:.0f} |")
    print("per round, capture on vs off: req/s " + ", ".join(f"{-100 * c:+.1f} %" for c in rps_cost)
          + "; CPU per request " + ", ".join(f"{100 * c:+.1f} %" for c in cpu_cost))
    print(f"quartiles over rounds: req/s {-100 * rps_q[2]:+.1f} / {-100 * rps_q[1]:+.1f} / {-100 * rps_q[0]:+.1f} %, "
          f"CPU per request {100 * cpu_q[0]:+.1f} / {100 * cpu_q[1]:+.1f} / {100 * cpu_q[2]:+.1f} %")
    writer_us = statistics.median(r["writer_us"] for r in on_runs)
    share = writer_us / (1000 * median["0"]["cpu_ms"])
    print(f"capture writer threads' CPU per captured image (mnist_capture_writer_cpu_seconds_total): median "
          f"{writer_us:.1f} µs, {100 * share:.1f} % of an uncaptured request's CPU")
    if database_pid:
        database_us = statistics.median(r["database_us"] for r in on_runs)
        print(f"the PostgreSQL server's own CPU per captured image (its processes, not counted above): median "
              f"{database_us:.1f} µs, {100 * database_us / (1000 * median['0']['cpu_ms']):.1f} % of an uncaptured "
              "request's CPU")
    captured = sum(r["captured"] for r in on_runs)
    print(f"rows the {args.database} database gained during the rounds: {stored} for {captured:.0f} images captured")
    print(f"load average (1 min) during the run: {min(loads):.2f} to {max(loads):.2f} on {os.cpu_count()} CPUs")
    spread = max(rps_q[2] - rps_q[0], cpu_q[2] - cpu_q[0])
    if spread > LIMIT:
        print(f"warning: the middle half of the rounds spreads over {100 * spread:.0f} points, more than the limit: "
              "the machine's other work decides this verdict; re-run it on a quiet machine")
    print(f"capture cost: req/s {-100 * rps:+.1f} %, CPU/request {100 * cpu:+.1f} % (median of {args.rounds} "
          f"paired rounds) -> {verdict} (limit: 10 % each)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "concurrency": args.concurrency, "seconds": args.seconds,
        "rounds": args.rounds, "prefill": args.prefill, "runs": runs, "rps_cost": rps_cost, "cpu_cost": cpu_cost,
        "median_rps_cost": rps, "median_cpu_cost": cpu, "median_writer_us": writer_us,
        "database": args.database, "stored": stored, "verdict": verdict, "limit": LIMIT, "spread": spread,
        "load_average": {"min": min(loads), "max": max(loads)}, "cpus": os.cpu_count(),
    }, indent=2) + "\n")
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
