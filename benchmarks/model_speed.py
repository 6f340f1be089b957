"""In-process speed of our network under each runtime, against a ~19 M-MAC reference CNN, on one thread.

    .venv/bin/python -m benchmarks.model_speed [--model models/mnist_cnn.pt]

Each network runs as the server runs it: TorchScript through torch.jit.script and
inference/torchscript_runtime.optimize_for_serving (freeze + inference passes), ONNX Runtime through
inference/onnx_runtime.session (one intra-op thread, no spinning, all graph optimisations), both through the
runtime's `forward` (softmax included), with one thread. Our model file's .onnx is used when it is beside it
(else a fresh export). Images/s is the median over repeats after a warm-up; the four are alternated per
batch size, so a noisy neighbour hurts them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from torch import nn

from mnist_service.inference import onnx_runtime, runtime
from mnist_service.inference.torchscript_runtime import TorchScriptRuntime, optimize_for_serving
from mnist_service.training.export import export_onnx
from mnist_service.training.model import Net, count_macs

BATCHES = (1, 32, 64)


def reference_net() -> nn.Module:
    """The common 'bigger' MNIST CNN: 4 conv3x3-BN-ReLU (32, 32, 64, 64), pooling after conv2 and conv4."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2),  # 28 -> 14
        *block(32, 64), *block(64, 64), nn.MaxPool2d(2),  # 14 -> 7
        nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
    ).eval()


def runtimes_of(net: nn.Module, folder: Path) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """A network under both runtimes, as served."""
    onnx_file = folder / f"{id(net)}.onnx"
    export_onnx(net, onnx_file)
    return {
        "torchscript": TorchScriptRuntime(optimize_for_serving(torch.jit.script(net.eval()))).forward,
        "onnxruntime": onnx_runtime.OnnxRuntime(onnx_runtime.session(onnx_file)).forward,
    }


def images_per_second(forward: Callable[[np.ndarray], np.ndarray], batch: int, repeats: int, seconds: float) -> float:
    """Median images/s over `repeats` timed loops of about `seconds` each, after a warm-up."""
    x = np.random.default_rng(0).standard_normal((batch, 1, 28, 28), dtype=np.float32)
    for _ in range(20):
        forward(x)
    started, calls = time.perf_counter(), 0
    while time.perf_counter() - started < seconds / 4:  # size the timed loop from a short trial
        forward(x)
        calls += 1
    per_loop = max(1, round(calls * seconds / (time.perf_counter() - started)))
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(per_loop):
            forward(x)
        rates.append(batch * per_loop / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"),
                        help="our exported model (with its .onnx); a fresh training.model.Net if the file is missing")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed loop")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="model-speed-") as tmp:
        if args.model.is_file():
            metadata = args.model.with_suffix(".json")
            ours = {name: runtime.load(name, args.model, metadata)[0].forward for name in runtime.RUNTIMES}
            our_macs, our_name = int(json.loads(metadata.read_text())["macs"]), str(args.model)
        else:
            net = Net().eval()
            ours, our_macs, our_name = runtimes_of(net, Path(tmp)), count_macs(net), "training.model.Net()"
        ref = reference_net()
        ref_macs = count_macs(ref)
        reference = runtimes_of(ref, Path(tmp))
        contenders = {f"ours/{k}": v for k, v in ours.items()} | {f"reference/{k}": v for k, v in reference.items()}
        results: dict[str, dict[str, float]] = {
            name: {"macs": our_macs if name.startswith("ours") else ref_macs} for name in contenders
        }
        for batch in BATCHES:
            for name, forward in contenders.items():
                results[name][f"batch_{batch}"] = images_per_second(forward, batch, args.repeats, args.seconds)

    print(f"ours: {our_name}; reference: 4x conv3x3 (32,32,64,64) + linear; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}; 1 thread")
    print(f"{'':<24}{'MACs':>12}" + "".join(f"{f'img/s b={b}':>13}" for b in BATCHES))
    for name, r in results.items():
        print(f"{name:<24}{r['macs']:>12,.0f}" + "".join(f"{r[f'batch_{b}']:>13,.0f}" for b in BATCHES))
    ratios = {
        "ours onnxruntime/torchscript": {
            f"batch_{b}": results["ours/onnxruntime"][f"batch_{b}"] / results["ours/torchscript"][f"batch_{b}"]
            for b in BATCHES
        },
        "ours/reference (torchscript)": {
            f"batch_{b}": results["ours/torchscript"][f"batch_{b}"] / results["reference/torchscript"][f"batch_{b}"]
            for b in BATCHES
        },
    }
    for name, ratio in ratios.items():
        print(f"{name:<36}" + "".join(f"{ratio[f'batch_{b}']:>13.2f}x" for b in BATCHES))
    if args.json:
        args.json.write_text(json.dumps({**results, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
