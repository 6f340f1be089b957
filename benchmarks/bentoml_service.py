"""BentoML serving the same model and preprocessing, with its adaptive batching on, for the comparison.

Runs in its own venv (benchmarks/servers.py makes .venv-bentoml) with the repo root on PYTHONPATH:

    MODEL_PATH=models/mnist_cnn.pt PYTHONPATH=. .venv-bentoml/bin/bentoml serve \
        benchmarks.bentoml_service:MnistService --host 127.0.0.1 --port 8004

A batchable API takes a list and returns a list: each upload (multipart field `file`, as ours) is a
list of one file, BentoML concatenates the lists of waiting requests into one call, and each
answer is a JSON list of one prediction.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np
import torch

from benchmarks.peer_model import PeerModel
from mnist_service.inference.preprocess import image_to_digit


@bentoml.service(workers=2)
class MnistService:
    def __init__(self) -> None:
        # Two workers on two cores: more intra-op threads per worker would only contend.
        torch.set_num_threads(1)
        self.peer = PeerModel(Path(os.environ.get("MODEL_PATH", "models/mnist_cnn.pt")))

    @bentoml.api(batchable=True, max_batch_size=32)
    def predict(self, file: list[Path]) -> list[dict]:
        digits = np.stack([image_to_digit(path.read_bytes()) for path in file])
        return [self.peer.answer(p) for p in self.peer.probabilities(digits)]
