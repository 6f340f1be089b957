"""The drift reference saved with a model, and what the server exports for it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mnist_service.inference.integrity import ModelLoadError
from mnist_service.inference.torchscript_runtime import load_verified
from mnist_service.monitoring import drift
from mnist_service.serving.api import create_app
from mnist_service.settings import Settings
from mnist_service.training.train import as_uploaded, reference_sample


def _digit(rows: slice, cols: slice) -> np.ndarray:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[rows, cols] = 255
    return image


def test_input_statistics_of_known_shapes() -> None:
    digits = np.stack([_digit(slice(4, 24), slice(12, 16)), _digit(slice(10, 14), slice(4, 24)), np.zeros((28, 28))])
    stats = drift.input_statistics(digits)
    assert stats["ink_fraction"].tolist() == pytest.approx([80 / 784, 80 / 784, 0.0])
    assert stats["mean_intensity"].tolist() == pytest.approx([80 / 784, 80 / 784, 0.0])
    assert stats["bbox_aspect"].tolist() == pytest.approx([4 / 20, 20 / 4, 0.0])


def test_cdf_counts_values_at_an_edge_like_a_prometheus_bucket() -> None:
    # Prometheus's le buckets are "less than or equal": 0.5 belongs to the le="0.5" bucket.
    assert drift.cdf(np.array([0.5, 0.7, 0.9, 0.95]), (0.5, 0.9, 0.99)).tolist() == [0.25, 0.75, 1.0]


def test_scores_are_zero_for_the_reference_itself_and_grow_with_a_shift() -> None:
    ref = np.full(10, 0.1)
    assert drift.psi(ref, ref) == 0
    shifted = np.zeros(10)
    shifted[[1, 7]] = 0.5
    assert drift.psi(shifted, ref) > 1
    assert drift.ks(np.array([0.1, 0.5, 1.0]), np.array([0.1, 0.2, 1.0])) == pytest.approx(0.3)


@pytest.fixture(scope="module")
def metadata(model_dir: Path) -> dict:
    return json.loads((model_dir / "mnist_cnn.json").read_text())


@pytest.fixture(scope="module")
def served_test_set(model_dir: Path, test_digits: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and inputs of the 2,000 test digits the session model's reference was built on, as uploaded."""
    module, _ = load_verified(model_dir / "mnist_cnn.pt", model_dir / "mnist_cnn.json")
    return as_uploaded(module, test_digits[0][reference_sample(len(test_digits[0]), 2000)])


def test_the_reference_is_saved_with_the_model(metadata: dict) -> None:
    reference = metadata["drift_reference"]
    assert sum(reference["digit_share"]) == pytest.approx(1, abs=1e-4)
    assert reference["window"] == drift.WINDOW and reference["false_alarm_rate"] == drift.FALSE_ALARM
    for name, edges in drift.BUCKETS.items():
        assert reference["buckets"][name] == list(edges)
        assert reference["cdf"][name] == sorted(reference["cdf"][name])  # cumulative
    assert set(reference["thresholds"]) == set(drift.SCORES) and all(t > 0 for t in reference["thresholds"].values())


def test_thresholds_keep_unchanged_windows_under_them_and_catch_a_shift(
    metadata: dict, served_test_set: tuple[np.ndarray, np.ndarray]
) -> None:
    reference, (probs, digits) = metadata["drift_reference"], served_test_set
    rng = np.random.default_rng(12345)  # windows of the same images that the calibration never drew
    exceeded = {score: 0 for score in drift.SCORES}
    for _ in range(200):
        pick = rng.integers(0, len(probs), drift.WINDOW)
        for score, value in drift.scores(reference, probs[pick], digits[pick]).items():
            exceeded[score] += value > reference["thresholds"][score]
    # Calibrated at 1% per score: 2 of 200 expected; allow for chance.
    assert all(count <= 8 for count in exceeded.values()), exceeded
    ones_and_sevens = np.flatnonzero(np.isin(probs.argmax(1), [1, 7]))[: drift.WINDOW]
    shifted = drift.scores(reference, probs[ones_and_sevens], digits[ones_and_sevens])
    assert shifted["digit_psi"] > 5 * reference["thresholds"]["digit_psi"], shifted
    assert shifted["bbox_aspect_ks"] > reference["thresholds"]["bbox_aspect_ks"], shifted  # 1s are narrow


def test_the_reference_is_covered_by_the_integrity_checks(model_dir: Path, tmp_path: Path) -> None:
    for name in ("mnist_cnn.pt", "mnist_cnn.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    meta = json.loads((tmp_path / "mnist_cnn.json").read_text())
    meta["drift_reference"]["thresholds"]["digit_psi"] = 99.0  # silence the alert by editing the JSON
    (tmp_path / "mnist_cnn.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="does not match the metadata embedded"):
        load_verified(tmp_path / "mnist_cnn.pt", tmp_path / "mnist_cnn.json")


def test_the_server_exports_the_reference_and_counts_the_live_statistics(
    model_path: Path, metadata: dict, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    reference = metadata["drift_reference"]
    with TestClient(create_app(Settings(model_path=model_path))) as client:
        for image in test_digits[0][:20]:
            assert client.post("/predict/pixels", json={"pixels": image.tolist()}).status_code == 200
        text = client.get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    for digit, share in enumerate(reference["digit_share"]):
        assert samples[("mnist_drift_reference_share", (("digit", str(digit)), ("version", "1")))] == share
    for name, edges in drift.BUCKETS.items():
        for edge, share in zip(edges, reference["cdf"][name], strict=True):
            key = (("edge", drift.le_label(edge)), ("statistic", name), ("version", "1"))
            assert samples[("mnist_drift_reference_cdf", key)] == share
            # The live histogram has a bucket with the very same le label: the recording rules join on it.
            bucket = "mnist_prediction_confidence_bucket" if name == "confidence" else f"mnist_input_{name}_bucket"
            assert (bucket, (("le", drift.le_label(edge)), ("version", "1"))) in samples
        count = "mnist_prediction_confidence_count" if name == "confidence" else f"mnist_input_{name}_count"
        assert samples[(count, (("version", "1"),))] == 20
    for score, threshold in reference["thresholds"].items():
        assert samples[("mnist_drift_threshold", (("score", score), ("version", "1")))] == threshold
