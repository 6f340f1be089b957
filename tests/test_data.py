"""The IDX reader: the bundled files, both gzipped and plain, and malformed files."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from mnist_service.data import IdxFormatError, load_split, parse_idx

from .conftest import DATA_DIR


def _idx(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def test_parse_idx_round_trips_shape_and_values() -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = parse_idx(_idx(arr))
    assert out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


def test_parse_idx_reads_big_endian_ints() -> None:
    arr = np.array([1, 256, -7], dtype=">i4")
    np.testing.assert_array_equal(parse_idx(_idx(arr, 0x0C)), [1, 256, -7])


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "magic"),
        (b"\x00\x00\x42\x01\x00\x00\x00\x01\x00", "type code"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),
        (_idx(np.zeros((2, 2), np.uint8))[:-1], "needs"),
    ],
)
def test_parse_idx_rejects_malformed_files(raw: bytes, message: str) -> None:
    with pytest.raises(IdxFormatError, match=message):
        parse_idx(raw)


def test_bundled_splits_load_with_expected_sizes() -> None:
    train, test = load_split(DATA_DIR, "train"), load_split(DATA_DIR, "test")
    assert train.images.shape == (10_000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10_000, 28, 28)
    assert set(np.unique(train.labels)) == set(range(10))
    # Class counts documented in data/mnist/README.md.
    assert np.bincount(train.labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    assert set(test.sha256) == {"t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}


def test_plain_and_dot_named_files_are_accepted(tmp_path: Path) -> None:
    """Users unpack the official files and sometimes use the 'train-images.idx3-ubyte' spelling."""
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        plain = tmp_path / name.replace("-idx", ".idx")
        plain.write_bytes(gzip.decompress((DATA_DIR / f"{name}.gz").read_bytes()))
    split = load_split(tmp_path, "test")
    reference = load_split(DATA_DIR, "test")
    np.testing.assert_array_equal(split.images, reference.images)
    np.testing.assert_array_equal(split.labels, reference.labels)


def test_missing_file_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_split(tmp_path, "train")


def test_label_count_mismatch_is_rejected(tmp_path: Path) -> None:
    shutil.copy(DATA_DIR / "t10k-images-idx3-ubyte.gz", tmp_path)
    labels = np.zeros(5, dtype=np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    with pytest.raises(IdxFormatError, match="5 labels for 10000 images"):
        load_split(tmp_path, "test")
