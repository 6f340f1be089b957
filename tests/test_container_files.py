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


def _runtime_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


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
    froms = _args("FROM")
    assert len(froms) == 2
    assert all(f.startswith("${BASE_IMAGE}") for f in froms)


def test_torch_comes_from_the_pinned_requirements_and_the_cpu_index() -> None:
    assert any("download.pytorch.org/whl/cpu" in a for a in _args("ARG"))
    assert any("requirements.txt" in a for a in _args("COPY"))
    assert re.search(r"^torch==\d", (ROOT / "requirements.txt").read_text(), re.M)


def test_runtime_stage_copies_only_the_venv_package_entry_point_and_model() -> None:
    copies = [args for kw, args in _runtime_stage() if kw == "COPY"]
    sources = [c for a in copies for c in shlex.split(a)[:-1]]
    assert sorted(sources) == sorted(
        [
            "--from=build",
            "/opt/venv",
            "mnist_service/",
            "model_inference.py",
            "models/mnist_cnn.pt",
            "models/mnist_cnn.json",
        ]
    )


def test_runs_as_a_numeric_non_root_user() -> None:
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


def test_env_matches_the_settings_and_where_the_model_is_copied() -> None:
    env = _env(_runtime_stage())
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == str(Settings.model_fields["port"].default)
    assert _args("EXPOSE")[-1] == env["PORT"]
    workdir = [args for kw, args in _runtime_stage() if kw == "WORKDIR"][-1]
    assert env["MODEL_PATH"] == f"{workdir}/models/mnist_cnn.pt"


@pytest.mark.parametrize(
    "path",
    [
        "requirements.txt",
        "mnist_service/serving/api.py",
        "mnist_service/serving/static",
        "model_inference.py",
        "models/mnist_cnn.pt",
        "models/mnist_cnn.json",
    ],
)
def test_dockerignore_keeps_what_the_image_copies(path: str) -> None:
    assert not _ignored(path)


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "data/mnist/t10k-images-idx3-ubyte.gz",
        "tests/test_api.py",
        "benchmarks/out/x.json",
        "mnist_service/__pycache__/api.cpython-311.pyc",
        ".ruff_cache/x",
        "models/old.pt",
    ],
)
def test_dockerignore_keeps_the_rest_out_of_the_context(path: str) -> None:
    assert _ignored(path)
