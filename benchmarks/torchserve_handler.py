"""TorchServe handler doing our server's work: decode, the service's preprocessing, one batched forward.

TorchServe batches in its Java frontend and hands each Python worker a list of up to `batchSize`
requests, the raw image body of each under `data` or `body`. benchmarks/torchserve_setup.py archives this
file with the model and its .json metadata, and starts TorchServe with the repo root on PYTHONPATH.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.peer_model import PeerModel
from mnist_service.inference.preprocess import image_to_digit


class MnistHandler:
    def initialize(self, context: Any) -> None:  # a ts.context.Context
        # Two workers on two cores: more intra-op threads per worker would only contend.
        torch.set_num_threads(1)
        model_dir = Path(context.system_properties["model_dir"])
        self.peer = PeerModel(model_dir / context.manifest["model"]["serializedFile"])

    def handle(self, requests: list[dict], context: Any) -> list[dict]:
        digits = np.stack([image_to_digit(bytes(r.get("data") or r.get("body"))) for r in requests])
        return [self.peer.answer(p) for p in self.peer.probabilities(digits)]
