"""Measure latency and throughput of a running server: sequential, then concurrent.

    python stress_testing.py --url http://localhost:8000 --image digit.png --requests 2000 --concurrency 32
    python stress_testing.py --protocol grpc --url localhost:8001 --requests 2000 --concurrency 32
    python stress_testing.py --mode v2 --requests 2000 --concurrency 32   # the same tensor over REST
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from mnist_service.tools.images import png_bytes, test_digit, user_digit
from mnist_service.tools.stress import (
    ENDPOINTS,
    PROTOCOLS,
    build_grpc_payload,
    build_payload,
    format_report,
    run,
    write_json,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=PROTOCOLS, default="http",
                        help="grpc: ModelInfer of the Open Inference Protocol, the digit as UINT8 pixels")
    parser.add_argument("--url", help="default http://localhost:8000; with --protocol grpc, localhost:8001")
    parser.add_argument("--api-key", help="sent as X-API-Key (gRPC: metadata x-api-key)")
    parser.add_argument("--image", type=Path, help="image to send (default: a test-set digit drawn black on white)")
    parser.add_argument("--requests", type=int, default=1000, help="requests in the concurrent phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--sequential-requests", type=int, help="requests in the sequential phase (default: min(--requests, 200))"
    )
    parser.add_argument("--duration", type=float, help="run the concurrent phase for this many seconds instead")
    parser.add_argument("--mode", choices=ENDPOINTS, default="multipart",
                        help="multipart upload, raw body, pixels JSON, or v2: the digit as the UINT8 [1,28,28] tensor "
                        "--protocol grpc sends, to REST's v2 infer route as binary tensor data (HTTP only)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--json", type=Path, help="write the summary as JSON here")
    parser.add_argument("--max-error-rate", type=float, default=0.0, help="exit 1 if the error rate exceeds this")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    digit, _ = test_digit(0)
    image = args.image.read_bytes() if args.image else png_bytes(user_digit(digit))
    if args.protocol == "grpc":
        url = args.url or "localhost:8001"
        payload = build_grpc_payload(digit)
    else:
        url = args.url or "http://localhost:8000"
        payload = build_payload(image, args.mode, digit.reshape(-1).tolist())
    payload = dataclasses.replace(payload, api_key=args.api_key)
    sequential = args.sequential_requests if args.sequential_requests is not None else min(args.requests, 200)
    results = asyncio.run(
        run(
            url, payload, requests=args.requests, concurrency=args.concurrency,
            sequential_requests=sequential, duration_s=args.duration, timeout_s=args.timeout,
            progress=not args.no_progress,
        )
    )
    for name, result in results.items():
        if result.requests:
            print(format_report(name, result))
    if args.json:
        write_json(args.json, results)
    total = sum(r.requests for r in results.values())
    errors = sum(r.errors for r in results.values())
    rate = errors / total if total else 1.0
    if rate > args.max_error_rate:
        print(f"error rate {rate:.2%} exceeds --max-error-rate {args.max_error_rate:.2%}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
