"""What capture costs on the request path: req/s and server CPU per request at concurrency 32, with
CAPTURE_SAMPLE=1 (every prediction captured into a SQLite file) against CAPTURE_SAMPLE=0. The
issue's limit is 10 % on both.

    .venv/bin/python scripts/bench_capture.py [--rounds 6] [--seconds 10] [--prefill 0]

Each round starts the same real server (model_inference.py, 2 workers, hot path on) once per
setting, the two in alternating order, and loads it with the service's own load generator
(benchmarks/stress_client.py) posting one 28x28 MNIST PNG; CPU is every server process's user +
system time from /proc. The verdict is the median over rounds of each round's ratio (on / off): a
round's two runs are a minute apart, so a machine whose load drifts moves both. The second run of a
round measured a few percent slower in either order, so the rounds are an even number (each order
counts as often), and every run starts after the last one's files are deleted and synced. `--prefill N`
starts every captured run with N rows already stored, as a server that has captured for a while has
(the insert's cost grows with the table). Prints a Markdown table, the per-round ratios and a verdict
line, and writes them all to benchmarks/out/capture-cost.json with the load average during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.load import run_stress  # noqa: E402
from benchmarks.server_cpu import cpu_seconds  # noqa: E402
from benchmarks.servers import running, server_spec  # noqa: E402
from mnist_service.capture.store import CaptureStore, as_rows  # noqa: E402
from mnist_service.data import load_split  # noqa: E402
from mnist_service.inference.images import png_bytes  # noqa: E402
from mnist_service.serving.middleware import request_id_for  # noqa: E402
from mnist_service.tools.stress import build_payload  # noqa: E402

LIMIT = 0.10  # the issue's: capture may cost at most 10 % of req/s and of CPU per request


def _prefilled(folder: Path, rows: int) -> Path:
    """A capture database holding `rows` captures of the last hour, with server-made request ids."""
    database = folder / "prefilled.sqlite3"
    store = CaptureStore(str(database))
    digits = load_split(ROOT / "data" / "mnist", "test").images[:1000]
    probs = np.full((1, 10), 0.1, dtype=np.float32)
    start = time.time() - 3600
    for done in range(0, rows, 5000):
        chunk = range(done, min(rows, done + 5000))
        store.insert(as_rows([(request_id_for(None), "/predict", "1", digits[i % 1000][None], probs,
                               start + 3600 * i / rows) for i in chunk]))
    store.close()
    return database


def _measure(model: Path, sample: str, folder: Path, concurrency: int, seconds: float, port: int,
             template: Path | None) -> dict[str, float]:
    database = folder / f"captures-{time.monotonic_ns()}.sqlite3"
    if template is not None and sample != "0":
        shutil.copyfile(template, database)
    env = {"CAPTURE_SAMPLE": sample, "CAPTURE_DATABASE": str(database), "WORKERS": "2", "ACCESS_LOG": "off",
           "GRPC_PORT": "0"}
    spec = server_spec("ours", model, port, env=env)
    url = f"http://127.0.0.1:{port}"
    payload = build_payload(png_bytes(Image.fromarray(load_split(ROOT / "data" / "mnist", "test").images[0])))
    try:
        with running(spec, url, payload, folder / f"server-{sample}.log") as pid:
            time.sleep(2)  # both workers up
            run_stress(url, payload, folder / "body", concurrency, 2, folder / "warm.json")  # warm-up
            time.sleep(1.5)  # the warm-up's captures written
            captured_before = CaptureStore(str(database)).count() if database.exists() else 0
            cpu_before = cpu_seconds(pid)
            result = run_stress(url, payload, folder / "body", concurrency, seconds, folder / "run.json")
            cpu = cpu_seconds(pid) - cpu_before
            time.sleep(1.5)  # the writers' last batch
            captured = (CaptureStore(str(database)).count() if database.exists() else 0) - captured_before
        return {"rps": result.rps, "cpu_ms": 1000 * cpu / max(result.requests, 1), "p99_ms": result.p99_ms,
                "errors": result.errors, "requests": result.requests, "captured": captured,
                "load_average": os.getloadavg()[0]}
    finally:
        for leftover in folder.glob(f"{database.name}*"):
            leftover.unlink()
        os.sync()  # the captured run's writes reach the disk now, not during the next run
        time.sleep(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "mnist_cnn.pt")
    parser.add_argument("--rounds", type=int, default=6, help="rounded up to an even number")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=0, help="captures already stored when a captured run starts")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "capture-cost.json")
    args = parser.parse_args()
    args.rounds += args.rounds % 2
    runs: dict[str, list[dict[str, float]]] = {"0": [], "1": []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        template = _prefilled(Path(tmp), args.prefill) if args.prefill else None
        for round_ in range(args.rounds):
            for sample in ("0", "1") if round_ % 2 == 0 else ("1", "0"):
                run = _measure(args.model, sample, Path(tmp), args.concurrency, args.seconds, args.port, template)
                runs[sample].append(run)
                print(f"round {round_ + 1} CAPTURE_SAMPLE={sample}: {run}", file=sys.stderr)
    off_runs, on_runs = runs["0"], runs["1"]
    rps_cost = [1 - on["rps"] / off["rps"] for off, on in zip(off_runs, on_runs, strict=True)]
    cpu_cost = [on["cpu_ms"] / off["cpu_ms"] - 1 for off, on in zip(off_runs, on_runs, strict=True)]
    median = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
    rps, cpu = statistics.median(rps_cost), statistics.median(cpu_cost)
    verdict = "PASS" if rps <= LIMIT and cpu <= LIMIT else "FAIL"
    loads = [load_before] + [r["load_average"] for rs in runs.values() for r in rs]
    print(f"| CAPTURE_SAMPLE | req/s | server CPU ms/request | p99 ms | errors | captured |  (c={args.concurrency}, "
          f"median of {args.rounds} x {args.seconds:g} s, {args.prefill} rows stored before)")
    print("|---|---|---|---|---|---|")
    for sample, m in (("0", median["0"]), ("1", median["1"])):
        print(f"| {sample} | {m['rps']:.0f} | {m['cpu_ms']:.3f} | {m['p99_ms']:.1f} | {m['errors']:.0f} | "
              f"{m['captured']:.0f} of {m['requests']:.0f} |")
    print("per round, capture on vs off: req/s " + ", ".join(f"{-100 * c:+.1f} %" for c in rps_cost)
          + "; CPU per request " + ", ".join(f"{100 * c:+.1f} %" for c in cpu_cost))
    print(f"load average (1 min) during the run: {min(loads):.2f} to {max(loads):.2f} on {os.cpu_count()} CPUs")
    spread = max(max(rps_cost) - min(rps_cost), max(cpu_cost) - min(cpu_cost))
    if spread > 2 * LIMIT:
        print(f"warning: the rounds spread over {100 * spread:.0f} points, more than twice the limit: the machine's "
              "other work decides this verdict; re-run it on a quiet machine")
    print(f"capture cost: req/s {-100 * rps:+.1f} %, CPU/request {100 * cpu:+.1f} % (median of {args.rounds} "
          f"paired rounds) -> {verdict} (limit: 10 % each)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "concurrency": args.concurrency, "seconds": args.seconds,
        "rounds": args.rounds, "prefill": args.prefill, "runs": runs, "rps_cost": rps_cost, "cpu_cost": cpu_cost,
        "median_rps_cost": rps, "median_cpu_cost": cpu, "verdict": verdict, "limit": LIMIT, "spread": spread,
        "load_average": {"min": min(loads), "max": max(loads)}, "cpus": os.cpu_count(),
    }, indent=2) + "\n")
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
