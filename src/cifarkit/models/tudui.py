"""The notes' network ("Tudui") and a variant with activations."""
from __future__ import annotations

import torch.nn as nn

from . import register_model


def _tudui(num_classes: int, relu: bool) -> nn.Sequential:
    # 32x32 in; padding=2 keeps the size for a 5x5 kernel: (32 + 2*2 - (5-1) - 1) / 1 + 1 = 32.
    act = (lambda: [nn.ReLU()]) if relu else (lambda: [])
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), *act(), nn.MaxPool2d(2),    # 32x32x32 -> 32x16x16
        nn.Conv2d(32, 32, 5, padding=2), *act(), nn.MaxPool2d(2),   # -> 32x8x8
        nn.Conv2d(32, 64, 5, padding=2), *act(), nn.MaxPool2d(2),   # -> 64x4x4
        nn.Flatten(),                                               # -> 1024
        nn.Linear(1024, 64), *act(),
        nn.Linear(64, num_classes),
    )


@register_model
def tudui(num_classes: int = 10) -> nn.Module:
    """The notes' CIFAR-10 network exactly: 3 conv+pool, 2 linear, no activations (145,578 params)."""
    return _tudui(num_classes, relu=False)


@register_model
def tudui_relu(num_classes: int = 10) -> nn.Module:
    """tudui with ReLU after each conv and after the first Linear (same parameter count)."""
    return _tudui(num_classes, relu=True)
