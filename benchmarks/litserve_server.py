"""LitServe serving the same model and preprocessing, with batching on, for the comparison.

Runs in its own venv (benchmarks/run.py makes .venv-litserve) with the repo root on PYTHONPATH:

    PYTHONPATH=. .venv-litserve/bin/python benchmarks/litserve_server.py --model models/mnist_cnn.pt --port 8002
"""

from __future__ import annotations

import argparse
from pathlib import Path

import litserve as ls
import numpy as np
import torch

from benchmarks.peer_model import PeerModel
from mnist_service.inference.preprocess import image_to_digit


class MnistAPI(ls.LitAPI):
    def __init__(self, model_path: Path, threads: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.model_path = model_path
        self.threads = threads

    def setup(self, device: str) -> None:
        torch.set_num_threads(self.threads)
        self.peer = PeerModel(self.model_path)

    def decode_request(self, request):  # a starlette FormData for multipart uploads
        return image_to_digit(request["file"].file.read())

    def predict(self, digits: np.ndarray) -> np.ndarray:
        return self.peer.probabilities(digits)

    def encode_response(self, probs: np.ndarray) -> dict:
        return self.peer.answer(probs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mnist_cnn.pt"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the worker")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout", type=float, default=0.002, help="seconds")
    parser.add_argument("--fast-queue", action="store_true", help="ZeroMQ between the API server and the worker")
    args = parser.parse_args()
    api = MnistAPI(args.model, args.threads, max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=args.fast_queue)
    server.run(host=args.host, port=args.port, generate_client_file=False)


if __name__ == "__main__":
    main()
