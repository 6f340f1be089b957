"""The model repository's command line: list the versions, promote, canary, roll back, set the policy.

Every change is an atomic rewrite of <repository>/<model>/config.json. Running servers read it every
REPOSITORY_POLL_S and move over without a restart, so this needs no access to them.
Run as `python model_repository.py ...` or `python -m mnist_service.registry.cli ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mnist_service.inference.integrity import ModelLoadError
from mnist_service.inference.runtime import servable_by
from mnist_service.registry.repository import LABELS, ModelConfig, Repository, RepositoryError
from mnist_service.settings import Settings

POLL_NOTE = (
    "Running servers pick this up within REPOSITORY_POLL_S "
    f"({Settings.model_fields['repository_poll_s'].default:g} s by default)."
)


def main(argv: list[str] | None = None) -> int:
    """Run one command; 0 when done, 2 (and one line on stderr) when the repository or request is wrong."""
    args = build_parser(Settings()).parse_args(argv)
    try:
        output = args.command(_open(args.repository, args.model_name), args)
    except RepositoryError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(output + "\n")
    return 0


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="model_repository.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=settings.model_repository,
        help=f"the model repository (env MODEL_REPOSITORY, now {settings.model_repository})",
    )
    parser.add_argument(
        "--model-name",
        default=settings.model_name,
        help=f"the model's folder in the repository (env MODEL_NAME, now {settings.model_name})",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    show = commands.add_parser("list", help="the versions, their state and labels, the policy, the stable history")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(command=list_versions)

    promote = commands.add_parser("promote", help="make version N stable (the default answer); refuses a broken one")
    promote.add_argument("version", type=int, metavar="N")
    promote.set_defaults(command=promote_version)

    canary = commands.add_parser("canary", help="make version N the canary (shadows stable), or --clear it")
    which = canary.add_mutually_exclusive_group(required=True)
    which.add_argument("version", type=int, nargs="?", metavar="N")
    which.add_argument("--clear", action="store_true", help="remove the canary label")
    canary.set_defaults(command=set_canary)

    rollback = commands.add_parser("rollback", help="move stable back to the version it pointed at before")
    rollback.set_defaults(command=roll_back)

    policy = commands.add_parser(
        "policy",
        help="which versions servers load: latest N | specific N [N ...] | all (labelled ones always)",
    )
    policy.add_argument("kind", choices=["latest", "specific", "all"])
    policy.add_argument("numbers", type=int, nargs="*", metavar="N")
    policy.set_defaults(command=set_policy)
    return parser


def _open(root: Path, model_name: str) -> Repository:
    repo = Repository(root, model_name)
    if not repo.folder.is_dir():
        models = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise RepositoryError(
            f"no model '{model_name}' in {root} (models there: {', '.join(models) or 'none'}): "
            f"publish one with `python model_train.py --repository {root} --model-name {model_name}`"
        )
    return repo


def inventory(repo: Repository) -> dict[str, Any]:
    """Everything `list` shows, as plain data: the config and, per version, its selection and integrity."""
    config = repo.read_config()
    versions = repo.versions()
    numbers = [v.number for v in versions]
    by_policy = set(ModelConfig(config.version_policy).select(numbers))
    selected = set(config.select(numbers))
    rows = []
    for files in versions:
        try:
            metadata, error = files.verify(), None
        except ModelLoadError as exc:
            metadata, error = {}, str(exc)
        rows.append(
            {
                "version": files.number,
                "selected": "policy" if files.number in by_policy else "label" if files.number in selected else None,
                "labels": [label for label, n in config.labels.items() if n == files.number],
                "ok": error is None,
                "error": error,
                "test_accuracy": metadata.get("test_accuracy"),
                "created_at": metadata.get("created_at"),
                "sha256": metadata.get("version"),
                "runtimes": servable_by(metadata) if error is None else [],
            }
        )
    return {
        "repository": str(repo.root),
        "model": repo.model_name,
        "version_policy": config.version_policy,
        "labels": config.labels,
        "stable_history": config.stable_history,
        "versions": rows,
    }


def list_versions(repo: Repository, args: argparse.Namespace) -> str:
    """The versions as a table (or JSON), then the policy, the labels and the stable history."""
    data = inventory(repo)
    if args.json:
        return json.dumps(data, indent=2)
    header = ["VERSION", "SELECTED", "LABELS", "ACCURACY", "CREATED", "SHA256", "RUNTIMES", "STATE"]
    table = [header] + [
        [
            str(row["version"]),
            row["selected"] or "no",
            ",".join(row["labels"]) or "-",
            f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else "-",
            row["created_at"] or "-",
            (row["sha256"] or "-")[:12],
            ",".join(row["runtimes"]) or "-",
            "ok" if row["ok"] else row["error"],
        ]
        for row in data["versions"]
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]]) for line in table]
    if not data["versions"]:
        lines.append(f"(no versions in {repo.folder})")
    on_disk = {row["version"] for row in data["versions"]}
    labels = [f"{label} -> {n}" + ("" if n in on_disk else " (not on disk!)") for label, n in data["labels"].items()]
    history = ", ".join(map(str, data["stable_history"])) or "none"
    lines += [
        "",
        f"policy: {_describe_policy(data['version_policy'])} (labelled versions are always selected)",
        f"labels: {', '.join(labels) or 'none (the highest loaded version answers)'}",
        f"stable history, oldest first (rollback goes back along it): {history}",
    ]
    return "\n".join(line.rstrip() for line in lines)


def promote_version(repo: Repository, args: argparse.Namespace) -> str:
    before = repo.read_config().labels
    after = repo.set_label("stable", args.version).labels
    return _describe_labels(before, after)


def set_canary(repo: Repository, args: argparse.Namespace) -> str:
    before = repo.read_config().labels
    after = repo.set_label("canary", None if args.clear else args.version).labels
    return _describe_labels(before, after)


def roll_back(repo: Repository, args: argparse.Namespace) -> str:
    before = repo.read_config().labels
    repo.rollback()
    return _describe_labels(before, repo.read_config().labels)


def set_policy(repo: Repository, args: argparse.Namespace) -> str:
    policy = _policy_from_args(args.kind, args.numbers)
    before, config = repo.set_policy(policy)
    on_disk = [v.number for v in repo.versions()]
    chosen = ", ".join(map(str, config.select(on_disk))) or "none"
    missing = sorted(set(policy.get("specific", {}).get("versions", [])) - set(on_disk))
    note = f" ({', '.join(map(str, missing))} not on disk yet)" if missing else ""
    return (
        f"policy: {_describe_policy(before)} -> {_describe_policy(policy)}; "
        f"servers now load versions {chosen} with the labelled ones{note}.\n{POLL_NOTE}"
    )


def _policy_from_args(kind: str, numbers: list[int]) -> dict[str, Any]:
    if kind == "latest" and len(numbers) == 1:
        return {"latest": {"num_versions": numbers[0]}}
    if kind == "specific" and numbers:
        return {"specific": {"versions": sorted(set(numbers))}}
    if kind == "all" and not numbers:
        return {"all": {}}
    usage = {"latest": "policy latest N", "specific": "policy specific N [N ...]", "all": "policy all"}[kind]
    raise RepositoryError(f"usage: {usage}")


def _describe_policy(policy: dict[str, Any]) -> str:
    kind, body = next(iter(policy.items()))
    if kind == "latest":
        return f"latest {body['num_versions']}"
    if kind == "specific":
        return "specific " + ", ".join(map(str, body["versions"]))
    return "all"


def _describe_labels(before: dict[str, int], after: dict[str, int]) -> str:
    changes = [
        f"{label}: {before.get(label, 'none')} -> {after.get(label, 'none')}"
        for label in LABELS
        if before.get(label) != after.get(label)
    ]
    if not changes:
        return "nothing changed: " + (", ".join(f"{k} is {v}" for k, v in after.items()) or "no labels")
    return "; ".join(changes) + f".\n{POLL_NOTE}"


if __name__ == "__main__":
    sys.exit(main())
