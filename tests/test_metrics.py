"""Batched histogram observations give exactly what one observe() per value gives, in both registry modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from mnist_service.metrics import Metrics, observe_many

ROOT = Path(__file__).resolve().parent.parent

BUCKETS = (0.1, 0.5, 0.9, 1.0, 2.0)


def _values() -> np.ndarray:
    rng = np.random.default_rng(3)
    # Values on the bounds themselves, between them, below the first and above the last.
    return np.concatenate([np.asarray(BUCKETS), rng.uniform(-0.5, 3.0, 200), [np.float32(0.9), 7.0]])


def _rendered(histogram_factory: Callable[[CollectorRegistry], Histogram], feed: Callable[[Histogram], None]) -> bytes:
    registry = CollectorRegistry()
    histogram = histogram_factory(registry)
    feed(histogram)
    return generate_latest(registry)


@pytest.mark.parametrize("labelled", [False, True])
def test_observe_many_equals_one_observe_per_value(labelled: bool) -> None:
    values = _values()

    def make(registry: CollectorRegistry) -> Histogram:
        labels = ["version"] if labelled else []
        return Histogram("h", "test", labels, buckets=BUCKETS, registry=registry)

    def child(h: Histogram) -> Any:
        return h.labels("7") if labelled else h

    def one_by_one(h: Histogram) -> None:
        for v in values:
            child(h).observe(float(v))

    def batched(h: Histogram) -> None:
        observe_many(child(h), values[:3])  # few: one at a time
        observe_many(child(h), values[3:50])
        observe_many(child(h), values[50:])
        observe_many(child(h), np.array([]))

    def parse(text: bytes) -> dict[str, float]:
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.decode().splitlines()
            if line.startswith("h_") and "_created" not in line
        }

    expected, got = parse(_rendered(make, one_by_one)), parse(_rendered(make, batched))
    assert set(expected) == set(got)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name  # the sum is added in another order


_MULTIPROCESS_SCRIPT = """
import json, sys
import numpy as np
from prometheus_client import CollectorRegistry, multiprocess
from mnist_service.metrics import Metrics, observe_many
metrics = Metrics(multiprocess_mode=True)
observe_many(metrics.confidence.labels("3"), np.array([0.2, 0.95, 0.95, 0.999]))
merged = CollectorRegistry()
multiprocess.MultiProcessCollector(merged)
print(json.dumps([
    [s.name, s.labels.get("le"), s.value]
    for family in merged.collect() if family.name == "mnist_prediction_confidence" for s in family.samples
]))
"""


def test_observe_many_in_multiprocess_mode(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set (read at import, hence a fresh process), the counts land in the
    shared files that /metrics adds up."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _MULTIPROCESS_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    samples = {(name, le): value for name, le, value in json.loads(out)}
    assert list(tmp_path.glob("histogram_*.db")), "nothing was written to the multiprocess folder"
    assert samples[("mnist_prediction_confidence_count", None)] == 4
    assert samples[("mnist_prediction_confidence_sum", None)] == pytest.approx(3.099)
    assert samples[("mnist_prediction_confidence_bucket", "+Inf")] == 4
    assert samples[("mnist_prediction_confidence_bucket", "0.6")] == 1  # cumulative: 0.2 only
    assert samples[("mnist_prediction_confidence_bucket", "0.99")] == 3


def test_the_series_the_slo_rules_read_exist_at_zero_from_the_start() -> None:
    """A fresh server's scrape already has the request and latency series the rules and panels select."""
    text = Metrics().render().decode()
    for endpoint in ("/predict", "/v2/models/{model_name}/infer"):
        for status in ("200", "500", "503"):
            assert (
                f'mnist_requests_total{{endpoint="{endpoint}",method="POST",status="{status}",version=""}} 0.0' in text
            ), (endpoint, status)
        assert f'mnist_request_latency_seconds_count{{endpoint="{endpoint}",version=""}} 0.0' in text
    # gRPC's twins, which the same rules read: ModelInfer answered OK, INTERNAL (500), UNAVAILABLE (503).
    for code in ("OK", "INTERNAL", "UNAVAILABLE"):
        assert f'mnist_grpc_requests_total{{code="{code}",method="ModelInfer",version=""}} 0.0' in text, code
    assert 'mnist_grpc_request_latency_seconds_count{method="ModelInfer",version=""} 0.0' in text
