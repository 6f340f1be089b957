"""Labelled captures as training data: read from the capture database, split by request-id hash into a
training share and a held-out share that never trains, described for the model's metadata (data
lineage), and written as MNIST IDX files for any other pipeline.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from mnist_service.capture.store import CaptureStore, CaptureUnavailable, redacted

# The share of labelled captures that never trains by default (model_train.py --feedback-holdout), chosen
# by a hash of the request id: the same request is held out in every run, so feedback_accuracy is always
# measured on unseen captures, and a larger share holds out the same requests and more.
HOLDOUT_FRACTION = 0.2


def check_holdout(fraction: float) -> float:
    """The fraction, if at least 0 and below 1 (something must train); ValueError saying so otherwise."""
    if not 0 <= fraction < 1:
        raise ValueError(
            f"the held-out share of labelled captures must be at least 0 and below 1 (0.2 keeps a fifth of "
            f"them out of training to measure feedback_accuracy; 0 trains on all), not {fraction:g}"
        )
    return fraction


def held_out(request_id: str, fraction: float = HOLDOUT_FRACTION) -> bool:
    """Whether a request's captures belong to the held-out share (that fraction of ids, by hash)."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") < check_holdout(fraction) * 2**64


@dataclass(frozen=True)
class Labelled:
    """Labelled captures in a fixed order (request id, item)."""

    request_ids: list[str]
    items: np.ndarray  # (n,) int
    images: np.ndarray  # (n, 28, 28) uint8
    labels: np.ndarray  # (n,) uint8
    captured_at: np.ndarray  # (n,) unix seconds

    def __len__(self) -> int:
        return len(self.request_ids)

    def subset(self, keep: np.ndarray) -> Labelled:
        return Labelled(
            [r for r, k in zip(self.request_ids, keep, strict=True) if k],
            self.items[keep], self.images[keep], self.labels[keep], self.captured_at[keep],
        )

    def split(self, fraction: float = HOLDOUT_FRACTION) -> tuple[Labelled, Labelled]:
        """(training share, held-out share), `fraction` of the request ids held out."""
        check_holdout(fraction)
        out = np.array([held_out(r, fraction) for r in self.request_ids], dtype=bool)
        return self.subset(~out), self.subset(out)

    def sha256(self) -> str:
        """A hash of exactly these rows (id, item, label, image): the same rows give the same hash."""
        digest = hashlib.sha256()
        for request_id, item, label, image in zip(self.request_ids, self.items, self.labels, self.images, strict=True):
            digest.update(f"{request_id}\0{int(item)}\0{int(label)}\0".encode())
            digest.update(image.tobytes())
        return digest.hexdigest()

    def lineage(self) -> dict[str, Any]:
        """How many, from when to when, and which rows (their hash)."""

        def iso(t: float) -> str:
            return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")

        return {
            "rows": len(self),
            "first_captured_at": iso(float(self.captured_at.min())) if len(self) else None,
            "last_captured_at": iso(float(self.captured_at.max())) if len(self) else None,
            "sha256": self.sha256(),
            "per_class": {str(d): int((self.labels == d).sum()) for d in range(10)},
        }


def read_labelled(url: str) -> Labelled:
    """Every labelled capture of a capture database (a path, sqlite:///path or postgresql://...).

    CaptureUnavailable when it can't be read, does not exist, or holds no labelled capture.
    """
    store = CaptureStore(url)
    if store.path is not None and not store.path.exists():
        raise CaptureUnavailable(f"{store.path} does not exist")
    rows = store.labelled()
    if not rows:
        raise CaptureUnavailable("it holds no labelled capture yet: label predictions with POST /feedback")
    return Labelled(
        [r.request_id for r in rows],
        np.array([r.item for r in rows], dtype=np.int64),
        np.stack([r.image for r in rows]) if rows else np.zeros((0, 28, 28), np.uint8),
        np.array([r.label for r in rows], dtype=np.uint8),
        np.array([r.captured_at for r in rows], dtype=np.float64),
    )


def describe(url: str, train: Labelled, held: Labelled, fraction: float) -> dict[str, Any]:
    """What the model's metadata records about the feedback it trained on and was measured on."""
    return {
        "database": redacted(url),
        "holdout_fraction": fraction,
        "train": train.lineage(),
        "held_out": held.lineage(),
    }


def _write_idx(path: Path, array: np.ndarray) -> None:
    # The IDX header: two zero bytes, the type (0x08: unsigned byte), the dimension count, then each size.
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def export_idx(url: str, folder: Path, holdout: float = HOLDOUT_FRACTION) -> dict[str, Any]:
    """Write the labelled captures as MNIST IDX files: the training share as train-*, the held-out share
    as t10k-* (so the folder works as a --data-dir), and lineage.json; returns the lineage."""
    train, held = read_labelled(url).split(holdout)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", train), ("t10k", held)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", part.images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", part.labels)
    lineage = describe(url, train, held, holdout)
    (folder / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    return lineage
