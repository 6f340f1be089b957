"""Classify images with a running server: `python client.py digit.png [more.png ...] [--url URL] [--json]`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from mnist_service.tools.client import DEFAULT_URL, MnistClient, ServiceClientError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server base URL (default {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print the full JSON answers")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    parser.add_argument("--api-key", help="API key, when the server has API_KEY set")
    args = parser.parse_args()
    failures = 0
    with MnistClient(args.url, timeout=args.timeout, api_key=args.api_key) as client:
        for path in args.images:
            try:
                answer = client.predict(path)
            except (ServiceClientError, OSError, httpx.HTTPError) as exc:
                failures += 1
                print(f"{path}: error: {exc}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps({"file": str(path), **answer}))
            else:
                print(f"{path}: {answer['prediction']} (confidence {answer['confidence']:.1%})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
