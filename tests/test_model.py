"""The network's shapes and cost, the exported file format, integrity checks and training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mnist_service.inference.integrity import EMBEDDED_METADATA, ModelLoadError, sha256_file
from mnist_service.inference.torchscript_runtime import load_verified, optimize_for_serving
from mnist_service.training.model import Net, count_macs
from mnist_service.training.train import TrainParams, run

from .conftest import DATA_DIR


def test_net_maps_a_batch_to_ten_logits() -> None:
    net = Net().eval()
    assert net(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_count_macs_matches_a_hand_count() -> None:
    tiny = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(2 * 784, 10))
    assert count_macs(tiny) == 2 * 9 * 784 + 2 * 784 * 10


def test_metadata_has_everything_users_and_the_server_need(model_dir: Path) -> None:
    meta = json.loads((model_dir / "mnist_cnn.json").read_text())
    for key in (
        "version", "test_accuracy", "per_class_accuracy", "confusion_matrix", "class_labels", "input",
        "training", "data_sha256", "torch_version", "created_at", "macs", "throughput_images_per_s",
        "onnx_sha256", "onnx",
    ):
        assert key in meta, key
    assert meta["version"] == sha256_file(model_dir / "mnist_cnn.pt")
    assert meta["torch_version"] == torch.__version__
    assert meta["class_labels"] == [str(d) for d in range(10)]
    assert meta["input"]["shape"] == [1, 1, 28, 28]
    assert set(meta["input"]["normalization"]) >= {"mean", "std"}
    cm = meta["confusion_matrix"]
    assert len(cm) == 10 and sum(map(sum, cm)) == 10_000
    # The reported accuracy is the confusion matrix's diagonal, not a number typed in.
    assert meta["test_accuracy"] == pytest.approx(sum(cm[i][i] for i in range(10)) / 10_000, abs=1e-4)
    assert meta["test_accuracy"] > 0.85  # 2 quick epochs on 3,000 images
    assert meta["macs"] == count_macs(Net())


def test_model_file_describes_itself(model_dir: Path) -> None:
    extra = {EMBEDDED_METADATA: ""}
    torch.jit.load(str(model_dir / "mnist_cnn.pt"), _extra_files=extra)
    embedded = json.loads(extra[EMBEDDED_METADATA])
    on_disk = json.loads((model_dir / "mnist_cnn.json").read_text())
    assert embedded == {k: v for k, v in on_disk.items() if k != "version"}


def test_optimized_module_agrees_with_the_scripted_one(model_dir: Path) -> None:
    module, _ = load_verified(model_dir / "mnist_cnn.pt", model_dir / "mnist_cnn.json")
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(optimize_for_serving(module)(x), module(x), atol=1e-4, rtol=1e-4)


@pytest.fixture
def model_copy(model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    pt, js = tmp_path / "m.pt", tmp_path / "m.json"
    shutil.copy(model_dir / "mnist_cnn.pt", pt)
    shutil.copy(model_dir / "mnist_cnn.json", js)
    return pt, js


def test_missing_model_file_is_refused(model_copy: tuple[Path, Path]) -> None:
    pt, js = model_copy
    pt.unlink()
    with pytest.raises(ModelLoadError, match="not found"):
        load_verified(pt, js)


def test_truncated_model_file_is_refused(model_copy: tuple[Path, Path]) -> None:
    pt, js = model_copy
    pt.write_bytes(pt.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="sha256"):
        load_verified(pt, js)


def test_tampered_model_file_is_refused(model_copy: tuple[Path, Path]) -> None:
    pt, js = model_copy
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="tampered"):
        load_verified(pt, js)


def test_edited_metadata_is_refused(model_copy: tuple[Path, Path]) -> None:
    pt, js = model_copy
    meta = json.loads(js.read_text())
    meta["test_accuracy"] = 0.9999
    js.write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="does not match the metadata embedded"):
        load_verified(pt, js)


def test_training_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    params = {"data_dir": DATA_DIR, "epochs": 1, "max_train": 512, "seed": 7, "drift_images": 1000}
    first = run(TrainParams(output=tmp_path / "a", **params))
    second = run(TrainParams(output=tmp_path / "b", **params))
    assert first["confusion_matrix"] == second["confusion_matrix"]
    assert first["drift_reference"] == second["drift_reference"]
    weights = [torch.jit.load(str(tmp_path / d / "mnist_cnn.pt")).state_dict() for d in ("a", "b")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], rtol=0, atol=0)
