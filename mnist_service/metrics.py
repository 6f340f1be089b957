"""Prometheus metrics, in a registry each app owns (so tests can build many apps side by side).

With several worker processes (WORKERS > 1) every process writes its samples to files in a
shared folder (prometheus_client's multiprocess mode) and /metrics adds them up, so a scrape
that reaches any worker sees the whole server.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from mnist_service.monitoring import drift

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


# Up to this many values, observe() one at a time is cheaper than counting them per bucket.
_OBSERVE_ONE_BY_ONE = 4


def observe_many(histogram: Any, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every v (a labelled child or an unlabelled histogram), written once per bucket.

    In multiprocess mode each observation is two writes to a memory-mapped file, each under a
    lock: per image, the confidence and the three input statistics were eight of them. This
    counts the values per bucket first (a value goes to the first bucket whose upper bound is
    >= it, as in Histogram.observe) and adds each count and the sum once. prometheus_client has
    no public call for it, so this reads the histogram's bucket bounds and values.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) <= _OBSERVE_ONE_BY_ONE:
        for value in values.tolist():
            histogram.observe(value)
        return
    bounds = histogram._upper_bounds
    index = np.searchsorted(bounds, values, side="left")
    counts = np.bincount(index[index < len(bounds)], minlength=len(bounds))  # NaN fits no bucket, as in observe()
    for bucket, count in zip(histogram._buckets, counts.tolist(), strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(float(values.sum()))


# The prediction routes and statuses the SLO rules read, whose series exist from start-up.
STARTUP_ENDPOINTS = ("/predict", "/v2/models/{model_name}/infer")
STARTUP_STATUSES = ("200", "500", "503")
STARTUP_GRPC_CODES = ("OK", "INTERNAL", "UNAVAILABLE")  # gRPC's twins of STARTUP_STATUSES


class Metrics:
    """All the service's metrics; the names share the `mnist_` prefix."""

    def __init__(self, multiprocess_mode: bool = False) -> None:
        self.multiprocess_mode = multiprocess_mode
        # (endpoint, method, status, version) -> (request counter, latency histogram) children: bounded,
        # since unknown paths all count as "unmatched".
        self._request_children: dict[tuple[str, str, int, str], tuple[Any, Any]] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mnist_requests", "HTTP requests by endpoint, status and the model version that answered ('' for none).",
            ["endpoint", "method", "status", "version"], registry=r,
        )
        self.request_latency = Histogram(
            "mnist_request_latency_seconds", "Time from request to response, by model version.",
            ["endpoint", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        # At 0 from the start (version '' until one answers), so that the SLO rules and the dashboard's
        # error and latency panels have a series on a fresh server instead of "No data".
        for endpoint in STARTUP_ENDPOINTS:
            for status in STARTUP_STATUSES:
                self.requests.labels(endpoint, "POST", status, "")
            self.request_latency.labels(endpoint, "")
        # The gRPC front door's calls (serving/grpc), apart from the HTTP requests: gRPC status codes are not
        # HTTP statuses, and the rules and dashboards read `status` as HTTP's.
        self.grpc_requests = Counter(
            "mnist_grpc_requests", "gRPC calls by method, status code and the model version that answered ('' for "
            "none). CANCELLED: the client cancelled, DEADLINE_EXCEEDED: its deadline passed; either way its queued "
            "work was dropped (HTTP's 499).",
            ["method", "code", "version"], registry=r,
        )
        self.grpc_request_latency = Histogram(
            "mnist_grpc_request_latency_seconds", "Time from a gRPC call's arrival to its answer, by method and "
            "model version.", ["method", "version"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        # At 0 from the start, as the HTTP series above (with GRPC_PORT=0 too: the rules read both protocols).
        for code in STARTUP_GRPC_CODES:
            self.grpc_requests.labels("ModelInfer", code, "")
        self.grpc_request_latency.labels("ModelInfer", "")
        self.inference_time = Histogram(
            "mnist_inference_seconds", "Forward pass time per batch.", buckets=_FAST_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "mnist_batch_size", "Images per forward pass.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.queue_wait = Histogram(
            "mnist_queue_wait_seconds", "Time a request waited for its forward pass.", buckets=_FAST_BUCKETS, registry=r
        )
        self.queue_depth = Gauge(
            "mnist_queue_depth", "Requests waiting for inference.", multiprocess_mode="livesum", registry=r
        )
        self.rejected = Counter(
            "mnist_rejected", "Requests refused for overload, by reason.", ["reason"], registry=r
        )
        for reason in ("queue_full", "deadline"):  # at 0 from the start, so the first burst counts in rate()
            self.rejected.labels(reason)
        self.predictions = Counter(
            "mnist_predictions", "Predicted digits, by model version.", ["digit", "version"], registry=r
        )
        self.confidence = Histogram(
            "mnist_prediction_confidence", "Top-class probability, by model version; a shift is a drift signal.",
            ["version"], buckets=drift.CONFIDENCE_BUCKETS, registry=r,
        )
        # The 28x28 the model saw, summarised: drift in what clients send shows here first.
        self.inputs = {
            name: Histogram(
                f"mnist_input_{name}", text, ["version"], buckets=drift.BUCKETS[name], registry=r
            )
            for name, text in (
                ("ink_fraction", "Share of the 28x28 input's pixels that are ink (>= 128)."),
                ("mean_intensity", "Mean pixel value of the 28x28 input, 0-1."),
                ("bbox_aspect", "Width / height of the ink's bounding box in the 28x28 input."),
            )
        }
        # The drift reference saved with each model version, so recording rules can compare live with it.
        self.drift_share = Gauge(
            "mnist_drift_reference_share", "Share of each predicted digit on the test set (the reference).",
            ["version", "digit"], multiprocess_mode="livemax", registry=r,
        )
        self.drift_cdf = Gauge(
            "mnist_drift_reference_cdf", "Reference share of answers at or below each bucket edge (the `le` of "
            "the live histogram's bucket, named `edge` here: `le` belongs to histograms), per statistic.",
            ["version", "statistic", "edge"], multiprocess_mode="livemax", registry=r,
        )
        self.drift_threshold = Gauge(
            "mnist_drift_threshold", "Drift score above which an unchanged input stream is this rare "
            "(drift_reference.false_alarm_rate per window of drift_reference.window predictions).",
            ["version", "score"], multiprocess_mode="livemax", registry=r,
        )
        self.shadow = Counter(
            "mnist_shadow_comparisons",
            "Requests answered by stable that the canary also ran: outcome agree or disagree (same digit or "
            "not), skipped (the server was busy, or SHADOW_SAMPLE), failed.",
            ["stable", "canary", "outcome"], registry=r,
        )
        self.shadow_confidence = Histogram(
            "mnist_shadow_confidence", "The canary's top-class probability on shadowed requests.",
            ["canary"], buckets=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0), registry=r,
        )
        self.version_loads = Counter(
            "mnist_model_version_loads", "Model versions loaded by a worker, by outcome (ready or failed).",
            ["version", "outcome"], registry=r,
        )
        self.header_timeouts = Counter(
            "mnist_header_timeouts",
            "Connections closed with 408 because a request's headers did not arrive within HEADER_TIMEOUT_S.",
            registry=r,
        )
        self.heads_refused = Counter(
            "mnist_heads_refused",
            "Requests answered 431 and closed because their headers were over MAX_HEADER_BYTES or MAX_HEADERS.",
            registry=r,
        )
        # Ground truth (docs/ground-truth.md): captures, the labels sent back, live accuracy.
        self.captures = Counter(
            "mnist_captures", "Captured images (the 28x28 input, the answer, the request id) written to the capture "
            "database (CAPTURE_SAMPLE of the requests).", registry=r,
        )
        self.capture_dropped = Counter(
            "mnist_capture_dropped", "Captured images not stored, by reason: buffer_full (the database is slower "
            "than the traffic), database_error (it is down, full or read-only and CAPTURE_BUFFER filled), shutdown "
            "(still unwritten when the worker stopped).", ["reason"], registry=r,
        )
        self.capture_cpu = Counter(
            "mnist_capture_writer_cpu_seconds", "CPU time of the workers' capture writer threads (packing captures "
            "into batches, writing them, retention): what capture costs besides one append per captured request on "
            "the event loop.", registry=r,
        )
        self.feedback = Counter(
            "mnist_feedback", "Labels received for captured predictions (POST /feedback), by the version that "
            "answered and whether its answer was correct or wrong; a label that replaces an earlier one is not "
            "counted again.", ["version", "outcome"], registry=r,
        )
        self.feedback_wrong = Counter(
            "mnist_feedback_wrong", "Wrong answers that feedback revealed, by version, the digit predicted and the "
            "label given: the confusion of the model's mistakes.", ["version", "predicted", "label"], registry=r,
        )
        self.labelled_captures = Gauge(
            "mnist_labelled_captures", "Labelled captures in the capture database, per class: the ground truth "
            "that retraining (model_train.py --feedback) can use.", ["label"], multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.test_accuracy = Gauge(
            "mnist_model_test_accuracy", "A model version's accuracy on the MNIST test set, from its metadata, "
            "exported for the versions feedback arrived for (live accuracy is compared with it).", ["version"],
            multiprocess_mode="max", registry=r,
        )
        # A gauge fixed at 1, not an Info: multiprocess mode cannot aggregate Info metrics.
        self.model_info = Gauge(
            "mnist_model_info", "1 for each model version loaded and ready (0 once unloaded), with its labels and "
            "the runtime serving it (torchscript or onnxruntime).",
            ["version", "sha256", "test_accuracy", "label", "runtime"], multiprocess_mode="max", registry=r,
        )

    def request_done(self, endpoint: str, method: str, status: int, version: str, seconds: float) -> None:
        """Count one answered request and its latency; each label set's children are looked up once."""
        key = (endpoint, method, status, version)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(endpoint, method, str(status), version),
                self.request_latency.labels(endpoint, version),
            )
        children[0].inc()
        children[1].observe(seconds)

    def grpc_call_done(self, method: str, code: str, version: str, seconds: float) -> None:
        """Count one answered gRPC call and its latency."""
        self.grpc_requests.labels(method, code, version).inc()
        self.grpc_request_latency.labels(method, version).observe(seconds)

    def render(self) -> bytes:
        if not self.multiprocess_mode:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)


class SupervisorMetrics:
    """What the supervisor process counts. It must be built after PROMETHEUS_MULTIPROC_DIR is set:
    then its samples go to the shared folder and every worker's scrape includes them."""

    def __init__(self) -> None:
        r = CollectorRegistry()
        self.worker_deaths = Counter(
            "mnist_worker_deaths", "Worker processes that died unexpectedly, by cause (signal or exit code, or hung: "
            "killed after WORKER_TIMEOUT_S without a heartbeat); each is replaced until WORKER_RESTART_LIMIT.",
            ["cause"], registry=r,
        )
        # At 0 from the start, so the panel shows a healthy server and increase() counts the first death.
        # Other causes (a rarer signal, another exit code) appear when they first happen.
        for cause in ("hung", "SIGKILL", "SIGSEGV", "SIGABRT", "exit 1"):
            self.worker_deaths.labels(cause)
        self.connections_refused = Counter(
            "mnist_connections_refused",
            "Connections answered 503 at once because every worker held MAX_CONNECTIONS.", registry=r,
        )
