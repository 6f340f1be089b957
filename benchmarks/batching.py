"""Does micro-batching help? Our server under MAX_BATCH_SIZE x MAX_BATCH_DELAY_MS settings.

    .venv/bin/python -m benchmarks.batching [--quick] [--configs 1:0 32:2 ...]

Each round starts our server once per setting (alternating settings across rounds), drives
multipart PNG uploads with hey at each concurrency, and stops it. Writes benchmarks/batching.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.load import Measurement
from benchmarks.run import OUT, digit_image, machine, median_of, run_server
from benchmarks.servers import REPO, ensure_hey

DEFAULT_CONFIGS = ["1:0", "8:1", "32:0", "32:1", "32:2", "32:5", "64:2", "64:5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"))
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="MAX_BATCH_SIZE:MAX_BATCH_DELAY_MS")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 32, 128])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency point")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 s points")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "batching.md")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 2.0

    OUT.mkdir(parents=True, exist_ok=True)
    ensure_hey()
    image = digit_image(None)
    header = machine()
    raw: dict[tuple[str, int], list[Measurement]] = {}
    for r in range(args.rounds):
        for config in args.configs:
            size, delay = config.split(":")
            print(f"round {r + 1}/{args.rounds}: MAX_BATCH_SIZE={size} MAX_BATCH_DELAY_MS={delay}", flush=True)
            env = {"MAX_BATCH_SIZE": size, "MAX_BATCH_DELAY_MS": delay}
            results = run_server(
                "ours", {"model": args.model, "extra": {"env": env}}, {"photo400": image}, ["hey"], args.concurrency,
                args.duration, f"batching-{size}-{delay}-{r + 1}.log",
            )
            for (_, _, c), m in results.items():
                raw.setdefault((config, c), []).append(m)

    lines = [
        "| MAX_BATCH_SIZE | MAX_BATCH_DELAY_MS | concurrency | req/s | p50 ms | p99 ms | errors / requests |",
        "|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in args.concurrency:
        for config in args.configs:
            m = median_of(raw[config, c])
            size, delay = config.split(":")
            lines.append(f"| {size} | {delay} | {c} | {m.rps:.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | "
                         f"{m.errors} / {m.requests} |")
    table = "\n".join(lines)
    print(table)
    args.results.write_text("\n\n".join([
        "# Micro-batching settings of our server",
        "\n".join(header),
        f"Command: `python -m benchmarks.batching --rounds {args.rounds} --duration {args.duration:g} "
        f"--configs {' '.join(args.configs)}`. hey, multipart PNG uploads on loopback; settings alternated "
        "across rounds; medians over rounds.",
        table,
    ]) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
