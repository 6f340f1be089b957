"""The service's model and preprocessing as the peer servers run it: one copy for LitServe, TorchServe and BentoML.

Each peer loads the same TorchScript file with the service's serving optimisation, decodes with the
service's `image_to_digit`, normalises with the model's own constants and answers like our /predict,
so the benchmark compares the servers and not the work they are given.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnist_service.inference.torchscript_runtime import optimize_for_serving


class PeerModel:
    """The TorchScript model with its metadata: probabilities for a batch, and the answer for one image."""

    def __init__(self, model_path: Path) -> None:
        metadata = json.loads(model_path.with_suffix(".json").read_text())
        norm = metadata["input"]["normalization"]
        self.mean, self.std = float(norm["mean"]), float(norm["std"])
        self.version = metadata["version"]
        self.model = optimize_for_serving(torch.jit.load(str(model_path), map_location="cpu"))

    def probabilities(self, digits: np.ndarray) -> np.ndarray:
        """(n, 28, 28) uint8 digits -> (n, 10) probabilities, in one forward pass."""
        x = torch.from_numpy(digits).float().div(255.0).sub(self.mean).div(self.std).unsqueeze(1)
        with torch.inference_mode():
            return torch.softmax(self.model(x), dim=1).numpy()

    def answer(self, probs: np.ndarray) -> dict[str, Any]:
        """One image's probabilities (10,) as our /predict answers them."""
        best = int(probs.argmax())
        return {
            "prediction": best,
            "label": str(best),
            "confidence": float(probs[best]),
            "probabilities": probs.tolist(),
            "model_version": self.version,
        }
