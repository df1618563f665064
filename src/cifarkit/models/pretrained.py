"""torchvision's ImageNet classifiers, for fine-tuning (``--pretrained``) on your own photos.

Registered as ``tv_resnet18``, ``tv_resnet34``, ``tv_resnet50``, ``tv_mobilenet_v3_small``,
``tv_mobilenet_v3_large``, ``tv_efficientnet_b0``, ``tv_convnext_tiny`` (the ImageNet
architectures, unlike the CIFAR-stem ``resnet18``), and the notes' ``vgg16`` takes the same weights.
The weights come through torchvision's weights API and its cache (``$TORCH_HOME/hub/checkpoints``):
cifarkit downloads nothing itself, and offline a missing file is one line saying which file to put
where. The 1000-class ImageNet head is replaced by a fresh one for the data's classes; the
normalisation and input size come from the weights' own metadata.

A checkpoint stores the architecture and the fine-tuned weights, not "pretrained": rebuilding it
for eval never needs the ImageNet file.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from ..errors import CifarkitError
from . import register_model

# registry name -> torchvision name
TORCHVISION = {"tv_resnet18": "resnet18", "tv_resnet34": "resnet34", "tv_resnet50": "resnet50",
               "tv_mobilenet_v3_small": "mobilenet_v3_small", "tv_mobilenet_v3_large": "mobilenet_v3_large",
               "tv_efficientnet_b0": "efficientnet_b0", "tv_convnext_tiny": "convnext_tiny",
               "vgg16": "vgg16"}


def head_of(model: nn.Module) -> nn.Linear:
    """The classifier's last layer: the last nn.Linear in the network."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CifarkitError(f"{type(model).__name__} has no nn.Linear head", "--freeze backbone needs one", 2)
    return linears[-1]


def _roles(model: nn.Module) -> dict:
    return {"head": list(head_of(model).parameters())}


def _build(tv_name: str, num_classes: int) -> nn.Module:
    model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes)
    model.parameter_roles = functools.partial(_roles, model)   # models.parameter_roles reads it
    return model


def _register(name: str, tv_name: str):
    def factory(num_classes: int = 10) -> nn.Module:
        return _build(tv_name, num_classes)
    factory.__name__ = name
    factory.__doc__ = (f"torchvision {tv_name} (ImageNet architecture; --pretrained loads its ImageNet weights, "
                       "224 px inputs)")
    register_model(factory)


for _name, _tv in TORCHVISION.items():
    if _name != "vgg16":   # registered by vgg.py (the notes' network); it takes the same weights
        _register(_name, _tv)


def weights_for(name: str):
    """torchvision's DEFAULT weights entry for a registered network, or a one-line refusal."""
    if name not in TORCHVISION:
        raise CifarkitError(f"--pretrained: no ImageNet weights for model {name!r}",
                            f"use one of: {', '.join(TORCHVISION)}", 2)
    return torchvision.models.get_model_weights(TORCHVISION[name]).DEFAULT


def preprocessing(name: str) -> dict:
    """mean, std and input size the weights were trained with (their transforms' metadata)."""
    t = weights_for(name).transforms()
    return {"mean": list(t.mean), "std": list(t.std), "size": int(t.crop_size[0])}


def natural_size(name: str, pretrained: bool) -> int | None:
    """The input size an ImageNet network is made for (its weights' crop size): the default
    --image-size of tv_* networks, and of vgg16 with --pretrained; None for the others."""
    if name in TORCHVISION and (pretrained or name.startswith("tv_")):
        return preprocessing(name)["size"]
    return None


def build_pretrained(name: str, num_classes: int) -> nn.Module:
    """The network with its ImageNet weights and a new head for ``num_classes``."""
    weights = weights_for(name)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / Path(weights.url).name
    try:
        # torchvision's loader: reads the cached file, or downloads it (hash-checked) into the cache
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - offline, a proxy, a damaged file: one line, the fix
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise CifarkitError(f"--pretrained: the ImageNet weights of {name} are not in {folder} and could "
                            f"not be downloaded ({why})",
                            f"download {weights.url} into {folder}/ (keep the name {file.name}), "
                            "or set TORCH_HOME to the folder that holds hub/checkpoints/") from None
    model = _build(TORCHVISION[name], 1000)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CifarkitError(f"--pretrained: {file} does not fit {name} ({str(exc).splitlines()[0][:120]})",
                            f"delete it and download {weights.url} again") from None
    head = head_of(model)
    new = nn.Linear(head.in_features, num_classes)
    _replace(model, head, new)
    return model


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for key, child in parent.named_children():
            if child is old:
                setattr(parent, key, new)
                return
