"""Checking a model file against its metadata, without importing torch.

The server's supervisor process runs this before it starts any worker, and it has no use
for torch's few hundred MB.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


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
