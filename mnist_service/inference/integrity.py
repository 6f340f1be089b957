"""Checking a model's files against its metadata, without importing torch or onnxruntime.

The server's supervisor process runs this before it starts any worker, and it has no use
for torch's few hundred MB. A version is model.pt (TorchScript; its sha256 is the version id),
model.json (the metadata, which records the ONNX export's sha256) and, since ONNX export,
model.onnx beside them.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

EMBEDDED_METADATA = "metadata.json"  # name of the metadata embedded in the .pt via _extra_files


class ModelLoadError(RuntimeError):
    """The model file is missing, unreadable or does not match its metadata."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_verified_metadata(pt_path: Path, metadata_path: Path) -> dict[str, Any]:
    """The model's metadata, only if the model file's sha256 is the one it records."""
    if not pt_path.is_file():
        raise ModelLoadError(f"model file {pt_path} not found: train one with `python model_train.py`")
    if not metadata_path.is_file():
        raise ModelLoadError(f"model metadata {metadata_path} not found beside the model")
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model metadata {metadata_path} is not valid JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError(f"model metadata {metadata_path} must be a JSON object")
    actual = sha256_file(pt_path)
    if metadata.get("version") != actual:
        raise ModelLoadError(
            f"model file {pt_path} has sha256 {actual[:12]} but {metadata_path.name} expects "
            f"{str(metadata.get('version'))[:12]}: the file is truncated, tampered with or from another run"
        )
    return metadata


def read_embedded_metadata(pt_path: Path) -> dict[str, Any]:
    """The metadata torch.jit.save embedded in a .pt (`<archive>/extra/metadata.json`), read as the zip it is.

    ONNX Runtime trusts model.onnx through this copy: the .pt's sha256 is the version id, so its embedded
    onnx_sha256 can't be changed without changing the version, unlike the JSON beside it.
    """
    try:
        with zipfile.ZipFile(pt_path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/extra/" + EMBEDDED_METADATA)]
            if len(names) != 1:
                raise ModelLoadError(f"model file {pt_path} has no embedded {EMBEDDED_METADATA}")
            embedded = json.loads(archive.read(names[0]))
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"model file {pt_path} is not a readable TorchScript archive: {exc}") from exc
    if not isinstance(embedded, dict):
        raise ModelLoadError(f"the metadata embedded in {pt_path} is not a JSON object")
    return embedded


def check_embedded(pt_path: Path, metadata_path: Path, metadata: dict[str, Any], embedded: dict[str, Any]) -> None:
    """The metadata file says what the .pt embeds (all of it but `version`, the .pt's own sha256)."""
    if embedded != {k: v for k, v in metadata.items() if k != "version"}:
        raise ModelLoadError(f"{metadata_path.name} does not match the metadata embedded in {pt_path.name}")


def onnx_path_for(model_path: Path) -> Path:
    """Where a model's ONNX export lives: beside the TorchScript file (model.onnx, mnist_cnn.onnx)."""
    return model_path.with_suffix(".onnx")


def verify_onnx(model_path: Path, metadata: dict[str, Any]) -> Path:
    """The ONNX export of a verified model, only if its sha256 is the one the metadata records."""
    expected = metadata.get("onnx_sha256")
    if not expected:
        raise ModelLoadError(
            f"{model_path} was published before ONNX export (its metadata has no onnx_sha256), so ONNX Runtime "
            "can't serve it: serve it with RUNTIME=torchscript, or give it an ONNX export with "
            f"`python model_train.py --add-onnx {model_path}`"
        )
    onnx_path = onnx_path_for(model_path)
    if not onnx_path.is_file():
        raise ModelLoadError(f"ONNX model {onnx_path} not found, though its metadata records one")
    actual = sha256_file(onnx_path)
    if actual != expected:
        raise ModelLoadError(
            f"ONNX model {onnx_path} has sha256 {actual[:12]} but the metadata expects {str(expected)[:12]}: "
            "the file is truncated, tampered with or from another run"
        )
    return onnx_path
