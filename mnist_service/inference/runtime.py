"""What runs a model version's forward pass: TorchScript or ONNX Runtime, behind one small protocol.

Everything above this (Predictor, registry, batcher, shadow, metrics, v2, drift, capture, gRPC) sees
only `Runtime.forward`: normalised float32 images (n, 1, 28, 28) in, probabilities (n, 10) out. Each
runtime's module is imported only when a version is loaded with it, so a server without torch (the
slim image) never touches torch, and one without onnxruntime never touches that.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mnist_service.inference.integrity import ModelLoadError
from mnist_service.settings import RuntimeName

RUNTIMES: tuple[RuntimeName, ...] = ("torchscript", "onnxruntime")
CLASS_LABELS = [str(d) for d in range(10)]
INPUT_SHAPE = [1, 1, 28, 28]

# The module of each runtime, imported on first use; each has load(model_path, metadata_path, threads).
_MODULES: dict[RuntimeName, str] = {
    "torchscript": "mnist_service.inference.torchscript_runtime",
    "onnxruntime": "mnist_service.inference.onnx_runtime",
}
# The Python package each one needs, to tell "not installed" before importing anything.
_PACKAGES: dict[RuntimeName, str] = {"torchscript": "torch", "onnxruntime": "onnxruntime"}


class Runtime(Protocol):
    """A loaded, verified, optimised model: the forward pass and what to report about it."""

    name: str  # a RuntimeName
    version: str  # the runtime library's version (torch's or onnxruntime's)
    platform: str  # as the v2 protocol (Triton) names it: pytorch_torchscript, onnxruntime_onnx

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (n, 10) float32 for normalised images (n, 1, 28, 28) float32. Thread-safe for one caller."""
        ...


def normalize(digits: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Digits (n, 28, 28) in pixel units 0-255 -> the model's input (n, 1, 28, 28) float32: (pixel/255 - mean)/std.

    In numpy: for one tiny image each torch op costs more than the arithmetic.
    """
    x = digits.astype(np.float32) * np.float32(1 / (255.0 * std)) - np.float32(mean / std)
    return x[:, None]


def installed(name: RuntimeName) -> bool:
    """Whether the runtime's package is importable here, found without importing it (torch takes seconds)."""
    return importlib.util.find_spec(_PACKAGES[name]) is not None


def load(name: RuntimeName, model_path: Path, metadata_path: Path, threads: int = 1) -> tuple[Runtime, dict[str, Any]]:
    """Verify a version's files for runtime `name` and load them: (runtime, metadata). ModelLoadError says why not.

    `model_path` is the TorchScript file, whose sha256 is the version id; the ONNX export sits beside it.
    """
    if not installed(name):
        raise ModelLoadError(f"RUNTIME={name} needs the Python package {_PACKAGES[name]}, which is not installed")
    module = importlib.import_module(_MODULES[name])
    return module.load(model_path, metadata_path, threads)  # type: ignore[no-any-return]


def servable_by(metadata: dict[str, Any]) -> list[RuntimeName]:
    """The runtimes a version's metadata allows: ONNX Runtime only for versions exported to ONNX."""
    return ["torchscript", "onnxruntime"] if metadata.get("onnx_sha256") else ["torchscript"]
