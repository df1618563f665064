"""A small network of your own for photos of any size: `--model examples/small_net.py:small`.

Four stride-2 convolution blocks halve the image four times and a global average pool makes
the result independent of the input size, so the same network trains at --image-size 64, 128
or 224. cifarkit passes ``num_classes`` because the function takes it.

    cifarkit train --data DIR --model examples/small_net.py:small --image-size 128 --flip --crop-pad 8
"""
from torch import nn


def small(num_classes: int) -> nn.Module:
    layers, width = [], 3
    for out in (16, 32, 64, 64):
        layers += [nn.Conv2d(width, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
