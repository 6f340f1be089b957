"""The network, its cost, and the TorchScript file format (export, verified load)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_service.inference.integrity import ModelLoadError, read_verified_metadata, sha256_file

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.json"  # name of the metadata embedded in the .pt via _extra_files
CLASS_LABELS = [str(d) for d in range(10)]
INPUT_SHAPE = [1, 1, 28, 28]


class Net(nn.Module):
    """Two stride-2 convolutions and a small MLP head: about 1.26 M multiply-adds per image.

    Found by measuring accuracy per FLOP (docs/training.md): on the CPU each conv costs a fixed
    overhead per call at batch 1 whatever its size, so two wide-enough convs beat three narrow ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, stride=2, padding=2, bias=False),  # 28 -> 14
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1, bias=False),  # 14 -> 7
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_macs(model: nn.Module, input_shape: list[int] = INPUT_SHAPE) -> int:
    """Multiply-adds of one forward pass over conv and linear layers (the cost that matters)."""
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * kernel
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


def export(model: nn.Module, metadata: dict[str, Any], output_dir: Path, name: str = "mnist_cnn") -> Path:
    """Script the model, save it with the metadata embedded, and write the JSON beside it.

    The JSON adds `version`, the sha256 of the .pt, which the embedded copy can't hold.
    The plain scripted model is saved: a frozen, optimised one can't be loaded back.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    pt_path = output_dir / f"{name}.pt"
    scripted = torch.jit.script(model.eval())
    embedded = json.dumps(metadata, sort_keys=True)
    torch.jit.save(scripted, str(pt_path), _extra_files={METADATA_FILE: embedded})
    full = {"version": sha256_file(pt_path), **metadata}
    pt_path.with_suffix(".json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return pt_path


def load_verified(pt_path: Path, metadata_path: Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a TorchScript model whose bytes and embedded metadata match its metadata file."""
    metadata = read_verified_metadata(pt_path, metadata_path)
    extra = {METADATA_FILE: ""}
    try:
        module = torch.jit.load(str(pt_path), map_location="cpu", _extra_files=extra)
    except Exception as exc:  # torch raises bare RuntimeErrors of many kinds for bad archives
        raise ModelLoadError(f"model file {pt_path} could not be loaded by torch: {exc}") from exc
    embedded = json.loads(extra[METADATA_FILE] or "{}")
    if embedded != {k: v for k, v in metadata.items() if k != "version"}:
        raise ModelLoadError(f"{metadata_path.name} does not match the metadata embedded in {pt_path.name}")
    return module.eval(), metadata


def optimize_for_serving(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """Freeze (folds batch norm into convs) and apply torch's inference passes, at load time."""
    frozen = torch.jit.freeze(module.eval())
    return torch.jit.optimize_for_inference(frozen)
