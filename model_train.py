"""Train the MNIST CNN and export TorchScript plus metadata: `python model_train.py --help`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_service.logconfig import configure_logging
from mnist_service.training.train import TrainParams, run


def main() -> None:
    defaults = TrainParams()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=defaults.data_dir, help="folder with the IDX(.gz) files")
    parser.add_argument("--output", type=Path, default=defaults.output, help="where mnist_cnn.pt/.json go")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads for training")
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N images only (quick runs)")
    args = parser.parse_args()
    configure_logging()
    metadata = run(
        TrainParams(
            data_dir=args.data_dir,
            output=args.output,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            threads=args.threads,
            max_train=args.max_train,
        )
    )
    print(
        f"test_accuracy={metadata['test_accuracy']:.4f} train_seconds={metadata['training']['train_seconds']} "
        f"macs={metadata['macs']} version={metadata['version'][:12]} -> {args.output}"
    )


if __name__ == "__main__":
    main()
