"""Export a trained network as a servable version: model.onnx, then model.pt with the ONNX hash, then model.json.

Order matters: the .pt embeds the metadata and its sha256 is the version id, so the ONNX file is
written and hashed first and its sha256 goes into the metadata the .pt embeds. Before the .pt is
written, both are run on the full MNIST test set exactly as the server runs them; if they do not
give the same digit for every image and probabilities within `TOLERANCE`, nothing is written.

ONNX export uses torch.onnx's default in torch 2.13, the torch.export-based ("dynamo") exporter. The
older TorchScript-based one still exists behind dynamo=False but is deprecated and slated for removal;
both need the `onnx` package, the dynamo one also `onnxscript` (training's dependencies, not the
server's). Opset 18 is the exporter's default and what its translations are written for.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mnist_service.inference import onnx_runtime
from mnist_service.inference.integrity import EMBEDDED_METADATA, onnx_path_for, sha256_file
from mnist_service.inference.runtime import Runtime, normalize
from mnist_service.inference.torchscript_runtime import TorchScriptRuntime, optimize_for_serving

logger = logging.getLogger(__name__)

OPSET = 18
# Largest |difference| of any class probability between TorchScript and ONNX Runtime on any test image.
# Measured differences are around 1e-6 (float32 rounding in differently fused kernels, AVX2 vs AVX-512);
# 1e-4 leaves room for other CPUs while catching any real difference in weights or graph.
TOLERANCE = 1e-4


class ExportMismatch(RuntimeError):
    """The ONNX export does not answer like the TorchScript model: the version is not published."""


def export_onnx(net: nn.Module, path: Path) -> None:
    """Write the network in eval mode (batch norm's running statistics, no dropout) with a dynamic batch axis.

    The exporter's optimiser folds each batch norm into the convolution before it (tests/test_export.py
    checks the graph holds none), as torch.jit.freeze does for TorchScript at load.
    """
    net = copy.deepcopy(net).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter logs a warning per torchvision op it can't register (torchvision is never installed here),
    # and its graph optimiser (onnxscript, onnx_ir) a line per pass: training's output shows only problems.
    names = ("torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir")
    quiet = [logging.getLogger(name) for name in names]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch.export, not ours to fix
            torch.onnx.export(
                net, (torch.zeros(2, 1, 28, 28),), str(path), dynamo=True, verbose=False, opset_version=OPSET,
                input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False,
            )
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def check_agreement(
    torchscript: Runtime, onnx: Runtime, images: np.ndarray, normalization: dict[str, float], batch: int = 1000
) -> dict[str, Any]:
    """Both runtimes on every image (uint8 (n, 28, 28)); their agreement, or ExportMismatch when over the tolerance."""
    same, worst = 0, 0.0
    for start in range(0, len(images), batch):
        x = normalize(images[start : start + batch], normalization["mean"], normalization["std"])
        expected, actual = torchscript.forward(x), onnx.forward(x)
        same += int((expected.argmax(1) == actual.argmax(1)).sum())
        worst = max(worst, float(np.abs(expected - actual).max()))
    agreement = {
        "images": len(images),
        "same_digit": same,
        "max_abs_prob_diff": float(f"{worst:.3g}"),
        "tolerance": TOLERANCE,
        "onnxruntime_version": onnx.version,
    }
    if same < len(images) or worst > TOLERANCE:
        raise ExportMismatch(
            f"the ONNX export disagrees with the TorchScript model on the {len(images)} test images: "
            f"{len(images) - same} give another digit, the largest probability difference is {worst:.2e} "
            f"(tolerance {TOLERANCE:g}); nothing was published. Check that torch and onnxruntime are the pinned "
            "versions (requirements.txt) and export again"
        )
    return agreement


def save_torchscript(scripted: torch.jit.ScriptModule, metadata: dict[str, Any], pt_path: Path) -> dict[str, Any]:
    """Save the .pt with the metadata embedded and write the JSON beside it; the metadata as the JSON holds it.

    The JSON adds `version`, the sha256 of the .pt, which the embedded copy can't hold.
    The plain scripted model is saved: a frozen, optimised one can't be loaded back.
    """
    embedded = json.dumps(metadata, sort_keys=True)
    torch.jit.save(scripted, str(pt_path), _extra_files={EMBEDDED_METADATA: embedded})
    full = {"version": sha256_file(pt_path), **metadata}
    pt_path.with_suffix(".json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return full


def export_version(
    net: nn.Module | torch.jit.ScriptModule,
    metadata: dict[str, Any],
    pt_path: Path,
    test_images: np.ndarray,
    onnx_source: nn.Module | None = None,
) -> dict[str, Any]:
    """Write pt_path's .onnx, .pt and .json once the two runtimes agree on `test_images`; the metadata written.

    `net` is what the .pt holds (a network, or an already scripted one); `onnx_source` the network the
    ONNX export is traced from when `net` is scripted (torch.export can't trace a ScriptModule).
    The .onnx is renamed into place last, so a failed export leaves no ONNX file without its .pt,
    and `make` sees it as newer than the .pt it belongs to.
    """
    pt_path.parent.mkdir(parents=True, exist_ok=True)
    scripted = net if isinstance(net, torch.jit.ScriptModule) else torch.jit.script(copy.deepcopy(net).eval())
    onnx_path = onnx_path_for(pt_path)
    staging = onnx_path.with_name(f".{onnx_path.name}.partial")
    try:
        export_onnx(onnx_source if onnx_source is not None else net, staging)
        normalization = metadata["input"]["normalization"]
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # as served (TORCH_THREADS=1)
        try:
            agreement = check_agreement(
                TorchScriptRuntime(optimize_for_serving(scripted)),
                onnx_runtime.OnnxRuntime(onnx_runtime.session(staging)),
                test_images, normalization,
            )
        finally:
            torch.set_num_threads(previous)
        metadata = {
            **metadata,
            "onnx_sha256": sha256_file(staging),
            "onnx": {"opset": OPSET, "exporter": f"torch.onnx (dynamo) {torch.__version__}", "agreement": agreement},
        }
        written = save_torchscript(scripted, metadata, pt_path)
        os.replace(staging, onnx_path)
        os.utime(onnx_path)  # written before the .pt, but `make` must see it as the newer of the two
    finally:
        staging.unlink(missing_ok=True)
    logger.info(
        "exported %s: the same digit on all %d test images, largest probability difference %.1e (tolerance %g)",
        onnx_path, agreement["images"], agreement["max_abs_prob_diff"], TOLERANCE,
    )
    return written
