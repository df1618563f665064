"""Your own network: ``--model path/to/file.py:Name`` wherever a model is named.

``Name`` is an ``nn.Module`` class or a function returning one. It gets ``num_classes`` when its
signature takes it (and any model_args as keywords); otherwise it is called without arguments,
as the notes write ``Tudui()``.

Importing a file runs its code, so cifarkit imports only files the user names on the command line
or in the API, never one named inside a checkpoint: a checkpoint of such a network records the
reference (path, name, SHA-256 of the file) and the weights, and loading it needs the same
``--model`` again (checkpoint.py says so in one line). A file that changed since training is a
warning, not an error: the weights still load if the layers fit.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch.nn as nn

from ..errors import CifarkitError


def is_file_ref(name) -> bool:
    """True for 'some/file.py:Name' (the part before the last colon ends in .py)."""
    if not isinstance(name, str) or ":" not in name:
        return False
    path, _, attr = name.rpartition(":")
    return path.endswith(".py") and bool(attr)


def split_ref(ref: str) -> tuple[Path, str]:
    path, _, attr = ref.rpartition(":")
    return Path(path), attr


def absolute_ref(ref: str) -> str:
    """The same reference with an absolute path (what a run records, so it works from any folder)."""
    path, attr = split_ref(ref)
    return f"{path.expanduser().resolve()}:{attr}"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_of(ref: str) -> dict:
    """What a checkpoint records about the file: path, name and the file's SHA-256."""
    path, attr = split_ref(absolute_ref(ref))
    return {"path": str(path), "name": attr, "sha256": file_sha256(path)}


def reference_of(model: nn.Module) -> str:
    """How a run of ``cifarkit.fit(model)`` records its network: 'file.py:Name' where the class is
    defined at the top of a .py file (so --model can rebuild it), else 'module:Name'."""
    cls = type(model)
    try:
        file = inspect.getsourcefile(cls)
    except TypeError:
        file = None
    if file and file.endswith(".py") and Path(file).is_file() and "<" not in cls.__qualname__ \
            and "." not in cls.__qualname__:
        return f"{Path(file).resolve()}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(path: Path):
    if not path.is_file():
        raise CifarkitError(f"--model: {path} does not exist", "pass an existing file.py:Name")
    key = "cifarkit_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module   # so classes defined there pickle and dataclasses resolve
    try:
        spec.loader.exec_module(module)
    except Exception as exc:   # noqa: BLE001 - any error in the user's file becomes one line
        del sys.modules[key]
        line = ""
        tb = exc.__traceback__
        while tb is not None:   # the innermost line of the user's own file
            if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
                line = f" (line {tb.tb_lineno})"
            tb = tb.tb_next
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise CifarkitError(f"--model: importing {path} failed{line}: {type(exc).__name__}: {first}",
                            "fix the file (run `python FILE` to see the full error)", 2)
    return module


def build(ref: str, num_classes: int, **kwargs) -> nn.Module:
    """Instantiate the network ``ref`` names, for ``num_classes`` where it takes that argument."""
    path, attr = split_ref(ref)
    module = _import(path.expanduser())
    if not hasattr(module, attr):
        found = sorted(k for k, v in vars(module).items()
                       if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
        raise CifarkitError(f"--model: {path} has no {attr!r}",
                            f"networks defined there: {', '.join(found) or 'none'}", 2)
    factory = getattr(module, attr)
    if not callable(factory):
        raise CifarkitError(f"--model: {attr} in {path} is not a class or function",
                            "name an nn.Module subclass or a function that returns one", 2)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "num_classes" in params or takes_any:
        kwargs = {"num_classes": num_classes, **kwargs}
    unknown = [k for k in kwargs if k != "num_classes" and k not in params and not takes_any]
    if unknown:
        raise CifarkitError(f"model_args: {attr} in {path} takes no {', '.join(unknown)}",
                            f"it accepts: {', '.join(params) or 'no arguments'}", 2)
    try:
        model = factory(**kwargs)
    except Exception as exc:   # noqa: BLE001
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise CifarkitError(f"--model: building {attr} from {path} failed: {type(exc).__name__}: {first}",
                            "check its constructor's arguments", 2)
    if not isinstance(model, nn.Module):
        raise CifarkitError(f"--model: {attr} in {path} returned a {type(model).__name__}, not an nn.Module",
                            "name an nn.Module subclass or a function that returns one", 2)
    return model


def settings(ref: str) -> list[str]:
    """The keyword settings the class or function accepts, besides num_classes."""
    path, attr = split_ref(ref)
    factory = getattr(_import(path.expanduser()), attr, None)
    try:
        return [p for p in inspect.signature(factory).parameters if p != "num_classes"]
    except (TypeError, ValueError):
        return []
