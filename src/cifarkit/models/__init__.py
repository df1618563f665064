"""Model registry: ``register_model`` / ``create_model`` / ``list_models``.

Each model family lives in its own module and registers a constructor ``fn(num_classes, **kw)``.
Checkpoints store the registered name and the keyword arguments, so a checkpoint file alone
rebuilds its network.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from ..errors import CifarkitError, closest

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_doc(name: str) -> str:
    doc = (_REGISTRY[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    if name not in _REGISTRY:
        raise CifarkitError(
            f"unknown model {name!r}",
            f"{closest(name, _REGISTRY)}choose one of: {', '.join(list_models())}",
            exit_code=2,
        )
    if num_classes < 1:
        raise CifarkitError(f"num_classes must be >= 1, got {num_classes}", exit_code=2)
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Importing the family modules registers their models.
from . import tudui, vgg, resnet, fast  # noqa: E402,F401
