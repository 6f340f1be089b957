"""Drift: a reference saved with the model at training time, and the statistics the server counts live.

Training runs the official test set through the server's own preprocessing (each digit as a PNG
upload) and the trained model, and records what "normal" looks like: the share of each predicted
digit, and the distribution of the top-class confidence and of three cheap statistics of the 28x28
the model sees (ink fraction, mean intensity, the ink's bounding-box aspect), all in the bucket
edges the server's histograms use. It also calibrates thresholds: it draws windows of WINDOW
images from the test set, scores each against the reference with the same formulas Prometheus's
recording rules use, and takes the score that only FALSE_ALARM of such windows exceed.

The server exports the reference as gauges and counts the live statistics; Prometheus computes
the scores (monitoring/prometheus/rules.yml), so they add up over every worker and pod and the server
keeps no extra state.

Scores: the digit mix by the population stability index, PSI = sum over digits of
(live - ref) * ln((live + EPS) / (ref + EPS)); each distribution by the largest gap between the
live and the reference cumulative share at the bucket edges (a Kolmogorov-Smirnov distance on
the binned distribution).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client.utils import floatToGoString

# Bucket edges, chosen from the reference of the shipped model (the test set through it): about a
# tenth of the test-set answers falls between consecutive edges, so a shift shows. With edges at
# 0.9, 0.95, 0.99, ... nine in ten answers fell in one bucket and a shift would not show.
CONFIDENCE_BUCKETS = (0.6, 0.8, 0.9, 0.94, 0.955, 0.965, 0.972, 0.978, 0.984, 0.99)
INK_FRACTION_BUCKETS = (0.05, 0.07, 0.08, 0.09, 0.1, 0.11, 0.12, 0.13, 0.14, 0.16, 0.18, 0.21, 0.25, 0.3)
MEAN_INTENSITY_BUCKETS = (0.05, 0.07, 0.08, 0.09, 0.1, 0.11, 0.12, 0.13, 0.14, 0.16, 0.18, 0.21, 0.25, 0.3)
BBOX_ASPECT_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5)
BUCKETS = {
    "confidence": CONFIDENCE_BUCKETS,
    "ink_fraction": INK_FRACTION_BUCKETS,
    "mean_intensity": MEAN_INTENSITY_BUCKETS,
    "bbox_aspect": BBOX_ASPECT_BUCKETS,
}
SCORES = ("digit_psi", *(f"{name}_ks" for name in BUCKETS))
EPS = 1e-4  # keeps ln() finite for a digit never predicted; the recording rules use the same
WINDOW = 1000  # images per calibration window; the alerts need at least this many predictions
RESAMPLES = 500
FALSE_ALARM = 0.01  # per score and window of WINDOW images from an unchanged distribution
INK_LEVEL = 128  # a pixel at or above this (0-255) is ink


def input_statistics(digits: np.ndarray) -> dict[str, np.ndarray]:
    """Ink fraction, mean intensity (0-1) and ink bounding-box aspect (width / height) of (n, 28, 28)."""
    ink = digits >= INK_LEVEL
    rows, cols = ink.any(2), ink.any(1)
    size = digits.shape[1]

    def extent(mask: np.ndarray) -> np.ndarray:
        first = mask.argmax(1)
        last = size - 1 - mask[:, ::-1].argmax(1)
        return np.where(mask.any(1), last - first + 1, 0)

    height, width = extent(rows), extent(cols)
    return {
        "ink_fraction": ink.mean((1, 2)),
        "mean_intensity": digits.mean((1, 2)) / 255.0,
        "bbox_aspect": np.where(height > 0, width / np.maximum(height, 1), 0.0),
    }


def cdf(values: np.ndarray, edges: tuple[float, ...]) -> np.ndarray:
    """The share of values <= each edge: what a Prometheus histogram's buckets give, divided by its count."""
    return np.searchsorted(np.sort(values), np.asarray(edges), side="right") / max(len(values), 1)


def digit_share(predictions: np.ndarray) -> np.ndarray:
    return np.bincount(predictions, minlength=10) / max(len(predictions), 1)


def psi(live: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sum((live - ref) * np.log((live + EPS) / (ref + EPS))))


def ks(live_cdf: np.ndarray, ref_cdf: np.ndarray) -> float:
    return float(np.max(np.abs(live_cdf - ref_cdf)))


def _distributions(probs: np.ndarray, stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"confidence": probs.max(1), **stats}


def scores(reference: dict[str, Any], probs: np.ndarray, digits: np.ndarray) -> dict[str, float]:
    """Every drift score of a sample (probabilities and 28x28 inputs) against a reference."""
    values = _distributions(probs, input_statistics(digits))
    out = {"digit_psi": psi(digit_share(probs.argmax(1)), np.asarray(reference["digit_share"]))}
    for name, edges in BUCKETS.items():
        out[f"{name}_ks"] = ks(cdf(values[name], edges), np.asarray(reference["cdf"][name]))
    return out


def build_reference(
    probs: np.ndarray, digits: np.ndarray, *, seed: int = 0, on_progress: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    """The reference and calibrated thresholds from the test set's probabilities and model inputs."""
    values = _distributions(probs, input_statistics(digits))
    reference: dict[str, Any] = {
        "images": len(probs),
        "digit_share": digit_share(probs.argmax(1)).round(6).tolist(),
        "buckets": {name: list(edges) for name, edges in BUCKETS.items()},
        "cdf": {name: cdf(values[name], edges).round(6).tolist() for name, edges in BUCKETS.items()},
        "eps": EPS,
        "window": WINDOW,
        "resamples": RESAMPLES,
        "false_alarm_rate": FALSE_ALARM,
    }
    rng = np.random.default_rng(seed)
    sampled: dict[str, list[float]] = {score: [] for score in SCORES}
    for _ in range(RESAMPLES):
        pick = rng.integers(0, len(probs), WINDOW)
        for score, value in scores(reference, probs[pick], digits[pick]).items():
            sampled[score].append(value)
        on_progress()
    reference["thresholds"] = {
        score: round(float(np.quantile(sampled[score], 1 - FALSE_ALARM)), 6) for score in SCORES
    }
    return reference


def le_label(edge: float) -> str:
    """An edge as Prometheus's client writes it in a bucket's `le` label; the reference gauges carry the
    same string in `edge`, which the recording rules copy into `le` to join the live buckets."""
    return floatToGoString(edge)
