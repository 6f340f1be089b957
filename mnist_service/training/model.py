"""The network and its cost: what training trains. Export to the served formats is in `training/export.py`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mnist_service.inference.runtime import INPUT_SHAPE


class Net(nn.Module):
    """Two stride-2 convolutions and a small MLP head: about 1.26 M multiply-adds per image.

    Found by measuring accuracy per FLOP (docs/training.md): on the CPU each conv costs a fixed
    overhead per call at batch 1 whatever its size, so two wide-enough convs beat three narrow ones.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, stride=2, padding=2, bias=False),  # 28 -> 14
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1, bias=False),  # 14 -> 7
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 64),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def count_macs(model: nn.Module, input_shape: list[int] = INPUT_SHAPE) -> int:
    """Multiply-adds of one forward pass over conv and linear layers (the cost that matters)."""
    total = 0

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output[0].numel() * kernel
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
