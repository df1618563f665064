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
    """A registered network, or your own: ``name`` may be 'path/to/file.py:Name' (models/user.py)."""
    if user.is_file_ref(name):
        if num_classes < 1:
            raise CifarkitError(f"num_classes must be >= 1, got {num_classes}", exit_code=2)
        return user.build(name, num_classes, **kwargs)
    if name not in _REGISTRY:
        raise CifarkitError(
            f"unknown model {name!r}",
            f"{closest(name, _REGISTRY)}choose one of: {', '.join(list_models())}",
            exit_code=2,
        )
    if num_classes < 1:
        raise CifarkitError(f"num_classes must be >= 1, got {num_classes}", exit_code=2)
    check_model_args(name, kwargs)
    return _REGISTRY[name](num_classes=num_classes, **kwargs)


def model_settings(name: str) -> list[str]:
    """The keyword settings a registered model accepts (model_args), besides num_classes."""
    import inspect
    if user.is_file_ref(name):
        return user.settings(name)
    return [p for p in inspect.signature(_REGISTRY[name]).parameters if p != "num_classes"]


def check_model_args(name: str, args: dict) -> None:
    """Refuse model_args the model does not take, before any data is read."""
    if user.is_file_ref(name):
        return   # checked when the network is built (models/user.py), where its signature is known
    accepted = model_settings(name)
    for key in args:
        if key not in accepted:
            hint = (f"{closest(key, accepted)}model {name} accepts: {', '.join(accepted)}" if accepted
                    else f"model {name} takes no model_args; remove them")
            raise CifarkitError(f"model_args: model {name!r} has no setting {key!r}", hint, exit_code=2)


def parameter_roles(model: nn.Module) -> dict:
    """Parameters a network asks to be treated specially by the optimiser, by role.

    A network declares them with a ``parameter_roles()`` method returning ``{role: [params]}``;
    the known roles are "whiten_bias" (trained only for the first epochs of a Muon recipe, then
    frozen), "first_group" (the same, where optimizer_args sets first_group_epochs) and "head".
    Networks without the method (any plain nn.Module) have none.
    """
    declare = getattr(model, "parameter_roles", None)
    return dict(declare()) if callable(declare) else {}


def head_parameters(model: nn.Module) -> list:
    """The classifier head's parameters: the network's declared "head" role, else its last nn.Linear."""
    declared = parameter_roles(model).get("head")
    if declared:
        return list(declared)
    from .pretrained import head_of
    return list(head_of(model).parameters())


def freeze_backbone(model: nn.Module) -> nn.Module:
    """``--freeze backbone``: every parameter stops training except the head's."""
    head = {id(p) for p in head_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
    return model


def init_from_data(model: nn.Module, images) -> None:
    """Let a network set layers from training images before training, if it declares
    ``init_from_data(images)`` (normalised float NCHW; fast's whitening layer). Others: nothing.
    ``images`` may be a function returning them: it is called only for such a network (the
    sample is 5,000 float images, ~1 GB at 128 px, not worth making for a network without it)."""
    init = getattr(model, "init_from_data", None)
    if callable(init):
        init(images() if callable(images) else images)


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except that a batch-norm layer whose weights are all frozen (``--freeze
    backbone``) stays in inference mode: it keeps the running statistics it came with, like the
    rest of the frozen backbone, instead of drifting to a few small batches (Keras does the same)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Importing the family modules registers their models.
from . import tudui, vgg, resnet, fast, pretrained  # noqa: E402,F401
from . import user  # noqa: E402  (your own network from a file: --model file.py:Name)
