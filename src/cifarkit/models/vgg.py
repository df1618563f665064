"""torchvision's VGG16, as the notes load it, with a head for our class count."""
from __future__ import annotations

import torch.nn as nn
import torchvision

from . import register_model


@register_model
def vgg16(num_classes: int = 10) -> nn.Module:
    """torchvision VGG16 (no pretrained weights); its adaptive pool makes it run on 32x32 input."""
    # Same module names as torchvision's, so the notes' vgg16 state_dict files load into it
    # (a 1000-class file only needs --num-classes 1000).
    return torchvision.models.vgg16(weights=None, num_classes=num_classes)
