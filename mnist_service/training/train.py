"""Training, evaluation and export of the CNN: a loop a reader can follow top to bottom.

`publish` puts the result into the model repository as its next version; `run` writes one flat file;
`add_onnx` gives a model trained before ONNX export its .onnx (training/export.py writes both formats).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mnist_service.capture.dataset import HOLDOUT_FRACTION, Labelled, describe, read_labelled
from mnist_service.capture.store import redacted
from mnist_service.data import load_split
from mnist_service.inference.images import png_bytes
from mnist_service.inference.integrity import onnx_path_for
from mnist_service.inference.preprocess import image_to_digit
from mnist_service.inference.runtime import CLASS_LABELS, INPUT_SHAPE
from mnist_service.inference.torchscript_runtime import load_verified, optimize_for_serving
from mnist_service.monitoring import drift
from mnist_service.registry.repository import MODEL_FILE, Repository
from mnist_service.training.export import export_version
from mnist_service.training.model import Net, count_macs

logger = logging.getLogger(__name__)

MEAN, STD = 0.1307, 0.3081  # the MNIST training-set pixel statistics, as everyone uses them


@dataclass
class TrainParams:
    data_dir: Path = Path("data/mnist")
    output: Path = Path("models")  # where `run` writes mnist_cnn.pt; `publish` ignores it
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3  # the one-cycle schedule's peak
    pct_start: float = 0.2  # share of the steps spent warming up to the peak
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    seed: int = 0
    threads: int = 2  # results are bit-identical for a seed *and* a thread count
    max_train: int | None = None  # use only the first N training images (quick runs, tests)
    drift_images: int | None = None  # build the drift reference on N random test images (None: all)
    max_rotation_deg: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shear: float = 0.1
    max_translate_px: float = 2.0
    feedback: str | None = None  # a capture database: its labelled captures join the training set
    feedback_repeat: int = 1  # each labelled capture (training share) is seen this many times per epoch
    feedback_holdout: float = HOLDOUT_FRACTION  # the share of labelled captures (by request id) that never trains


def augment(x: torch.Tensor, params: TrainParams, gen: torch.Generator) -> torch.Tensor:
    """A small random affine per image (rotation, scale, shear, shift) of a batch in [0, 1].

    Done before normalising, so grid_sample's zero padding is the black background.
    """
    n = x.shape[0]
    u = torch.rand(n, 5, generator=gen)
    angle = (u[:, 0] * 2 - 1) * math.radians(params.max_rotation_deg)
    low, high = params.scale_range
    scale = low + u[:, 1] * (high - low)
    shear = (u[:, 2] * 2 - 1) * params.max_shear
    # affine_grid works in [-1, 1] coordinates, where the image's width spans 2.
    tx = (u[:, 3] * 2 - 1) * params.max_translate_px * 2.0 / x.shape[3]
    ty = (u[:, 4] * 2 - 1) * params.max_translate_px * 2.0 / x.shape[2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta maps output to input coordinates: dividing by the scale makes scale > 1 enlarge.
    theta = torch.stack(
        [
            torch.stack([cos / scale, (-sin + shear * cos) / scale, tx], 1),
            torch.stack([sin / scale, (cos + shear * sin) / scale, ty], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1]."""
    return (torch.from_numpy(np.array(images)).float() / 255.0).unsqueeze(1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def train_epoch(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    params: TrainParams,
    gen: torch.Generator,
) -> tuple[float, float]:
    net.train()
    order = torch.randperm(len(x), generator=gen)
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), params.batch_size):
        idx = order[start : start + params.batch_size]
        xb, yb = augment(x[idx], params, gen), y[idx]
        logits = net(normalize(xb))
        loss = F.cross_entropy(logits, yb, label_smoothing=params.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
    return total_loss / len(x), correct / len(x)


@torch.inference_mode()
def predict_all(net: nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    net.eval()
    return torch.cat([net(normalize(x[i : i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)])


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: int = 10) -> np.ndarray:
    cm = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def measure_throughput(module: torch.jit.ScriptModule, batch: int, seconds: float = 1.0) -> float:
    """Images/s of an (optimised) module on one thread, median of a few timed windows."""
    x = torch.randn(batch, 1, 28, 28)
    rates = []
    with torch.inference_mode():
        for _ in range(10):  # warm-up: the JIT profiles and specialises on the first calls
            module(x)
        for _ in range(3):
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                module(x)
                n += batch
            rates.append(n / (time.perf_counter() - start))
    return float(np.median(rates))


def train_model(params: TrainParams) -> tuple[nn.Module, dict[str, Any], np.ndarray]:
    """Train, evaluate on the official test set; return the network, its metadata (all but `version`)
    and the test images (the export checks its two files against the same ones)."""
    started = time.perf_counter()
    torch.set_num_threads(params.threads)

    train, test = load_split(params.data_dir, "train"), load_split(params.data_dir, "test")
    train_images, train_labels = train.images, train.labels
    if params.max_train:
        train_images, train_labels = train_images[: params.max_train], train_labels[: params.max_train]
    feedback: tuple[Labelled, Labelled] | None = None
    if params.feedback:  # the held-out share never trains: it measures feedback_accuracy
        feedback = read_labelled(params.feedback).split(params.feedback_holdout)
        extra = feedback[0]
        train_images = np.concatenate([train_images, np.repeat(extra.images, params.feedback_repeat, axis=0)])
        extra_labels = np.repeat(extra.labels, params.feedback_repeat, axis=0).astype(train_labels.dtype)
        train_labels = np.concatenate([train_labels, extra_labels])
        logger.info(
            "adding %d labelled captures (x%d) from %s; %d held out",
            len(extra), params.feedback_repeat, redacted(params.feedback), len(feedback[1]),
        )
    x_train, y_train = to_unit(train_images), torch.from_numpy(train_labels)
    x_test, y_test = to_unit(test.images), test.labels
    logger.info("training on %d images, testing on %d", len(x_train), len(x_test))

    torch.manual_seed(params.seed)
    net = Net()
    torch.manual_seed(params.seed)
    gen = torch.Generator().manual_seed(params.seed)  # drives shuffling and augmentation
    optimizer = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    steps = params.epochs * math.ceil(len(x_train) / params.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=params.lr, total_steps=steps, pct_start=params.pct_start
    )

    for epoch in range(1, params.epochs + 1):
        t0 = time.perf_counter()
        loss, acc = train_epoch(net, x_train, y_train, optimizer, scheduler, params, gen)
        test_acc = float((predict_all(net, x_test).numpy() == y_test).mean())
        # One line per epoch on stdout: this is the CLI's progress report, not library logging.
        sys.stdout.write(
            f"epoch {epoch:>3}/{params.epochs}  loss {loss:.4f}  train_acc {acc:.4f}  "
            f"test_acc {test_acc:.4f}  {time.perf_counter() - t0:.1f}s\n"
        )
        sys.stdout.flush()
    train_seconds = time.perf_counter() - started

    y_pred = predict_all(net, x_test).numpy()
    cm = confusion_matrix(y_test, y_pred)
    per_class = (cm.diagonal() / cm.sum(1).clip(min=1)).round(4).tolist()

    torch.set_num_threads(1)  # throughput figures are per inference thread, as served
    served = optimize_for_serving(torch.jit.script(net.eval()))
    metadata: dict[str, Any] = {
        "name": "mnist_cnn",
        "architecture": repr(net),
        "test_accuracy": round(float((y_pred == y_test).mean()), 4),
        "per_class_accuracy": dict(zip(CLASS_LABELS, per_class, strict=True)),
        "confusion_matrix": cm.tolist(),
        "class_labels": CLASS_LABELS,
        "input": {
            "shape": INPUT_SHAPE,
            "dtype": "float32",
            "layout": "NCHW, white digit on black, centred by centre of mass like MNIST",
            "normalization": {"mean": MEAN, "std": STD, "formula": "(pixel / 255 - mean) / std"},
        },
        "macs": count_macs(net),
        "parameters": sum(p.numel() for p in net.parameters()),
        "throughput_images_per_s": {
            "batch_1": round(measure_throughput(served, 1)),
            "batch_64": round(measure_throughput(served, 64)),
            "threads": 1,
        },
        "training": {
            **{
                k: str(v) if isinstance(v, Path) else v
                for k, v in dataclasses.asdict(params).items()
                if k != "output"  # where the file goes says nothing about the model
            },
            "feedback": redacted(params.feedback) if params.feedback else None,  # never a password
            "train_images": len(x_train),
            "optimizer": "AdamW",
            "schedule": "OneCycleLR",
            "train_seconds": round(train_seconds, 1),
        },
        "drift_reference": drift_reference(
            served, test.images[reference_sample(len(test.images), params.drift_images)]
        ),
        "data_sha256": {**train.sha256, **test.sha256},
        **(_feedback_metadata(net, params.feedback, params.feedback_holdout, *feedback)
           if params.feedback and feedback else {}),
        "torch_version": torch.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return net, metadata, test.images


def _feedback_metadata(
    net: nn.Module, url: str, holdout: float, train: Labelled, held: Labelled
) -> dict[str, Any]:
    """The lineage of the labelled captures trained on, and the accuracy on the held-out ones."""
    accuracy = None
    if len(held):
        accuracy = round(float((predict_all(net, to_unit(held.images)).numpy() == held.labels).mean()), 4)
    return {"feedback": describe(url, train, held, holdout), "feedback_accuracy": accuracy}


def as_uploaded(model: torch.jit.ScriptModule, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, 28x28 inputs) of digits sent as 28x28 PNG uploads, through the server's
    preprocessing and the model: what the live statistics count for such uploads."""
    digits = np.stack([image_to_digit(png_bytes(Image.fromarray(image))) for image in images])
    with torch.inference_mode():
        probs = torch.softmax(model(normalize(to_unit(digits))), dim=1).numpy()
    return probs, digits


def reference_sample(total: int, size: int | None) -> np.ndarray:
    """Indices of the test images the drift reference is built on: all, or `size` drawn at random (a
    fixed draw). Not the first N: MNIST's test set is two halves by different writers, and a reference
    from one half flags the other as drift."""
    if size is None or size >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(0).choice(total, size, replace=False))


def drift_reference(served: torch.jit.ScriptModule, images: np.ndarray) -> dict[str, Any]:
    """The drift reference (monitoring/drift.py) of the test digits, as uploaded."""
    return drift.build_reference(*as_uploaded(served, images))


@dataclass(frozen=True)
class Published:
    """A version `publish` added: where it is, its metadata, and where stable points now."""

    version: int
    path: Path
    metadata: dict[str, Any]
    stable: int
    previous_stable: int | None

    @property
    def stable_moved(self) -> bool:
        return self.stable != self.previous_stable

    def summary(self) -> str:
        """Where the version went and what it did to stable, for the end of a training run's output."""
        if self.stable_moved:
            change = f"stable {self.previous_stable or 'none'} -> {self.stable}"
        else:
            change = f"stable stays {self.stable} (promote it: python model_repository.py promote {self.version})"
        return f"{self.path}: version {self.version}, {change}"


def run(params: TrainParams) -> dict[str, Any]:
    """Train, evaluate, export to params.output/mnist_cnn.pt + .onnx + .json; return the metadata written."""
    net, metadata, test_images = train_model(params)
    pt_path = params.output / "mnist_cnn.pt"
    metadata = export_version(net, metadata, pt_path, test_images)
    logger.info("wrote %s (test accuracy %.4f)", pt_path, metadata["test_accuracy"])
    return metadata


def publish(params: TrainParams, repository: Path, model_name: str, promote: bool = False) -> Published:
    """Train, evaluate, and publish the model as the next version of `model_name` in `repository`.

    Stable moves to it only with `promote`, or when the model has no stable version yet (a fresh
    repository), so that the first run gives a server something to serve.
    """
    repo = Repository(repository, model_name)
    repo.read_config()  # a broken config.json fails now, not after the training
    net, metadata, test_images = train_model(params)
    number = repo.publish(lambda folder: export_version(net, metadata, folder / MODEL_FILE, test_images))
    previous = repo.read_config().labels.get("stable")
    stable = number if promote or previous is None else previous
    if stable != previous:
        repo.set_label("stable", stable)
    published = Published(number, repo.folder / str(number), repo.check_servable(number), stable, previous)
    logger.info("published %s (test accuracy %.4f), stable is %d", published.path, metadata["test_accuracy"], stable)
    return published


def add_onnx(pt_path: Path, data_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Give a model trained before ONNX export an ONNX export, checked like a new one: (its .pt, its metadata).

    The .pt must change (its embedded metadata gains onnx_sha256), so its sha256, the version id, changes
    too. A flat file is rewritten in place; a repository version, whose folder servers may hold, is left
    as it is and the model is published as the next version (promote it to serve it).
    """
    module, metadata = load_verified(pt_path, pt_path.with_suffix(".json"))
    if metadata.get("onnx_sha256"):
        raise ValueError(f"{pt_path} already has an ONNX export ({onnx_path_for(pt_path).name})")
    net = Net()
    try:
        net.load_state_dict(module.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"{pt_path} is not this code's network (training/model.py Net): {exc}") from exc
    test_images = load_split(data_dir, "test").images
    exported = {k: v for k, v in metadata.items() if k != "version"} | {"derived_from": metadata["version"]}
    if pt_path.name != MODEL_FILE:
        return pt_path, export_version(module, exported, pt_path, test_images, onnx_source=net)
    repo = Repository(pt_path.parent.parent.parent, pt_path.parent.parent.name)
    number = repo.publish(
        lambda folder: export_version(module, exported, folder / MODEL_FILE, test_images, onnx_source=net)
    )
    return repo.folder / str(number) / MODEL_FILE, repo.check_servable(number)
