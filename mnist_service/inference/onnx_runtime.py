"""The ONNX Runtime runtime: the model.onnx training exports beside model.pt, run without torch.

One intra-op thread per worker by default (TORCH_THREADS), no inter-op parallelism, sequential execution
and no spin-waiting: ORT's thread pools spin for a while after each run by default, which burns CPU on
an idle server and steals it from the other worker on a busy one. With one intra-op thread there is no
pool to spin; the settings say so anyway, so raising the thread count can't bring spinning back.
Softmax runs in numpy on the logits the graph returns, as TorchScript's does in torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort

from mnist_service.inference.integrity import (
    ModelLoadError,
    check_embedded,
    read_embedded_metadata,
    read_verified_metadata,
    verify_onnx,
)


def session(onnx_path: Path, threads: int = 1) -> ort.InferenceSession:
    """An ORT session on the CPU as the server runs it (training's agreement check uses the same)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...) for bad files
        raise ModelLoadError(f"ONNX model {onnx_path} could not be loaded by onnxruntime: {exc}") from exc


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row's max so exp never overflows."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)


class OnnxRuntime:
    """An ORT session over a version's ONNX export."""

    name: Literal["onnxruntime"] = "onnxruntime"
    platform = "onnxruntime_onnx"
    version = ort.__version__

    def __init__(self, sess: ort.InferenceSession) -> None:
        self.session = sess
        self._input = sess.get_inputs()[0].name
        self._output = [sess.get_outputs()[0].name]

    def forward(self, x: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(self._output, {self._input: x})
        return softmax(logits)


def load(pt_path: Path, metadata_path: Path, threads: int = 1) -> tuple[OnnxRuntime, dict[str, Any]]:
    """Verify a version (model.pt is its identity, model.onnx what runs) and open an ORT session on it."""
    metadata = read_verified_metadata(pt_path, metadata_path)
    check_embedded(pt_path, metadata_path, metadata, read_embedded_metadata(pt_path))
    return OnnxRuntime(session(verify_onnx(pt_path, metadata), threads)), metadata
