"""The model versions one worker holds: the single owner of "which version answers this request".

Each worker reads the repository every REPOSITORY_POLL_S (and at once when the management API
asks) and reconciles: a version the policy or a label now selects is loaded, verified and warmed
beside the ones serving; only when it is ready do labels and the default move to it; a version
no longer selected stops taking new requests, finishes its queue, and is freed. Every version has
its own Predictor (queue, batcher, inference thread), so one batch never mixes versions.

No worker tells another anything: they all read the same files, so every worker of every pod
that mounts the repository converges within a poll. The management API's unload, which can't
write to a read-only repository, is shared the same way through a file in the server's runtime
folder (one per pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from mnist_service.errors import ModelNotReady, NotFound, ServiceError
from mnist_service.inference.integrity import ModelLoadError
from mnist_service.inference.predictor import Predictor
from mnist_service.inference.runtime import servable_by
from mnist_service.metrics import Metrics
from mnist_service.registry.repository import LABELS, ModelConfig, Repository, RepositoryError, VersionFiles
from mnist_service.settings import Settings

logger = logging.getLogger(__name__)

# Builds a ready-to-start Predictor from a version's files (load, verify, optimise, warm): blocking.
PredictorFactory = Callable[[VersionFiles, str], Predictor]


class State(StrEnum):
    """A version's state, named as the v2 repository index names them."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


class VersionBusy(ServiceError):
    """The version asked for is loading or unloading: retry shortly."""

    code = 503

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


@dataclass(eq=False)
class Version:
    """One model version as this worker holds it."""

    number: int
    files: VersionFiles
    state: State = State.LOADING
    reason: str = ""
    predictor: Predictor | None = None
    signature: tuple[Any, ...] = field(default=())
    runtimes: list[str] = field(default_factory=list)  # what its files allow (an ONNX export or not)

    @property
    def name(self) -> str:
        return str(self.number)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.predictor.metadata if self.predictor is not None else {}

    def serving(self) -> Predictor:
        """The version's predictor; a version that has none (loading, or failed) answers 503."""
        if self.predictor is None:
            raise VersionBusy(f"model version {self.name} is {self.state.lower()}; retry shortly")
        return self.predictor


class Registry:
    """Every version of one model in this worker, its labels and its default; reconciled with the disk."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        factory: PredictorFactory,
        overrides_path: Path | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.factory = factory
        self.model_name = settings.model_name
        self.single_file = settings.model_path is not None
        self.repository = Repository(settings.model_repository, settings.model_name)
        self.overrides_path = overrides_path  # the management API's unload, shared by this server's workers
        self.versions: dict[int, Version] = {}
        self.labels: dict[str, int] = {}
        self._default: int | None = None
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._config_problem: str | None = None
        self._info: set[tuple[str, ...]] = set()  # model_info series set to 1, so moved labels can be zeroed
        self._unloaded_here = False  # the management API's unload, when there is no shared runtime folder
        self.unloaded = False  # as last read: every version unloaded on the management API's request

    # ---- what requests see -------------------------------------------------------------

    @property
    def default(self) -> Version | None:
        version = self.versions.get(self._default) if self._default is not None else None
        return version if version is not None and version.state is State.READY else None

    def held(self) -> list[Version]:
        """Every version this worker knows, in order."""
        return sorted(self.versions.values(), key=lambda v: v.number)

    def ready(self) -> list[Version]:
        """The versions that can answer, in order."""
        return [v for v in self.held() if v.state is State.READY]

    @property
    def canary(self) -> Version | None:
        number = self.labels.get("canary")
        version = self.versions.get(number) if number is not None else None
        return version if version is not None and version.state is State.READY else None

    def resolve(self, requested: str | None) -> Version:
        """The version a request asked for (a number, `stable`, `canary`, or nothing: the default).

        404 names what is loaded; 503 + Retry-After for a version loading or unloading.
        """
        if not requested:
            version = self.default
            if version is None:
                if self.unloaded:
                    raise ModelNotReady(
                        f"model '{self.model_name}' was unloaded through the repository API; "
                        f"POST /v2/repository/models/{self.model_name}/load brings it back"
                    )
                raise ModelNotReady()
            return version
        if requested in LABELS:
            number = self.labels.get(requested)
            if number is None:
                raise NotFound(f"no version is labelled '{requested}'; {self._loaded_text()}")
        elif requested.isdigit():
            number = int(requested)
        else:
            raise NotFound(
                f"unknown model version '{requested[:40]}': use a version number, stable or canary; "
                f"{self._loaded_text()}"
            )
        version = self.versions.get(number)
        if version is None:
            raise NotFound(f"model version {number} is not loaded; {self._loaded_text()}")
        if version.state is State.READY:
            return version
        if version.state is State.UNAVAILABLE:
            raise NotFound(f"model version {number} could not be loaded ({version.reason}); {self._loaded_text()}")
        raise VersionBusy(f"model version {number} is {version.state.lower()}; retry shortly")

    def _loaded_text(self) -> str:
        ready = self.ready()
        if not ready:
            return "no version is loaded"

        def named(version: Version) -> str:
            labels = self.labels_of(version.number)
            return f"{version.name} ({', '.join(labels)})" if labels else version.name

        return f"loaded: {', '.join(named(v) for v in ready)}"

    def labels_of(self, number: int) -> list[str]:
        return [label for label, n in self.labels.items() if n == number]

    def index(self) -> list[dict[str, str]]:
        """The v2 repository index: every version this worker holds with its state and reason, then
        those on disk it does not hold, as UNAVAILABLE with why."""
        entries = {
            v.number: {"name": self.model_name, "version": v.name, "state": v.state.value, "reason": v.reason}
            for v in self.held()
        }
        if not self.single_file:
            why = "unloaded through the repository API" if self.unloaded else "not selected by the version policy"
            for files in self.repository.versions():
                entries.setdefault(
                    files.number,
                    {"name": self.model_name, "version": str(files.number), "state": State.UNAVAILABLE.value,
                     "reason": why},
                )
        return [entries[number] for number in sorted(entries)]

    def failures(self) -> str:
        """Why versions could not be loaded, one `version N: reason` each; empty if none failed."""
        return "; ".join(f"version {v.name}: {v.reason}" for v in self.held() if v.reason)

    # ---- shadow comparison ------------------------------------------------------------

    def shadow(self, answered_by: Version, digits: np.ndarray, probs: np.ndarray) -> None:
        """Also run the canary on what stable just answered, off the answer's path, and count agreement.

        Only stable's answers to requests that named no version are shadowed (the routes call this
        only for those: a pinned request is the client's own comparison), and shadow work is the
        first thing skipped when the server is busy.
        """
        canary = self.canary
        if canary is None or canary is answered_by or answered_by.number != self.labels.get("stable"):
            return
        counter = self.metrics.shadow
        if random.random() >= self.settings.shadow_sample:  # noqa: S311  # nosec B311  # sampling, not security
            counter.labels(answered_by.name, canary.name, "skipped").inc(len(digits))
            return
        if answered_by.serving().busy() or canary.serving().busy():
            counter.labels(answered_by.name, canary.name, "skipped").inc(len(digits))
            return
        task = asyncio.create_task(self._compare(answered_by.name, canary, digits, probs.argmax(1)))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _compare(self, stable: str, canary: Version, digits: np.ndarray, expected: np.ndarray) -> None:
        counter = self.metrics.shadow
        try:
            probs = await canary.serving().predict(digits)
        except Exception as exc:  # overload, unloading, a failing model: counted, never raised
            outcome = "skipped" if isinstance(exc, ServiceError) and exc.status_code == 503 else "failed"
            counter.labels(stable, canary.name, outcome).inc(len(digits))
            return
        agree = int((probs.argmax(1) == expected).sum())
        if agree:
            counter.labels(stable, canary.name, "agree").inc(agree)
        if agree < len(digits):
            counter.labels(stable, canary.name, "disagree").inc(len(digits) - agree)
        histogram = self.metrics.shadow_confidence.labels(canary.name)
        for confidence in probs.max(1):
            histogram.observe(float(confidence))

    # ---- reconciling with the repository ------------------------------------------------

    async def start(self) -> None:
        """Load what the repository selects; fails (ModelLoadError) if no version can serve."""
        await self.sync()
        if self.default is None:
            reasons = self.failures()
            raise ModelLoadError(
                f"no model version could be loaded from {self.where()}"
                + (f" ({reasons})" if reasons else ": train one with `python model_train.py`")
            )
        if not self.single_file:
            self._poller = asyncio.create_task(self._poll(), name="repository-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for task in list(self._shadow_tasks):
            task.cancel()
        for version in list(self.versions.values()):
            if version.predictor is not None:
                await version.predictor.stop()

    def where(self) -> str:
        return str(self.settings.model_path) if self.single_file else str(self.repository.folder)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.sync()
            except Exception:
                logger.exception("reading the model repository failed; serving on with what is loaded")

    def _desired(self) -> tuple[list[VersionFiles], ModelConfig]:
        """The versions to hold, and the config (labels), read from disk."""
        if self.settings.model_path is not None:  # one file: a repository of one version
            files = VersionFiles(1, self.settings.model_path, self.settings.resolved_metadata_path)
            return [files], ModelConfig(labels={"stable": 1})
        on_disk = {v.number: v for v in self.repository.versions()}
        try:
            config = self.repository.read_config()
            if self._config_problem is not None:
                logger.info("%s is valid again", self.repository.config_path)
            self._config_problem = None
        except RepositoryError as exc:
            if str(exc) != self._config_problem:  # say it once, not every poll
                logger.error("%s; keeping the versions and labels in service", exc)
            self._config_problem = str(exc)
            return [self.versions[n].files for n in self.versions], ModelConfig(labels=dict(self.labels))
        self.unloaded = self._unloaded()
        if self.unloaded:
            return [], ModelConfig()
        return [on_disk[n] for n in config.select(sorted(on_disk))], config

    def _unloaded(self) -> bool:
        if self.overrides_path is None:
            return self._unloaded_here
        try:
            return bool(json.loads(self.overrides_path.read_text()).get(self.model_name, {}).get("unloaded"))
        except (OSError, ValueError):
            return False

    async def set_unloaded(self, unloaded: bool) -> None:
        """The management API's load (False) and unload (True), for every worker of this server."""
        if self.overrides_path is None:
            self._unloaded_here = unloaded
        else:
            try:
                state = json.loads(self.overrides_path.read_text())
            except (OSError, ValueError):
                state = {}
            state.setdefault(self.model_name, {})["unloaded"] = unloaded
            tmp = self.overrides_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            tmp.replace(self.overrides_path)
        await self.sync()

    async def sync(self) -> None:
        """Reconcile with the repository: load what is new, then move labels, then unload what is gone."""
        async with self._lock:
            desired, config = self._desired()
            wanted = {files.number: files for files in desired}
            loads = []
            for number, files in wanted.items():
                current = self.versions.get(number)
                if current is None or (current.state is State.UNAVAILABLE and current.signature != files.signature()):
                    version = Version(number, files, signature=files.signature())
                    self.versions[number] = version
                    loads.append(self._load(version))
            await asyncio.gather(*loads)
            self._move_labels(config)
            # What serves now stays until something ready replaces it (a failed stable keeps the old),
            # unless the management API unloaded the model.
            keep = set(wanted) | ({self._default, *self.labels.values()} if not self.unloaded else set())
            leaving = [v for n, v in self.versions.items() if n not in keep]
            for version in leaving:
                if version.state is State.UNAVAILABLE or version.predictor is None:
                    del self.versions[version.number]
            await asyncio.gather(*(self._unload(v) for v in leaving if v.predictor is not None))
            self._export_info()

    async def _load(self, version: Version) -> None:
        logger.info("loading model version %s from %s", version.name, version.files.model_path.parent)
        try:
            predictor = await asyncio.to_thread(self.factory, version.files, version.name)
            await predictor.start()
        except (ModelLoadError, OSError, RuntimeError, ValueError, KeyError) as exc:
            version.state, version.reason = State.UNAVAILABLE, str(exc)
            with contextlib.suppress(ModelLoadError, OSError):
                version.runtimes = servable_by(version.files.verify("torchscript"))
            self.metrics.version_loads.labels(version.name, "failed").inc()
            logger.error("model version %s can't be served by %s: %s", version.name, self.settings.runtime, exc)
            return
        version.predictor, version.state = predictor, State.READY
        version.runtimes = servable_by(predictor.metadata)
        self.metrics.version_loads.labels(version.name, "ready").inc()
        logger.info(
            "model version %s ready (sha256 %s, test accuracy %s)",
            version.name, predictor.sha256[:12], predictor.metadata.get("test_accuracy"),
        )

    def _move_labels(self, config: ModelConfig) -> None:
        """Point labels at ready versions only, and pick the default: stable, else the one serving, else the newest."""
        labels = {}
        for label, number in config.labels.items():
            version = self.versions.get(number)
            if version is not None and version.state is State.READY:
                labels[label] = number
            elif label in self.labels and self.labels[label] in self.versions and label == "stable":
                labels[label] = self.labels[label]  # the new stable failed: the old one keeps serving
        previous = self._default
        stable = labels.get("stable")
        if self.unloaded:
            self._default = None
        elif stable is not None:
            self._default = stable
        elif self.default is None:
            ready = self.ready()
            self._default = max(v.number for v in ready) if ready else None
        self.labels = labels
        if "stable" in labels and "canary" in labels:  # at 0 from the start, so rate() counts the first ones
            for outcome in ("agree", "disagree", "skipped", "failed"):
                self.metrics.shadow.labels(str(labels["stable"]), str(labels["canary"]), outcome)
        if self._default != previous and self._default is not None:
            logger.info("default model version: %s (was %s)", self._default, previous)

    async def _unload(self, version: Version) -> None:
        version.state = State.UNLOADING
        logger.info("unloading model version %s: finishing its queue", version.name)
        await version.serving().drain()
        del self.versions[version.number]
        logger.info("model version %s unloaded", version.name)

    def _export_info(self) -> None:
        series = set()
        for version in self.ready():
            labels = ",".join(self.labels_of(version.number))
            accuracy = str(version.metadata.get("test_accuracy"))
            series.add((version.name, version.serving().sha256, accuracy, labels, version.serving().runtime.name))
        for stale in self._info - series:
            self.metrics.model_info.labels(*stale).set(0)
        for current in series - self._info:
            self.metrics.model_info.labels(*current).set(1)
        self._info = series
