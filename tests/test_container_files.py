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
# The two serving images: the default target (torch) and `--target slim` (ONNX Runtime, no torch).
SERVERS = ("runtime", "slim")


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
        "build-base": "${BASE_IMAGE}",
        "build": "build-base",
        "build-slim": "build-base",
        "system": "${BASE_IMAGE}",
        "app": "system",
        "trainer": "app",
        # Not on `app`: no layer of the torch image is underneath.
        "slim": "system",
        "runtime": "app",
    }
    # `docker build .` builds the last stage: it must be the server, not the trainer.
    assert list(stages)[-1] == "runtime"


def test_torch_comes_from_the_pinned_requirements_and_the_cpu_index() -> None:
    assert any("download.pytorch.org/whl/cpu" in a for a in _args("ARG"))
    assert any("requirements.txt" in a for a in _args("COPY"))
    assert re.search(r"^torch==\d", (ROOT / "requirements.txt").read_text(), re.M)


@pytest.mark.parametrize(("server", "venv"), [("runtime", "build"), ("slim", "build-slim")])
def test_server_copies_only_its_venv_the_package_entry_point_and_repository(server: str, venv: str) -> None:
    assert sorted(_copy_sources(_image(server))) == sorted(
        [f"--from={venv}", "/opt/venv", "mnist_service/", "model_inference.py", "models/mnist/"]
    )


def test_slim_venv_is_built_from_requirements_slim_without_torch() -> None:
    build_slim = _image("build-slim")
    assert [shlex.split(args)[0] for kw, args in build_slim if kw == "COPY"] == ["requirements-slim.txt"]
    slim = (ROOT / "requirements-slim.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", slim, re.M))
    assert "onnxruntime" in pins
    assert not {"torch", "onnx", "onnxscript"} & {name.lower() for name in pins}
    # The packages both images serve with are the same releases.
    full = dict(re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    assert {name: pin for name, pin in pins.items() if name in full} == {
        name: full[name] for name in pins if name in full
    }


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


@pytest.mark.parametrize("server", SERVERS)
def test_server_runs_as_a_numeric_non_root_user(server: str) -> None:
    user = [args for kw, args in _image(server) if kw == "USER"][-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert uid == [args for kw, args in _image("runtime") if kw == "USER"][-1].split(":")[0]


@pytest.mark.parametrize("server", SERVERS)
def test_exec_form_cmd_so_sigterm_reaches_python(server: str) -> None:
    cmd = json.loads([args for kw, args in _image(server) if kw == "CMD"][-1])
    assert cmd[:2] == ["python", "model_inference.py"]


@pytest.mark.parametrize("server", SERVERS)
def test_healthcheck_uses_only_the_stdlib_against_healthz(server: str) -> None:
    healthcheck = [args for kw, args in _image(server) if kw == "HEALTHCHECK"][-1]
    exec_form = json.loads(healthcheck[healthcheck.index("CMD") + 3 :])
    assert exec_form[0] == "python"
    assert "urllib" in exec_form[-1] and "/healthz" in exec_form[-1] and "PORT" in exec_form[-1]


@pytest.mark.parametrize("server", SERVERS)
def test_every_port_the_server_listens_on_is_exposed(server: str) -> None:
    env = _env(_image(server))
    exposed = sorted(int(port) for kw, args in _image(server) if kw == "EXPOSE" for port in args.split())
    # HTTP and gRPC, as the image's env sets them and as Settings defaults them.
    assert exposed == sorted([int(env["PORT"]), int(env["GRPC_PORT"])])
    assert exposed == sorted([Settings.model_fields["port"].default, Settings.model_fields["grpc_port"].default])


def test_slim_serves_with_onnx_runtime_and_the_default_image_with_torch() -> None:
    assert Settings(runtime=_env(_image("slim"))["RUNTIME"]).runtime == "onnxruntime"
    # The default image leaves RUNTIME to its default: torchscript, since torch is installed there.
    assert "RUNTIME" not in _env(_image("runtime"))


@pytest.mark.parametrize("server", SERVERS)
def test_env_matches_the_settings_and_where_the_repository_is_copied(server: str) -> None:
    stage = _image(server)
    env = _env(stage)
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == str(Settings.model_fields["port"].default)
    # The baked-in repository is the default; MODEL_PATH would override it with one file.
    assert "MODEL_PATH" not in env
    workdir = [args for kw, args in stage if kw == "WORKDIR"][-1]
    (destination,) = [shlex.split(args)[-1] for kw, args in stage if kw == "COPY" and "models/" in args]
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
        "requirements-slim.txt",
        "mnist_service/serving/api.py",
        "mnist_service/serving/static",
        "model_inference.py",
        "models/mnist/config.json",
        "models/mnist/1/model.pt",
        "models/mnist/12/model.json",
        "models/mnist/12/model.onnx",
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
