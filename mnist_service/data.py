"""Reading MNIST from the standard (optionally gzipped) IDX files."""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# IDX type codes (third byte of the magic number) to numpy dtypes; multi-byte types are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class IdxFormatError(ValueError):
    """The file is not a well-formed IDX file."""


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse the bytes of one IDX file into an array of its declared shape and type."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IdxFormatError("not an IDX file: the magic number must start with two zero bytes")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise IdxFormatError(f"unknown IDX data type code 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError("IDX header is truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"IDX body holds {len(raw) - header} bytes but the header {shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    # Sniff the gzip magic rather than trust the suffix: users unpack files and keep names.
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def _find(data_dir: Path, stem: str) -> Path:
    # Accept both the official names and the common "train-images.idx3-ubyte" spelling.
    candidates = [stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")]
    for name in candidates:
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(
        f"MNIST file {stem}(.gz) not found in {data_dir}; copy the IDX files there (see data/mnist/README.md)"
    )


@dataclass(frozen=True)
class MnistSplit:
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64
    sha256: dict[str, str]  # file name -> sha256 of the file as stored


def load_split(data_dir: str | Path, split: str) -> MnistSplit:
    """Load the 'train' or 'test' split, checking that images and labels agree."""
    data_dir = Path(data_dir)
    image_stem, label_stem = SPLITS[split]
    image_path, label_path = _find(data_dir, image_stem), _find(data_dir, label_stem)
    images = parse_idx(_read_bytes(image_path))
    labels = parse_idx(_read_bytes(label_path))
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise IdxFormatError(f"{image_path.name}: expected uint8 images of 28x28, got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise IdxFormatError(
            f"{label_path.name}: {len(labels)} labels for {len(images)} images in {image_path.name}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise IdxFormatError(f"{label_path.name}: labels must be digits 0-9")
    hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (image_path, label_path)}
    return MnistSplit(images=images, labels=labels.astype(np.int64), sha256=hashes)
