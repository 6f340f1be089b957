"""In-process speed of our network against a ~19 M-MAC reference CNN, both as served, on one thread.

    .venv/bin/python -m benchmarks.model_speed [--model models/mnist_cnn.pt]

Both go through torch.jit.script and mnist_service.inference.model.optimize_for_serving (freeze + inference
passes), then run at batch 1 and batch 64 with torch.set_num_threads(1). Images/s is the median
over repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mnist_service.inference.model import Net, count_macs, optimize_for_serving


def reference_net() -> nn.Module:
    """The common 'bigger' MNIST CNN: 4 conv3x3-BN-ReLU (32, 32, 64, 64), pooling after conv2 and conv4."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # 28 -> 14
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 14 -> 7
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    ).eval()


def served(module: nn.Module) -> torch.jit.ScriptModule:
    return optimize_for_serving(torch.jit.script(module.eval()))


def images_per_second(module: torch.jit.ScriptModule, batch: int, repeats: int, seconds: float) -> float:
    """Median images/s over `repeats` timed loops of about `seconds` each, after a warm-up."""
    x = torch.randn(batch, 1, 28, 28)
    with torch.inference_mode():
        for _ in range(20):
            module(x)
        started, calls = time.perf_counter(), 0
        while time.perf_counter() - started < seconds / 4:  # size the timed loop from a short trial
            module(x)
            calls += 1
        per_loop = max(1, round(calls * seconds / (time.perf_counter() - started)))
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(per_loop):
                module(x)
            rates.append(batch * per_loop / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"),
                        help="our exported model; a fresh mnist_service.inference.model.Net if the file is missing")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed loop")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.model.is_file():
        ours = optimize_for_serving(torch.jit.load(str(args.model), map_location="cpu").eval())
        our_macs = int(json.loads(args.model.with_suffix(".json").read_text())["macs"])
        our_name = str(args.model)
    else:
        net = Net().eval()
        ours, our_macs, our_name = served(net), count_macs(net), "mnist_service.inference.model.Net()"
    ref = reference_net()
    ref_macs = count_macs(ref)
    reference = served(ref)

    results: dict[str, dict[str, float]] = {"ours": {"macs": our_macs}, "reference": {"macs": ref_macs}}
    for batch in (1, 64):
        # Alternate the two so that a noisy neighbour hurts both alike.
        for name, module in (("ours", ours), ("reference", reference)):
            results[name][f"batch_{batch}"] = images_per_second(module, batch, args.repeats, args.seconds)

    print(f"ours: {our_name}; reference: 4x conv3x3 (32,32,64,64) + linear; torch {torch.__version__}, 1 thread")
    print(f"{'':<10}{'MACs':>12}{'img/s b=1':>12}{'img/s b=64':>12}")
    for name, r in results.items():
        print(f"{name:<10}{r['macs']:>12,.0f}{r['batch_1']:>12,.0f}{r['batch_64']:>12,.0f}")
    ratio = {k: results["ours"][k] / results["reference"][k] for k in ("batch_1", "batch_64")}
    print(f"{'ours/ref':<10}{ref_macs / our_macs:>11.1f}x{ratio['batch_1']:>11.1f}x{ratio['batch_64']:>11.1f}x"
          "   (MACs column: how many times fewer)")
    if args.json:
        args.json.write_text(json.dumps({**results, "speedup": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
