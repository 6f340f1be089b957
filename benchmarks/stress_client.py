"""stress_testing.py's load generator sending any prebuilt request, so it can drive servers with other APIs.

stress_testing.py builds its request for our routes (/predict, /predict/pixels); TorchServe answers on
/predictions/NAME. This runs the same client (mnist_service.tools.stress) for --duration seconds
with no sequential phase, and writes the same JSON summary, plus the CPU the client used while it ran
(client_cpu_s: without Python's start-up, which would swamp a short point).

    python -m benchmarks.stress_client --url http://127.0.0.1:8080 --path /predictions/mnist \
        --body digit.png --content-type image/png --concurrency 32 --duration 10 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from mnist_service.tools.stress import Payload, run, write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", required=True, help="request path, e.g. /predict")
    parser.add_argument("--body", type=Path, required=True, help="file holding the exact request body")
    parser.add_argument("--content-type", required=True, help="application/grpc: a gRPC call, --url host:port")
    parser.add_argument("--header", action="append", default=[], help="NAME: VALUE, another HTTP header; repeatable")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    headers = tuple(tuple(part.strip() for part in h.split(":", 1)) for h in args.header)
    payload = Payload(args.path, args.body.read_bytes(), args.content_type, headers=headers)  # type: ignore[arg-type]
    started = time.process_time()  # every thread of this process (grpc's own too), after the imports
    results = asyncio.run(run(
        args.url, payload, requests=0, concurrency=args.concurrency, sequential_requests=0,
        duration_s=args.duration, timeout_s=args.timeout, progress=False,
    ))
    write_json(args.json, results, client_cpu_s=round(time.process_time() - started, 4))


if __name__ == "__main__":
    main()
