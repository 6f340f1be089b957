"""The model repository on disk, laid out like Triton's, read and written without torch.

    models/                    MODEL_REPOSITORY
      mnist/                   one folder per model (MODEL_NAME)
        config.json            version policy and labels (optional: defaults below)
        1/model.pt             a version: a numbered folder with the TorchScript file...
        1/model.json           ...and its metadata (sha256, accuracy, ...), checked before serving
        1/model.onnx           ...and its ONNX export for ONNX Runtime (versions published before it have none)
        2/...

Only folders named by a positive integer are versions, so a version being published (written
into a hidden temporary folder, then renamed into place) is never seen half-written. Writers of
config.json replace it atomically too; the running servers poll it and pick changes up.

config.json:

    {"version_policy": {"latest": {"num_versions": 2}},    or {"specific": {"versions": [1, 3]}}, {"all": {}}
     "labels": {"stable": 1, "canary": 2},
     "stable_history": [1]}                                 earlier stable versions, newest last, for rollback

A server loads the versions the policy selects plus every labelled one (a label must point at
something it can serve). The default version is `stable`, else the highest loaded.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnist_service.inference.integrity import ModelLoadError, onnx_path_for, read_verified_metadata, verify_onnx
from mnist_service.settings import RuntimeName, Settings

MODEL_FILE = "model.pt"
METADATA_FILE = "model.json"
CONFIG_FILE = "config.json"
LABELS = ("stable", "canary")
DEFAULT_POLICY: dict[str, Any] = {"latest": {"num_versions": 2}}


class RepositoryError(ValueError):
    """The repository or a request about it is wrong in a way a person can fix; says how."""


@dataclass
class ModelConfig:
    """The contents of a model's config.json."""

    version_policy: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_POLICY))
    labels: dict[str, int] = field(default_factory=dict)
    stable_history: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version_policy": self.version_policy, "labels": self.labels, "stable_history": self.stable_history}

    def select(self, versions: list[int]) -> list[int]:
        """The versions to serve out of those on disk: the policy's choice plus every labelled one."""
        chosen = set(_apply_policy(self.version_policy, versions))
        chosen |= {v for v in self.labels.values() if v in versions}
        return sorted(chosen)


def _apply_policy(policy: dict[str, Any], versions: list[int]) -> list[int]:
    if "all" in policy:
        return list(versions)
    if "specific" in policy:
        wanted = set(policy["specific"].get("versions", []))
        return [v for v in versions if v in wanted]
    count = policy.get("latest", {}).get("num_versions", 1)
    return sorted(versions)[-count:] if count > 0 else []


def _parse_config(raw: Any, path: Path) -> ModelConfig:
    if not isinstance(raw, dict):
        raise RepositoryError(f"{path} must hold a JSON object")
    policy = copy.deepcopy(raw.get("version_policy", DEFAULT_POLICY))  # never an alias of the default
    if not (isinstance(policy, dict) and len(policy) == 1 and next(iter(policy)) in ("latest", "specific", "all")):
        raise RepositoryError(
            f"{path}: version_policy must be one of {{\"latest\": {{\"num_versions\": N}}}}, "
            f"{{\"specific\": {{\"versions\": [...]}}}} or {{\"all\": {{}}}}, got {policy!r}"
        )
    kind, body = next(iter(policy.items()))
    if not isinstance(body, dict):
        raise RepositoryError(f"{path}: version_policy.{kind} must be an object, got {body!r}")
    if kind == "latest" and not (isinstance(body.get("num_versions"), int) and body["num_versions"] >= 1):
        raise RepositoryError(f"{path}: version_policy.latest.num_versions must be a whole number >= 1")
    if kind == "specific" and not (
        isinstance(body.get("versions"), list) and all(_is_version(v) for v in body["versions"])
    ):
        raise RepositoryError(f"{path}: version_policy.specific.versions must be a list of version numbers")
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(k in LABELS and _is_version(v) for k, v in labels.items()):
        raise RepositoryError(f"{path}: labels must map {' or '.join(LABELS)} to a version number, got {labels!r}")
    history = raw.get("stable_history", [])
    if not isinstance(history, list) or not all(_is_version(v) for v in history):
        raise RepositoryError(f"{path}: stable_history must be a list of version numbers")
    return ModelConfig(policy, dict(labels), list(history))


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_version_name(name: str) -> bool:
    # "2" only: "02" would be a second version 2, and int() refuses some str.isdigit() digits ("²").
    return name.isascii() and name.isdigit() and str(int(name)) == name and int(name) >= 1


@dataclass(frozen=True)
class VersionFiles:
    """Where one version's files are, and a signature that changes when they do."""

    number: int
    model_path: Path
    metadata_path: Path

    def signature(self) -> tuple[float | int, ...]:
        """mtime and size of its files: a version that failed to load is tried again only if they changed."""
        stats: list[float | int] = []
        for path in (self.model_path, self.metadata_path, onnx_path_for(self.model_path)):
            try:
                st = path.stat()
                stats += [st.st_mtime, st.st_size]
            except OSError:
                stats += [0.0, -1]
        return tuple(stats)

    def verify(self, runtime: RuntimeName | None = None) -> dict[str, Any]:
        """The version's metadata once its files pass the integrity checks; else ModelLoadError.

        For one runtime, the files it loads (onnxruntime needs the ONNX export); for none, every file the
        metadata records, as promoting a version should check.
        """
        metadata = read_verified_metadata(self.model_path, self.metadata_path)
        if runtime == "onnxruntime" or (runtime is None and metadata.get("onnx_sha256")):
            verify_onnx(self.model_path, metadata)
        return metadata


class Repository:
    """One model's folder in the repository: its versions, its config, and atomic writes to both."""

    def __init__(self, root: Path, model_name: str) -> None:
        self.root = root
        self.model_name = model_name
        self.folder = root / model_name

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_FILE

    def versions(self) -> list[VersionFiles]:
        """Every numbered folder, in order (whether or not its files are complete or valid)."""
        if not self.folder.is_dir():
            return []
        found = [
            VersionFiles(int(p.name), p / MODEL_FILE, p / METADATA_FILE)
            for p in self.folder.iterdir()
            if p.is_dir() and _is_version_name(p.name)
        ]
        return sorted(found, key=lambda v: v.number)

    def read_config(self) -> ModelConfig:
        """The model's config.json, or the defaults when there is none."""
        try:
            text = self.config_path.read_text()
        except FileNotFoundError:
            return ModelConfig()
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise RepositoryError(f"{self.config_path} is not valid JSON: {exc}") from exc
        return _parse_config(raw, self.config_path)

    def write_config(self, config: ModelConfig) -> None:
        """Replace config.json atomically: a server polling it reads the old or the new, never half."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _parse_config(config.to_json(), self.config_path)  # never write what a server would refuse
        _atomic_write(self.config_path, json.dumps(config.to_json(), indent=2) + "\n")

    def publish(self, build: Callable[[Path], None]) -> int:
        """Build a version in a hidden folder, then rename it to the next free number; returns it.

        `build(folder)` writes model.pt and model.json into the folder. Two publishers racing
        each get their own number: a rename onto an existing version fails and the next is tried.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".publishing-", dir=self.folder))
        try:
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server running as another user
            build(staging)
            for name in (MODEL_FILE, METADATA_FILE):
                if not (staging / name).is_file():
                    raise RepositoryError(f"publishing wrote no {name}")
            number = max((v.number for v in self.versions()), default=0) + 1
            while True:
                try:
                    os.rename(staging, self.folder / str(number))
                    return number
                except OSError:  # taken by a concurrent publisher (ENOTEMPTY/EEXIST)
                    if not (self.folder / str(number)).exists():
                        raise
                    number += 1
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already once renamed into place

    @contextlib.contextmanager
    def _changing_config(self) -> Iterator[None]:
        """Serialise read-modify-write of config.json between writers (two operators, two trainings)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / ".config.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def set_label(self, label: str, version: int | None) -> ModelConfig:
        """Point `label` at `version` (None clears it). Moving `stable` keeps the old one for rollback."""
        with self._changing_config():
            return self._set_label(label, version)

    def _set_label(self, label: str, version: int | None) -> ModelConfig:
        if label not in LABELS:
            raise RepositoryError(f"unknown label '{label}': use one of {', '.join(LABELS)}")
        config = self.read_config()
        if version is not None:
            self.check_servable(version)
        if label == "canary" and version is not None and version == config.labels.get("stable"):
            raise RepositoryError(f"version {version} is stable: a canary must be another version")
        current = config.labels.get(label)
        if version is None:
            if label == "stable":
                raise RepositoryError("stable can't be cleared: promote another version instead")
            config.labels.pop(label, None)
        else:
            if label == "stable" and current is not None and current != version:
                config.stable_history.append(current)
            config.labels[label] = version
        _drop_canary_equal_to_stable(config)
        self.write_config(config)
        return config

    def set_policy(self, policy: dict[str, Any]) -> tuple[dict[str, Any], ModelConfig]:
        """Replace the version policy; returns the old one and the new config."""
        with self._changing_config():
            config = self.read_config()
            before, config.version_policy = config.version_policy, policy
            self.write_config(config)
            return before, config

    def rollback(self) -> tuple[int, int]:
        """Move `stable` back to the version it pointed at before; returns (from, to)."""
        with self._changing_config():
            return self._rollback()

    def _rollback(self) -> tuple[int, int]:
        config = self.read_config()
        current = config.labels.get("stable")
        on_disk = {v.number for v in self.versions()}
        while config.stable_history:
            previous = config.stable_history.pop()
            if previous in on_disk and previous != current:
                try:
                    self.check_servable(previous)
                except RepositoryError as exc:
                    raise RepositoryError(
                        f"rollback refused: {exc}; promote a version that passes instead (see `list`)"
                    ) from exc
                config.labels["stable"] = previous
                _drop_canary_equal_to_stable(config)
                self.write_config(config)
                return current or 0, previous
        raise RepositoryError("nothing to roll back to: stable has no earlier version on disk (see `list`)")

    def check_servable(self, version: int) -> dict[str, Any]:
        """The version's metadata if it exists and passes the integrity checks; else RepositoryError."""
        files = {v.number: v for v in self.versions()}
        if version not in files:
            available = ", ".join(str(n) for n in files) or "none"
            raise RepositoryError(f"version {version} is not in {self.folder} (versions: {available})")
        try:
            return files[version].verify()
        except ModelLoadError as exc:
            raise RepositoryError(f"version {version} can't be served: {exc}") from exc


def _drop_canary_equal_to_stable(config: ModelConfig) -> None:
    if config.labels.get("canary") == config.labels.get("stable"):
        config.labels.pop("canary", None)  # a canary equal to stable compares nothing


def check_servable(settings: Settings) -> None:
    """Before any worker starts: the version that will be the default passes the integrity checks.

    The supervisor runs this without torch, so a server that can't serve says so in one line and
    exits, instead of each worker failing in turn. Other versions that fail are reported when
    a worker loads them, and never served.
    """
    if settings.model_path is not None:
        VersionFiles(1, settings.model_path, settings.resolved_metadata_path).verify(settings.runtime)
        return
    repository = Repository(settings.model_repository, settings.model_name)
    versions = repository.versions()
    if not versions:
        raise RepositoryError(
            f"no model version in {repository.folder}: publish one with `python model_train.py "
            f"--repository {settings.model_repository}`, or serve a single file with MODEL_PATH"
        )
    config = repository.read_config()
    numbers = config.select([v.number for v in versions])
    if not numbers:
        raise RepositoryError(f"the version policy in {repository.config_path} selects none of the versions on disk")
    default = config.labels.get("stable", max(numbers))
    try:
        next(v for v in versions if v.number == default).verify(settings.runtime)
    except StopIteration:
        raise RepositoryError(f"stable points at version {default}, which is not in {repository.folder}") from None
    except ModelLoadError as exc:
        raise RepositoryError(f"the stable version {default} can't be served by {settings.runtime}: {exc}") from exc


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a server running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
