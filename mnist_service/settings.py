"""The service's one settings object, read from the environment (and CLI overrides)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RuntimeName = Literal["torchscript", "onnxruntime"]


def torch_installed() -> bool:
    """Whether torch can be imported here, found without importing it (that takes seconds and ~400 MB)."""
    return importlib.util.find_spec("torch") is not None


def default_runtime() -> RuntimeName:
    """TorchScript, the model format training publishes, where torch is installed; else ONNX Runtime."""
    return "torchscript" if torch_installed() else "onnxruntime"


class Settings(BaseSettings):
    """Every knob of the server. Each field is read from the env var of the same name, upper-cased."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    model_repository: Path = Field(
        Path("models"),
        description="The model repository: MODEL_NAME/<version>/model.pt + model.json, and MODEL_NAME/config.json "
        "for the version policy and labels. Ignored when MODEL_PATH is set.",
    )
    model_path: Path | None = Field(
        None, description="Serve this one TorchScript file instead of a repository: a repository of one version, 1."
    )
    metadata_path: Path | None = Field(
        None, description="With MODEL_PATH: its metadata JSON; defaults to the model path with a .json suffix."
    )
    model_name: str = Field(
        "mnist", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Model name: its folder in the repository and in v2."
    )
    repository_poll_s: float = Field(
        2.0, gt=0, description="How often each worker reads the repository for new versions and label changes."
    )
    shadow_sample: float = Field(
        1.0, ge=0, le=1, description="Share of the requests answered by stable that the canary also runs, off the "
        "answer's path, to measure agreement; skipped first when the server is busy.",
    )
    admin_api_key: SecretStr | None = Field(
        None, description="When set, the v2 model repository API (index, load, unload) is on and needs this key."
    )
    host: str = Field(  # nosec B104 - a container must listen on all interfaces
        "0.0.0.0", description="The interface the HTTP server binds: every one by default, as a container needs."  # noqa: S104
    )
    port: int = Field(8000, ge=1, le=65535, description="The HTTP port.")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="The Open Inference Protocol over gRPC listens here (docs/grpc.md), in "
        "every worker (SO_REUSEPORT); 0 turns it off.",
    )
    grpc_max_concurrent_streams: int = Field(
        100, ge=1, description="gRPC calls one connection may have in flight at once; a client's further calls "
        "wait on its side.",
    )
    grpc_max_connection_idle_s: float = Field(
        300.0, gt=0, description="A gRPC connection with no call in flight for this long is closed (GOAWAY), so "
        "idle clients cannot pin a worker's connections.",
    )
    grpc_max_connection_age_s: float = Field(
        600.0, gt=0, description="A gRPC connection is closed after this long, its calls given "
        "SHUTDOWN_TIMEOUT_SECONDS to finish; clients reconnect, so long-lived ones spread over workers and pods.",
    )
    log_level: str = Field("info", description="debug, info, warning or error: the lowest level logged.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: a line for people; json: one JSON object per line, with the request id and "
        "the W3C trace context (trace_id, span_id from a traceparent header).",
    )
    access_log: Literal["all", "errors", "off"] = Field(
        "errors",
        description="Which requests get a log line with their request id: every one, those answered 4xx/5xx, "
        "or none. A line per request costs a few % of the server's CPU under load (docs/performance.md).",
    )

    workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Server processes. Each has one event loop and one inference thread: two fill two cores.",
    )
    runtime: RuntimeName = Field(
        default_factory=default_runtime, description="What runs the model: torchscript (model.pt) or onnxruntime "
        "(model.onnx beside it; versions published before ONNX export can't be served by it). Unset: torchscript "
        "where torch is installed, else onnxruntime (the slim image). docs/runtimes.md says when to choose which.",
    )
    torch_threads: int = Field(
        1,
        ge=1,
        description="Intra-op threads per worker for inference, for either runtime (ONNX Runtime never "
        "spin-waits); with one per worker the workers share the cores.",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="The most images one forward pass takes.")
    max_batch_delay_ms: float = Field(
        0.0,
        ge=0,
        description="How long the batcher waits after the first request of a batch. 0 = batch whatever "
        "queued during the previous forward pass (measured best here: benchmarks/batching.md).",
    )
    max_queue: int = Field(512, ge=1, description="Requests waiting for inference before 503s start.")
    request_timeout_s: float = Field(
        5.0, gt=0, description="Per-request deadline from arrival to answer; 503 after it."
    )
    max_upload_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="The largest request body; over it, 413 before the body is read."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Larger images are refused as decompression bombs."
    )
    max_batch_files: int = Field(64, ge=1, le=100_000, description="Files accepted by /predict/batch and v2 N.")
    decode_threads: int = Field(2, ge=1, description="Threads that decode uploaded images.")

    hot_path: bool = Field(
        True, description="Answer POST /predict and the v2 infer routes in the HTTP protocol layer, below ASGI "
        "(the same answers, a fraction of the CPU); off: FastAPI answers every request.",
    )
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="A request's line and headers together may be this long; over it, "
        "431 and the connection closed.",
    )
    max_headers: int = Field(100, ge=8, description="Headers one request may send; over it, 431 and closed.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="A connection must send a request's complete headers within this long "
        "(from connecting, or from the previous answer on a kept-alive connection); then 408 and closed.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="Once its headers are in, a request's whole body must arrive within this "
        "long; then 408 and the connection closed.",
    )
    keepalive_timeout_s: float = Field(
        5.0, gt=0, description="An idle keep-alive connection is closed after this long without a new request.",
    )
    max_connections: int = Field(
        1000, ge=1, description="Open connections per worker. When every worker is at it, new connections "
        "are answered 503 at once and closed, so a flood of idle clients cannot exhaust file descriptors.",
    )
    worker_restart_limit: int = Field(
        5, ge=0, description="Worker deaths tolerated within WORKER_RESTART_WINDOW_S: each dead worker is "
        "replaced; one death more and the server exits non-zero (a crash loop is the orchestrator's to see).",
    )
    worker_restart_window_s: float = Field(60.0, gt=0, description="The window WORKER_RESTART_LIMIT counts in.")
    worker_timeout_s: float = Field(
        15.0, ge=1, description="A worker whose event loop stops turning, or whose forward pass runs, this long is "
        "hung: it is killed and replaced (counted as a death). It gets no new connections after 1 s without a "
        "heartbeat. Keep it over REQUEST_TIMEOUT_S and under the liveness probe's window (k8s/base/deployment.yaml).",
    )

    shutdown_drain_seconds: float = Field(
        5.0, ge=0, description="After SIGTERM: keep serving this long while /readyz says 503."
    )
    shutdown_timeout_seconds: float = Field(
        10.0, ge=0, description="Then: how long in-flight requests get to finish."
    )

    prometheus_multiproc_dir: Path | None = Field(
        None, description="Set by the server itself when it runs several workers: where their metrics meet."
    )
    runtime_dir: Path | None = Field(
        None, description="Set by the server itself: a folder its workers share (the repository API's unload)."
    )

    api_key: SecretStr | None = Field(
        None, description="When set, prediction endpoints need Bearer or X-API-Key."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Allowed CORS origins; empty means CORS is off."
    )

    capture_sample: float = Field(
        0.0, ge=0, le=1, description="Share of requests whose 28x28 inputs, answers and request id are kept in "
        "CAPTURE_DATABASE for feedback (POST /feedback) and retraining (docs/ground-truth.md). 0: capture and "
        "feedback are off; 1: every prediction.",
    )
    capture_database: str = Field(
        "captures.sqlite3", description="Where captures go: a SQLite file (a path or sqlite:///path; WAL mode, "
        "shared by the server's workers) or postgresql://user:password@host/db for several pods or servers.",
    )
    capture_max_rows: int | None = Field(
        1_000_000, ge=1, description="Captured images kept at most; the oldest unlabelled go first, then the oldest "
        "labelled. Enforced every minute while serving. Unset: no limit.",
    )
    capture_max_days: float | None = Field(
        30.0, gt=0, description="Captures older than this are deleted, labelled or not (enforced every minute). "
        "Unset: kept until CAPTURE_MAX_ROWS.",
    )
    capture_buffer: int = Field(
        10_000, ge=1, description="Captured images a worker holds in memory while the database is slow or down; "
        "beyond it new captures are dropped and counted in mnist_capture_dropped_total.",
    )

    @field_validator("runtime")
    @classmethod
    def _runtime_available(cls, value: RuntimeName) -> RuntimeName:
        if value == "torchscript" and not torch_installed():
            raise ValueError(
                "RUNTIME=torchscript needs torch, which is not installed here (the slim image has none): "
                "use RUNTIME=onnxruntime, or the default image"
            )
        return value

    @property
    def resolved_metadata_path(self) -> Path:
        if self.model_path is None:
            raise ValueError("resolved_metadata_path needs MODEL_PATH")
        return self.metadata_path or self.model_path.with_suffix(".json")
