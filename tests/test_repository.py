"""The model repository on disk (versions, config, labels), its command line, and publishing from training."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import model_train
from mnist_service.registry import cli
from mnist_service.registry.repository import (
    METADATA_FILE,
    MODEL_FILE,
    ModelConfig,
    Repository,
    RepositoryError,
)
from mnist_service.training.train import TrainParams, publish

from .conftest import DATA_DIR, ROOT


def fake_version(folder: Path, content: bytes = b"weights", **metadata: object) -> None:
    """A version that passes the integrity check: any bytes, and a model.json holding their sha256."""
    (folder / MODEL_FILE).write_bytes(content)
    (folder / METADATA_FILE).write_text(json.dumps({"version": hashlib.sha256(content).hexdigest(), **metadata}))


def add_versions(repo: Repository, count: int) -> list[int]:
    return [
        repo.publish(
            lambda folder, i=i: fake_version(
                folder, f"model {i}".encode(), test_accuracy=0.9 + i / 100, created_at=f"2026-11-24T06:0{i}:00+00:00"
            )
        )
        for i in range(1, count + 1)
    ]


def tamper(repo: Repository, version: int) -> None:
    (repo.folder / str(version) / MODEL_FILE).write_bytes(b"not the bytes model.json vouches for")


def give_onnx(repo: Repository, version: int, content: bytes = b"onnx graph") -> None:
    """An ONNX export beside a fake version, its sha256 in model.json (fake versions embed nothing)."""
    folder = repo.folder / str(version)
    (folder / "model.onnx").write_bytes(content)
    metadata = json.loads((folder / METADATA_FILE).read_text())
    (folder / METADATA_FILE).write_text(json.dumps({**metadata, "onnx_sha256": hashlib.sha256(content).hexdigest()}))


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository(tmp_path / "models", "mnist")


# Which versions a server loads.


@pytest.mark.parametrize(
    ("policy", "labels", "expected"),
    [
        ({"latest": {"num_versions": 2}}, {}, [4, 5]),
        ({"latest": {"num_versions": 2}}, {"stable": 1}, [1, 4, 5]),
        ({"latest": {"num_versions": 9}}, {}, [1, 2, 3, 4, 5]),
        ({"specific": {"versions": [1, 3, 9]}}, {}, [1, 3]),
        ({"specific": {"versions": [1, 3]}}, {"stable": 3, "canary": 5}, [1, 3, 5]),
        ({"all": {}}, {"stable": 2}, [1, 2, 3, 4, 5]),
        ({"latest": {"num_versions": 1}}, {"stable": 7}, [5]),  # a label on a version not on disk loads nothing
    ],
)
def test_the_policy_selects_versions_and_labelled_ones_always_come_too(
    policy: dict, labels: dict, expected: list[int]
) -> None:
    assert ModelConfig(version_policy=policy, labels=labels).select([1, 2, 3, 4, 5]) == expected


def test_without_config_json_the_default_policy_serves_the_latest_two(repo: Repository) -> None:
    add_versions(repo, 3)
    config = repo.read_config()
    assert config.select([v.number for v in repo.versions()]) == [2, 3]
    config.version_policy["latest"]["num_versions"] = 1  # a caller's change must not leak into the defaults
    assert repo.read_config().version_policy == {"latest": {"num_versions": 2}}


# Publishing.


def test_publish_numbers_versions_one_up_from_the_highest(repo: Repository) -> None:
    assert add_versions(repo, 3) == [1, 2, 3]
    assert (repo.folder / "1").stat().st_mode & 0o777 == 0o755  # readable by a server running as another user
    (repo.folder / "7").mkdir()  # someone copied a version in by hand
    assert add_versions(repo, 1) == [8]
    assert [v.number for v in repo.versions()] == [1, 2, 3, 7, 8]
    assert repo.versions()[-1].verify()["test_accuracy"] == pytest.approx(0.91)


def test_only_canonical_numbered_folders_are_versions(repo: Repository) -> None:
    add_versions(repo, 1)
    for name in ("02", "0", "²", ".publishing-abc", "latest"):
        (repo.folder / name).mkdir()
    (repo.folder / "5").write_text("a file, not a folder")
    assert [v.number for v in repo.versions()] == [1]


def test_a_failed_build_leaves_no_version_and_no_staging_folder(repo: Repository) -> None:
    def half_build(folder: Path) -> None:
        (folder / MODEL_FILE).write_bytes(b"half")
        (folder / "scratch").mkdir()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        repo.publish(half_build)
    with pytest.raises(RepositoryError, match=f"publishing wrote no {METADATA_FILE}"):
        repo.publish(lambda folder: (folder / MODEL_FILE).write_bytes(b"no metadata"))
    assert repo.versions() == []
    assert list(repo.folder.iterdir()) == []


def test_concurrent_publishers_get_distinct_numbers_and_no_half_written_version_is_ever_visible(
    repo: Repository,
) -> None:
    publishers = 6
    all_built = threading.Barrier(publishers)  # every publisher then races for the same next number
    seen_incomplete: list[str] = []
    done = threading.Event()

    def build(folder: Path, i: int) -> None:
        assert not folder.name.isdigit()  # staged out of sight of versions()
        (folder / MODEL_FILE).write_bytes(f"model {i}".encode())
        time.sleep(0.01)
        fake_version(folder, f"model {i}".encode(), publisher=i)
        all_built.wait(timeout=10)

    def watch() -> None:
        while not done.is_set():
            for version in repo.versions():
                try:
                    version.verify()
                except Exception as exc:
                    seen_incomplete.append(f"{version.number}: {exc}")

    numbers: dict[int, int] = {}

    def publish(i: int) -> None:
        numbers[i] = repo.publish(lambda folder: build(folder, i))

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=publish, args=(i,)) for i in range(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    done.set()
    watcher.join()

    assert sorted(numbers.values()) == list(range(1, publishers + 1))
    for i, number in numbers.items():
        assert Repository(repo.root, repo.model_name).check_servable(number)["publisher"] == i
    assert seen_incomplete == []
    assert sorted(p.name for p in repo.folder.iterdir()) == sorted(str(n) for n in numbers.values())


# config.json.


def test_config_round_trips_and_a_failed_write_leaves_the_old_one_whole(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ModelConfig({"specific": {"versions": [1, 3]}}, {"stable": 3}, [1])
    repo.write_config(config)
    assert repo.read_config() == config
    assert repo.config_path.stat().st_mode & 0o777 == 0o644  # readable by a server running as another user

    def crash(*_args: object) -> None:
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        repo.write_config(ModelConfig({"all": {}}))
    assert repo.read_config() == config
    assert [p.name for p in repo.folder.iterdir()] == ["config.json"]  # no temporary file left behind


def test_a_reader_never_sees_a_half_written_config(repo: Repository) -> None:
    repo.write_config(ModelConfig())
    errors: list[Exception] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                repo.read_config()
            except Exception as exc:
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(1, 300):
            repo.write_config(ModelConfig({"specific": {"versions": list(range(1, n + 1))}}))
    finally:
        done.set()
        reader.join()
    assert errors == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"version_policy": {"newest": {}}}', "version_policy must be one of"),
        ('{"version_policy": {"latest": {"num_versions": 0}}}', "num_versions must be a whole number >= 1"),
        ('{"version_policy": {"specific": {"versions": ["1"]}}}', "must be a list of version numbers"),
        ('{"labels": {"production": 1}}', "labels must map stable or canary to a version number"),
        ('{"labels": {"stable": true}}', "labels must map stable or canary to a version number"),
        ('{"stable_history": 1}', "stable_history must be a list of version numbers"),
    ],
)
def test_an_invalid_config_is_refused_naming_the_file_and_the_fix(repo: Repository, text: str, message: str) -> None:
    repo.folder.mkdir(parents=True)
    repo.config_path.write_text(text)
    with pytest.raises(RepositoryError, match=message) as caught:
        repo.read_config()
    assert str(repo.config_path) in str(caught.value)


def test_an_invalid_config_is_never_written(repo: Repository) -> None:
    repo.write_config(ModelConfig(labels={"stable": 1}))
    with pytest.raises(RepositoryError, match="num_versions"):
        repo.write_config(ModelConfig({"latest": {"num_versions": -1}}))
    assert repo.read_config().labels == {"stable": 1}


# Labels, history, rollback.


def test_moving_stable_keeps_a_history_that_rollback_walks_back(repo: Repository) -> None:
    add_versions(repo, 3)
    for version in (1, 2, 2, 3):
        repo.set_label("stable", version)
    assert repo.read_config().labels == {"stable": 3}
    assert repo.read_config().stable_history == [1, 2]  # promoting the same version twice records nothing
    assert repo.rollback() == (3, 2)
    assert repo.rollback() == (2, 1)
    with pytest.raises(RepositoryError, match="nothing to roll back to"):
        repo.rollback()
    assert repo.read_config().labels == {"stable": 1}


def test_rollback_skips_versions_deleted_since(repo: Repository) -> None:
    add_versions(repo, 3)
    for version in (1, 2, 3):
        repo.set_label("stable", version)
    for name in (MODEL_FILE, METADATA_FILE):
        (repo.folder / "2" / name).unlink()
    (repo.folder / "2").rmdir()
    assert repo.rollback() == (3, 1)


def test_rollback_refuses_a_previous_version_that_can_no_longer_be_served(repo: Repository) -> None:
    add_versions(repo, 2)
    repo.set_label("stable", 1)
    repo.set_label("stable", 2)
    tamper(repo, 1)
    with pytest.raises(RepositoryError, match=r"rollback refused: version 1 can't be served: .*sha256"):
        repo.rollback()
    assert repo.read_config().labels == {"stable": 2}


def test_canary_is_another_version_than_stable_and_promoting_it_clears_it(repo: Repository) -> None:
    add_versions(repo, 3)
    repo.set_label("stable", 1)
    with pytest.raises(RepositoryError, match="version 1 is stable: a canary must be another version"):
        repo.set_label("canary", 1)
    repo.set_label("canary", 3)
    assert repo.read_config().labels == {"stable": 1, "canary": 3}
    repo.set_label("stable", 3)
    assert repo.read_config().labels == {"stable": 3}
    repo.set_label("canary", 2)
    repo.set_label("canary", None)
    assert repo.read_config().labels == {"stable": 3}
    with pytest.raises(RepositoryError, match="stable can't be cleared"):
        repo.set_label("stable", None)
    with pytest.raises(RepositoryError, match="unknown label 'production'"):
        repo.set_label("production", 1)


def test_a_rollback_onto_the_canary_drops_the_canary(repo: Repository) -> None:
    add_versions(repo, 2)
    repo.set_label("stable", 1)
    repo.set_label("stable", 2)
    repo.set_label("canary", 1)
    repo.rollback()
    assert repo.read_config().labels == {"stable": 1}


def test_promote_refuses_a_corrupt_or_missing_version_with_the_reason(repo: Repository) -> None:
    add_versions(repo, 2)
    repo.set_label("stable", 1)
    tamper(repo, 2)
    with pytest.raises(RepositoryError, match=r"version 2 can't be served: .*truncated, tampered with"):
        repo.set_label("stable", 2)
    (repo.folder / "2" / METADATA_FILE).unlink()
    with pytest.raises(RepositoryError, match=r"version 2 can't be served: .*metadata .* not found"):
        repo.set_label("canary", 2)
    with pytest.raises(RepositoryError, match=r"version 5 is not in .* \(versions: 1, 2\)"):
        repo.set_label("stable", 5)
    assert repo.read_config().labels == {"stable": 1}


def test_promote_checks_the_onnx_export_a_version_records(repo: Repository) -> None:
    add_versions(repo, 2)
    repo.set_label("stable", 1)
    give_onnx(repo, 2)
    (repo.folder / "2" / "model.onnx").write_bytes(b"another graph")
    with pytest.raises(RepositoryError, match=r"version 2 can't be served: ONNX model .* tampered with"):
        repo.set_label("stable", 2)
    (repo.folder / "2" / "model.onnx").unlink()
    with pytest.raises(RepositoryError, match=r"version 2 can't be served: ONNX model .* not found"):
        repo.set_label("stable", 2)
    give_onnx(repo, 2)
    repo.set_label("stable", 2)


# The command line.


def run_cli(capsys: pytest.CaptureFixture[str], repo: Repository, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--repository", str(repo.root), "--model-name", repo.model_name, *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def three_versions(repo: Repository) -> Repository:
    """Versions 1 (stable), 2 (with an ONNX export), and 3 whose model file was tampered with; policy latest 1."""
    add_versions(repo, 3)
    repo.write_config(ModelConfig({"latest": {"num_versions": 1}}, {"stable": 1}))
    give_onnx(repo, 2)
    tamper(repo, 3)
    return repo


def test_list_shows_each_version_its_selection_labels_state_and_the_policy(
    capsys: pytest.CaptureFixture[str], three_versions: Repository
) -> None:
    three_versions.write_config(ModelConfig({"latest": {"num_versions": 1}}, {"stable": 1, "canary": 9}))
    code, out, _ = run_cli(capsys, three_versions, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "VERSION", "SELECTED", "LABELS", "ACCURACY", "CREATED", "SHA256", "RUNTIMES", "STATE"
    ]
    rows = {line.split()[0]: line.split(maxsplit=7) for line in lines[1:4]}
    sha1 = hashlib.sha256(b"model 1").hexdigest()
    assert rows["1"] == ["1", "label", "stable", "0.9100", "2026-11-24T06:01:00+00:00", sha1[:12], "torchscript", "ok"]
    assert rows["2"][1:3] == ["no", "-"] and rows["2"][6:] == ["torchscript,onnxruntime", "ok"]
    assert rows["3"][1:7] == ["policy", "-", "-", "-", "-", "-"]
    assert "has sha256" in rows["3"][7] and "tampered with" in rows["3"][7]
    assert "policy: latest 1" in out
    assert "labels: stable -> 1, canary -> 9 (not on disk!)" in out
    assert "stable history, oldest first (rollback goes back along it): none" in out


def test_list_json_is_the_same_information_for_programs(
    capsys: pytest.CaptureFixture[str], three_versions: Repository
) -> None:
    three_versions.set_label("stable", 2)
    code, out, _ = run_cli(capsys, three_versions, "list", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["version_policy"] == {"latest": {"num_versions": 1}}
    assert data["labels"] == {"stable": 2} and data["stable_history"] == [1]
    by_number = {row["version"]: row for row in data["versions"]}
    assert by_number[2]["labels"] == ["stable"] and by_number[2]["selected"] == "label"
    assert by_number[2]["sha256"] == hashlib.sha256(b"model 2").hexdigest()
    assert by_number[3]["ok"] is False and "sha256" in by_number[3]["error"]
    assert by_number[1]["selected"] is None and by_number[1]["test_accuracy"] == pytest.approx(0.91)


def test_commands_change_config_json_and_say_what_changed(
    capsys: pytest.CaptureFixture[str], three_versions: Repository
) -> None:
    repo = three_versions
    steps = [
        (["promote", "2"], "stable: 1 -> 2.", {"stable": 2}),
        (["canary", "1"], "canary: none -> 1.", {"stable": 2, "canary": 1}),
        (["canary", "--clear"], "canary: 1 -> none.", {"stable": 2}),
        (["rollback"], "stable: 2 -> 1.", {"stable": 1}),
        (["promote", "1"], "nothing changed: stable is 1", {"stable": 1}),
    ]
    for argv, said, labels in steps:
        code, out, err = run_cli(capsys, repo, *argv)
        assert (code, err) == (0, ""), argv
        assert out.startswith(said), (argv, out)
        assert ("REPOSITORY_POLL_S (2 s by default)" in out) == (not said.startswith("nothing")), argv
        assert repo.read_config().labels == labels, argv


@pytest.mark.parametrize(
    ("argv", "policy", "said"),
    [
        (["policy", "all"], {"all": {}}, "policy: latest 1 -> all; servers now load versions 1, 2, 3"),
        (["policy", "latest", "2"], {"latest": {"num_versions": 2}}, "-> latest 2; servers now load versions 1, 2, 3"),
        (
            ["policy", "specific", "2", "9"],
            {"specific": {"versions": [2, 9]}},
            "servers now load versions 1, 2 with the labelled ones (9 not on disk yet)",
        ),
    ],
)
def test_policy_command_writes_the_policy_and_says_what_servers_will_load(
    capsys: pytest.CaptureFixture[str], three_versions: Repository, argv: list[str], policy: dict, said: str
) -> None:
    code, out, _ = run_cli(capsys, three_versions, *argv)
    assert code == 0
    assert said in out and "REPOSITORY_POLL_S" in out
    assert three_versions.read_config().version_policy == policy


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["promote", "3"], "error: version 3 can't be served: model file"),
        (["canary", "7"], "error: version 7 is not in"),
        (["rollback"], "error: nothing to roll back to"),
        (["policy", "latest"], "error: usage: policy latest N"),
        (["policy", "all", "2"], "error: usage: policy all"),
        (["policy", "latest", "0"], "num_versions must be a whole number >= 1"),
    ],
)
def test_a_refused_command_exits_2_with_one_line_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], three_versions: Repository, argv: list[str], message: str
) -> None:
    before = three_versions.config_path.read_text()
    code, out, err = run_cli(capsys, three_versions, *argv)
    assert code == 2 and out == ""
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert three_versions.config_path.read_text() == before


def test_a_broken_config_or_an_unknown_model_exits_2_saying_what_to_do(
    capsys: pytest.CaptureFixture[str], three_versions: Repository
) -> None:
    code, _, err = run_cli(capsys, Repository(three_versions.root, "fashion"), "list")
    assert code == 2 and err == (
        f"error: no model 'fashion' in {three_versions.root} (models there: mnist): "
        f"publish one with `python model_train.py --repository {three_versions.root} --model-name fashion`\n"
    )
    (three_versions.root / "fashion").mkdir()
    code, out, _ = run_cli(capsys, Repository(three_versions.root, "fashion"), "list")
    assert code == 0 and f"(no versions in {three_versions.root / 'fashion'})" in out
    three_versions.config_path.write_text("{")
    code, _, err = run_cli(capsys, three_versions, "list")
    assert code == 2 and "config.json is not valid JSON" in err and err.count("\n") == 1


@pytest.mark.parametrize("entry", [["model_repository.py"], ["-m", "mnist_service.registry.cli"]])
def test_both_entry_points_run_the_cli_and_pass_its_exit_code_on(entry: list[str], three_versions: Repository) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *entry, "--repository", str(three_versions.root), *argv],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )

    listed = run("list")
    assert listed.returncode == 0 and "labels: stable -> 1" in listed.stdout, listed.stderr
    refused = run("promote", "3")
    assert refused.returncode == 2 and refused.stderr.startswith("error: version 3 can't be served")


# Publishing from training, for real.


def train(repository: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "model_train.py", "--data-dir", str(DATA_DIR), "--repository", str(repository),
            "--epochs", "1", "--max-train", "500", "--drift-images", "1000", *flags,
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )


@pytest.mark.slow
def test_training_publishes_versions_and_moves_stable_only_the_first_time_or_when_told(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    repo = Repository(repository, "mnist")

    first = train(repository)
    assert first.returncode == 0, first.stderr
    assert f"-> {repo.folder / '1'}: version 1, stable none -> 1" in first.stdout  # a fresh model gets a stable
    second = train(repository)
    assert second.returncode == 0, second.stderr
    assert "version 2, stable stays 1 (promote it: python model_repository.py promote 2)" in second.stdout

    assert [v.number for v in repo.versions()] == [1, 2]
    metadata = repo.check_servable(2)
    assert metadata["test_accuracy"] > 0.5 and "output" not in metadata["training"]
    assert f"version={metadata['version'][:12]}" in second.stdout
    assert repo.read_config().labels == {"stable": 1}

    third = train(repository, "--promote")
    assert third.returncode == 0, third.stderr
    assert "version 3, stable 1 -> 3" in third.stdout
    assert repo.read_config().labels == {"stable": 3} and repo.read_config().stable_history == [1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--output", "x", "--repository", "y"], "not allowed with argument"),
        (["--output", "x", "--promote"], "--promote moves a repository's stable label"),
    ],
)
def test_training_refuses_flags_that_contradict_each_other(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Paths under tmp_path and no data: if the check is missing, this fails at once instead of training.
    flags = [str(tmp_path / f) if f in ("x", "y") else f for f in flags]
    with pytest.raises(SystemExit) as caught:
        model_train.main([*flags, "--data-dir", str(tmp_path / "no-data")])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_a_broken_config_stops_publishing_before_any_training(tmp_path: Path) -> None:
    repo = Repository(tmp_path, "mnist")
    repo.folder.mkdir()
    repo.config_path.write_text('{"labels": {"stable": 0}}')
    # No data at all: training would fail differently, so the config is read first.
    with pytest.raises(RepositoryError, match="labels must map stable or canary"):
        publish(TrainParams(data_dir=tmp_path / "no-data"), tmp_path, "mnist")
    assert repo.versions() == []
