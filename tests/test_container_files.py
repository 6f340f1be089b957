"""Static checks of the Dockerfile and .dockerignore; scripts/container_smoke.sh runs the image for real."""

from __future__ import annotations

import json
import re
import shlex
from fnmatch import fnmatch
from pathlib import Path

import pytest

from mnist_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def _args(keyword: str) -> list[str]:
    return [args for kw, args in _instructions() if kw == keyword]


def _stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """Each `FROM base AS name` stage: its base and its own instructions (FROM excluded), in order."""
    stages: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for kw, args in _instructions():
        if kw == "FROM":
            base, _, name = args.partition(" AS ")
            current = []
            stages[name.strip()] = (base.strip(), current)
        elif stages:
            current.append((kw, args))
    return stages


def _image(stage: str) -> list[tuple[str, str]]:
    """What a stage's image is built from: its parent stages' instructions, then its own."""
    stages = _stages()
    base, own = stages[stage]
    return (_image(base) if base in stages else []) + own


def _runtime_stage() -> list[tuple[str, str]]:
    """The serving image: the last stage, which `docker build .` builds."""
    return _image(list(_stages())[-1])


def _copy_sources(stage: list[tuple[str, str]]) -> list[str]:
    return [c for kw, args in stage if kw == "COPY" for c in shlex.split(args)[:-1]]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for kw, args in stage:
        if kw == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def _ignored(path: str) -> bool:
    """Docker's rule: the last .dockerignore pattern that matches a path (or a parent) decides."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch(p, pattern) or fnmatch(parts[i], pattern) for i, p in enumerate(prefixes)):
            ignored = not negate
    return ignored


def test_multi_stage_on_the_official_slim_base_by_default() -> None:
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in _args("ARG")
    stages = _stages()
    assert {name: base for name, (base, _) in stages.items()} == {
        "build": "${BASE_IMAGE}",
        "app": "${BASE_IMAGE}",
        "trainer": "app",
        "runtime": "app",
    }
    # `docker build .` builds the last stage: it must be the server, not the trainer.
    assert list(stages)[-1] == "runtime"


def test_torch_comes_from_the_pinned_requirements_and_the_cpu_index() -> None:
    assert any("download.pytorch.org/whl/cpu" in a for a in _args("ARG"))
    assert any("requirements.txt" in a for a in _args("COPY"))
    assert re.search(r"^torch==\d", (ROOT / "requirements.txt").read_text(), re.M)


def test_runtime_stage_copies_only_the_venv_package_entry_point_and_repository() -> None:
    assert sorted(_copy_sources(_runtime_stage())) == sorted(
        ["--from=build", "/opt/venv", "mnist_service/", "model_inference.py", "models/mnist/"]
    )


def test_trainer_adds_only_the_training_entry_points_data_and_its_extras() -> None:
    assert sorted(_copy_sources(_image("trainer"))) == sorted(
        [
            "--from=build",
            "/opt/venv",
            "mnist_service/",
            "--from=build",
            "/opt/train-extras",
            "model_train.py",
            "model_repository.py",
            "data/mnist/",
        ]
    )
    # The stripped venv lacks what training imports (sympy): the extras must be on the path.
    env = _env(_image("trainer"))
    own = _stages()["trainer"][1]
    (extras,) = [shlex.split(args)[-1] for kw, args in own if kw == "COPY" and "--from=build" in args]
    assert env["PYTHONPATH"] == extras


def test_trainer_publishes_into_the_mounted_repository_as_non_root() -> None:
    stage = _image("trainer")
    user = [args for kw, args in stage if kw == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    cmd = json.loads([args for kw, args in stage if kw == "CMD"][-1])
    assert cmd[:2] == ["python", "model_train.py"]
    assert cmd[cmd.index("--repository") + 1] == _env(stage)["MODEL_REPOSITORY"] == "/models"
    assert "--promote" not in cmd and "--output" not in cmd
    # A Job has no use for the server's HEALTHCHECK (which would probe a port nothing listens on).
    assert not [kw for kw, _ in stage if kw == "HEALTHCHECK"]


def test_server_runs_as_a_numeric_non_root_user() -> None:
    user = [args for kw, args in _runtime_stage() if kw == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_exec_form_cmd_so_sigterm_reaches_python() -> None:
    cmd = json.loads(_args("CMD")[-1])
    assert cmd[:2] == ["python", "model_inference.py"]


def test_healthcheck_uses_only_the_stdlib_against_healthz() -> None:
    healthcheck = _args("HEALTHCHECK")[-1]
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert exec_form[0] == "python"
    assert "urllib" in exec_form[-1] and "/healthz" in exec_form[-1] and "PORT" in exec_form[-1]


def test_env_matches_the_settings_and_where_the_repository_is_copied() -> None:
    env = _env(_runtime_stage())
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == str(Settings.model_fields["port"].default)
    assert _args("EXPOSE")[-1] == env["PORT"]
    # The baked-in repository is the default; MODEL_PATH would override it with one file.
    assert "MODEL_PATH" not in env
    workdir = [args for kw, args in _runtime_stage() if kw == "WORKDIR"][-1]
    (destination,) = [shlex.split(args)[-1] for kw, args in _runtime_stage() if kw == "COPY" and "models/" in args]
    model_name = Settings.model_fields["model_name"].default
    assert env["MODEL_REPOSITORY"] == f"{workdir}/models"
    assert f"{workdir}/{destination}".rstrip("/") == f"{env['MODEL_REPOSITORY']}/{model_name}"


def test_dockerignore_keeps_every_copied_source() -> None:
    from_context = [args for kw, args in _instructions() if kw == "COPY" and "--from=" not in args]
    sources = [source for args in from_context for source in shlex.split(args)[:-1]]
    assert sources
    assert not [s for s in sources if _ignored(s.rstrip("/"))]


@pytest.mark.parametrize(
    "path",
    [
        "requirements.txt",
        "mnist_service/serving/api.py",
        "mnist_service/serving/static",
        "model_inference.py",
        "models/mnist/config.json",
        "models/mnist/1/model.pt",
        "models/mnist/12/model.json",
        "model_train.py",
        "model_repository.py",
        "data/mnist/t10k-images-idx3-ubyte.gz",
    ],
)
def test_dockerignore_keeps_what_the_images_copy(path: str) -> None:
    assert not _ignored(path)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_api.py",
        "benchmarks/out/x.json",
        "mnist_service/__pycache__/api.cpython-311.pyc",
        ".ruff_cache/x",
        "models/old.pt",
        "models/mnist_cnn.pt",
        # A version or config.json still being written: publish renames it into place when complete.
        "models/mnist/.publishing-abc123/model.pt",
        "models/mnist/.config.json.x1y2",
        "models/other-model/1/model.pt",
    ],
)
def test_dockerignore_keeps_the_rest_out_of_the_context(path: str) -> None:
    assert _ignored(path)
