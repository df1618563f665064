"""ResNet-18 in its CIFAR form: 3x3 stride-1 stem and no stem max-pool."""
from __future__ import annotations

import torch.nn as nn
import torchvision

from . import register_model


@register_model
def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 conv, stride 1, no max-pool)."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    # ImageNet's 7x7/2 conv + max-pool would shrink 32x32 to 8x8 before the first block.
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
