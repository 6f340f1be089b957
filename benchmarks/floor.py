"""The irreducible work of one request, without HTTP: decode + preprocess each image, one forward pass per batch.

    .venv/bin/python -m benchmarks.floor [--model models/mnist_cnn.pt] [--image PATH] [--batch 32]

What a server can't avoid per request, measured in one process on one thread: `image_to_digit` on the
PNG (libspng decode, crop, fit, centre), then the model as served (Predictor.forward: normalise,
TorchScript, softmax) once per batch of `--batch` images. CPU time (time.process_time) per image,
median over repeats. `make bench` runs it beside the servers, so a server's CPU per request can be read
as a multiple of this floor measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mnist_service.inference import runtime
from mnist_service.inference.predictor import Predictor
from mnist_service.inference.preprocess import image_to_digit
from mnist_service.metrics import Metrics


@dataclass(frozen=True)
class Floor:
    """CPU microseconds per image: decode + preprocess, the forward pass's share, and both."""

    preprocess_us: float
    forward_us: float

    @property
    def total_us(self) -> float:
        return self.preprocess_us + self.forward_us


def measure(
    model: Path, image: bytes, batch: int = 32, repeats: int = 7, images: int = 2048, runtime_name: str = "torchscript"
) -> Floor:
    """The floor for `image` through `model`, on one thread of the runtime, as a worker serves it."""
    loaded, metadata = runtime.load(runtime_name, model, model.with_suffix(".json"), threads=1)  # type: ignore[arg-type]
    predictor = Predictor(loaded, metadata, Metrics(), max_batch_size=batch)
    predictor.warm_up()
    digits = np.stack([image_to_digit(image)] * batch)
    prep, fwd = [], []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(images):
            image_to_digit(image)
        prep.append((time.process_time() - started) / images)
        started = time.process_time()
        for _ in range(images // batch):
            predictor.forward(digits)
        fwd.append((time.process_time() - started) / (images // batch * batch))
    return Floor(statistics.median(prep) * 1e6, statistics.median(fwd) * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"))
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    floor = measure(args.model, args.image.read_bytes(), args.batch)
    print(json.dumps({**asdict(floor), "total_us": floor.total_us, "batch": args.batch}))


if __name__ == "__main__":
    main()
