"""The TorchScript runtime: the model.pt training exports, frozen and optimised by torch at load.

The only server module that imports torch; `inference/runtime.py` imports it only when RUNTIME=torchscript.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mnist_service.inference.integrity import (
    EMBEDDED_METADATA,
    ModelLoadError,
    check_embedded,
    read_verified_metadata,
)


def load_verified(pt_path: Path, metadata_path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a TorchScript model whose bytes and embedded metadata match its metadata file."""
    metadata = read_verified_metadata(pt_path, metadata_path)
    extra = {EMBEDDED_METADATA: ""}
    try:
        module = torch.jit.load(str(pt_path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises bare RuntimeErrors of many kinds for bad archives
        raise ModelLoadError(f"model file {pt_path} could not be loaded by torch: {exc}") from exc
    check_embedded(pt_path, metadata_path, metadata, json.loads(extra[EMBEDDED_METADATA] or "{}"))
    return module.eval(), metadata


def optimize_for_serving(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Freeze (folds batch norm into convs) and apply torch's inference passes, at load time."""
    frozen = torch.jit.freeze(module.eval())
    return torch.jit.optimize_for_inference(frozen)


class TorchScriptRuntime:
    """A frozen, optimised TorchScript module; softmax in torch, as the model was always served."""

    name: Literal["torchscript"] = "torchscript"
    platform = "pytorch_torchscript"
    version = torch.__version__

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    def forward(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(x))
            return torch.softmax(logits.float(), dim=1).numpy()


def load(pt_path: Path, metadata_path: Path, threads: int = 1) -> tuple[TorchScriptRuntime, dict[str, Any]]:
    """Verify, load and optimise a version for TorchScript; `threads` is torch's intra-op pool (process-wide)."""
    torch.set_num_threads(threads)
    module, metadata = load_verified(pt_path, metadata_path)
    return TorchScriptRuntime(optimize_for_serving(module)), metadata
