"""Train the MNIST CNN and publish it as the next version in the model repository.

By default each run adds models/<model-name>/<N>/ (model.pt + model.json). Servers load it as the
version policy says, but requests that name no version stay with stable, which moves only with
--promote, except that the first version of a model with no stable version becomes stable (so a
fresh `make run` has something to serve). Promote, canary and roll back later with
`python model_repository.py`. --output instead writes one flat file, OUTPUT/mnist_cnn.pt + .json.

Every version gets model.onnx beside model.pt (ONNX Runtime serves it), once both give the same digit on
all 10k test images (docs/training.md). --add-onnx PATH gives a model trained before that its ONNX export.

--feedback CAPTURE_DATABASE adds the labelled captures of a capture database (docs/ground-truth.md)
to the training set, except a held-out share (--feedback-holdout, a fifth by default) that measures
feedback_accuracy; the metadata records which rows and the share. With --export DIR it writes them as
MNIST IDX files instead of training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from mnist_service.capture.dataset import check_holdout, export_idx
from mnist_service.capture.store import CaptureUnavailable, redacted
from mnist_service.inference.integrity import ModelLoadError
from mnist_service.logconfig import configure_logging
from mnist_service.registry.repository import RepositoryError
from mnist_service.settings import Settings
from mnist_service.training.export import ExportMismatch
from mnist_service.training.train import TrainParams, add_onnx, publish, run


def main(argv: list[str] | None = None) -> None:
    defaults, settings = TrainParams(), Settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir, help="folder with the IDX(.gz) files")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--repository",
        type=Path,
        default=settings.model_repository,
        help="model repository to publish into (env MODEL_REPOSITORY, default models/)",
    )
    where.add_argument("--output", type=Path, help="write OUTPUT/mnist_cnn.pt + .json instead of publishing")
    parser.add_argument("--model-name", default=settings.model_name, help="model folder (env MODEL_NAME)")
    parser.add_argument(
        "--promote",
        action="store_true",
        help="make the new version stable (without it, only a model's first version becomes stable)",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads for training")
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N images only (quick runs)")
    parser.add_argument(
        "--drift-images", type=int, default=None, help="drift reference from N random test images (default all)"
    )
    parser.add_argument(
        "--feedback", metavar="CAPTURE_DATABASE",
        help="add the labelled captures of this capture database (a SQLite path or postgresql://...) to training",
    )
    parser.add_argument(
        "--feedback-repeat", type=int, default=defaults.feedback_repeat,
        help="show each labelled capture this many times per epoch (default 1)",
    )
    parser.add_argument(
        "--feedback-holdout", type=_holdout, default=defaults.feedback_holdout, metavar="FRACTION",
        help="the share of labelled captures, chosen by request id, that never trains and measures "
        f"feedback_accuracy (0 <= FRACTION < 1, default {defaults.feedback_holdout:g})",
    )
    parser.add_argument(
        "--export", type=Path, metavar="DIR",
        help="with --feedback: write the labelled captures as MNIST IDX files into DIR and exit (no training)",
    )
    parser.add_argument(
        "--add-onnx", type=Path, metavar="PT",
        help="give a model trained before ONNX export (a flat .pt, or a version's model.pt) its .onnx and exit: "
        "a flat file is rewritten in place, a repository version is published again as the next version",
    )
    args = parser.parse_args(argv)
    if args.add_onnx:
        configure_logging()
        try:
            pt_path, metadata = add_onnx(args.add_onnx, args.data_dir)
        except (ExportMismatch, ModelLoadError, RepositoryError, ValueError) as exc:
            sys.exit(f"error: {exc}")
        agreement = metadata["onnx"]["agreement"]
        print(
            f"version={metadata['version'][:12]} onnx_sha256={metadata['onnx_sha256'][:12]} "
            f"same_digit={agreement['same_digit']}/{agreement['images']} "
            f"max_abs_prob_diff={agreement['max_abs_prob_diff']:.1e} -> {pt_path}"
        )
        return
    if args.export:
        if not args.feedback:
            parser.error("--export needs --feedback CAPTURE_DATABASE")
        try:
            lineage = export_idx(args.feedback, args.export, args.feedback_holdout)
        except CaptureUnavailable as exc:
            _unreadable(args.feedback, exc)
        print(f"train={lineage['train']['rows']} held_out={lineage['held_out']['rows']} -> {args.export}")
        return
    if args.output and args.promote:
        parser.error("--promote moves a repository's stable label: it has no meaning with --output")
    configure_logging()
    params = TrainParams(
        data_dir=args.data_dir,
        output=args.output or defaults.output,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        max_train=args.max_train,
        drift_images=args.drift_images,
        feedback=args.feedback,
        feedback_repeat=args.feedback_repeat,
        feedback_holdout=args.feedback_holdout,
    )
    try:
        metadata, destination = _train(params, args)
    except CaptureUnavailable as exc:
        _unreadable(args.feedback, exc)
    except ExportMismatch as exc:
        sys.exit(f"error: {exc}")
    feedback = f" feedback_accuracy={metadata['feedback_accuracy']}" if "feedback_accuracy" in metadata else ""
    print(
        f"test_accuracy={metadata['test_accuracy']:.4f}{feedback} "
        f"train_seconds={metadata['training']['train_seconds']} macs={metadata['macs']} "
        f"version={metadata['version'][:12]} -> {destination}"
    )


def _unreadable(database: str, exc: CaptureUnavailable) -> NoReturn:
    sys.exit(f"error: the capture database {redacted(database)} can't be read: {exc}")


def _holdout(text: str) -> float:
    try:
        fraction = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_holdout(fraction)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _train(params: TrainParams, args: argparse.Namespace) -> tuple[dict, str]:
    if args.output:
        metadata, destination = run(params), str(args.output)
    else:
        try:
            published = publish(params, args.repository, args.model_name, promote=args.promote)
        except RepositoryError as exc:
            sys.exit(f"error: {exc}")
        metadata, destination = published.metadata, published.summary()
    return metadata, destination


if __name__ == "__main__":
    main()
