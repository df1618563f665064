"""The checkpoint format and the only code that reads or writes it.

A cifarkit checkpoint is a ``torch.save`` of a dict holding plain types and tensors only, so it
loads with ``torch.load(weights_only=True)``: no pickled classes, no code runs on load.

    format: "cifarkit", version: 1
    model: {name, args, num_classes}     -> models.create_model(name, num_classes, **args)
    state_dict, classes, preprocess {mean, std, size}
    config (resolved TrainConfig), metrics, epoch, created, torch_version
    optimizer / scheduler / rng / ema / train_state   (for --resume; absent in exported files)

Other files are recognised too: our safetensors export, a bare ``state_dict`` (the notes'
"method 2", needs ``--model``), common wrappers ({'net': ..., 'acc': ..., 'epoch': ...}),
DataParallel ``module.`` and torch.compile ``_orig_mod.`` prefixes. A whole pickled model (the
notes' "method 1") is refused unless the caller passes ``trust_pickle=True``.

Writes are atomic (``atomic.py``): temp file in the same folder, fsync, ``os.replace``. A crash
at any moment leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import datetime as _dt
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .data.sources import CIFAR10_CLASSES
from . import atomic
from .errors import CifarkitError

FORMAT = "cifarkit"
FORMAT_VERSION = 1
PREFIXES = ("module.", "_orig_mod.")
DEFAULT_PREPROCESS = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "size": 32}  # ToTensor only


# ----------------------------------------------------------------------------- the format

@dataclass
class Checkpoint:
    model_name: str
    model_args: dict
    num_classes: int
    state_dict: dict
    classes: list
    preprocess: dict
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epoch: int = 0
    extra: dict = field(default_factory=dict)   # optimizer, scheduler, rng, ema, train_state
    source: str = ""                            # how it was read (for messages)
    path: str = ""
    model_source: dict = field(default_factory=dict)   # your own network: {path, name, sha256}

    def build_model(self, device="cpu") -> nn.Module:
        from .models import create_model, list_models, user
        if self.model_name not in list_models() and not user.is_file_ref(self.model_name) \
                and ":" in self.model_name:   # cifarkit.fit() of a class defined in a notebook
            raise CifarkitError(f"{self.path or 'this checkpoint'} holds weights of {self.model_name}, a class "
                                "cifarkit.fit() trained that no file defines",
                                "build your network in Python and load them: net.load_state_dict(ckpt.state_dict)")

        model = create_model(self.model_name, self.num_classes, **self.model_args)
        load_weights(model, self.state_dict, self.path or "checkpoint")
        return model.to(device).eval()

    def to_dict(self, with_training_state: bool = True) -> dict:
        d = {
            "format": FORMAT, "version": FORMAT_VERSION,
            "model": {"name": self.model_name, "args": self.model_args, "num_classes": self.num_classes,
                      **({"source": self.model_source} if self.model_source else {})},
            "state_dict": self.state_dict, "classes": list(self.classes),
            "preprocess": self.preprocess, "config": self.config, "metrics": self.metrics,
            "epoch": self.epoch, "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "torch_version": str(torch.__version__),
        }
        if with_training_state:
            d.update(self.extra)
        return d

    def card(self) -> dict:
        """What a person wants to know about the model (used by `serve` and `export`)."""
        return {"model": self.model_name, "model_args": self.model_args,
                "num_classes": self.num_classes, "classes": list(self.classes),
                "preprocess": self.preprocess, "epoch": self.epoch,
                "val_accuracy": self.metrics.get("val_acc"), "recipe": self.config.get("recipe"),
                "trained": self.extra.get("created") or self.metrics.get("created")}


def save_checkpoint(ckpt: Checkpoint, path, with_training_state: bool = True) -> None:
    state = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in ckpt.state_dict.items()}
    data = ckpt.to_dict(with_training_state)
    data["state_dict"] = state
    atomic.torch_save(data, Path(path))


def strip_prefixes(state_dict: dict) -> dict:
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_weights(model: nn.Module, state_dict: dict, where: str = "checkpoint") -> None:
    """load_state_dict with a readable error listing missing/unexpected/mis-shaped keys."""
    state_dict = strip_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and torch.is_tensor(state_dict[k])
              and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if keys:
                more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
                parts.append(f"{label}: {', '.join(keys[:4])}{more}")
        raise CifarkitError(f"{where} does not fit model {type(model).__name__}: {'; '.join(parts)}",
                            "pass the --model (and --num-classes) the weights were trained with")
    model.load_state_dict(state_dict)


# ----------------------------------------------------------------------------- reading any file

def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= 100_000_000 and head[8:9] == b"{"


def _torch_load(path: Path, trust_pickle: bool, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "Unsupported operand" in text:
            raise CifarkitError(
                f"{path} holds pickled Python objects (such as a whole model saved with torch.save(model)), "
                "and unpickling can run arbitrary code, so it was not loaded",
                f"if you trust its source: cifarkit convert {path} --trust-pickle --out safe.ckpt")
        raise CifarkitError(f"{path} is not a readable checkpoint ({text.splitlines()[0][:120]})",
                            "check that the file is complete; re-export or re-download it")
    except FileNotFoundError:
        raise CifarkitError(f"checkpoint {path} does not exist", "check the path")
    except IsADirectoryError:
        raise CifarkitError(f"{path} is a folder, not a checkpoint",
                            f"pass a file such as {path}/best.ckpt")
    except PermissionError:
        raise CifarkitError(f"cannot read {path}: permission denied", "check its permissions")
    except CifarkitError:
        raise
    except Exception as exc:  # truncated zip, random bytes, EOF, bad magic number ...
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise CifarkitError(f"{path} is not a readable checkpoint: {first}",
                            "the file is truncated, damaged or not a PyTorch/safetensors file")


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CifarkitError(f"{path} is not a readable safetensors file: {exc}",
                            "the file is truncated or damaged; export it again")
    info = {}
    if "cifarkit" in meta:
        try:
            info = json.loads(meta["cifarkit"])
        except json.JSONDecodeError:
            info = {}
    return tensors, info


def _find_state_dict(obj) -> dict | None:
    """A bare state_dict, or one inside a common wrapper dict."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) for k in obj) \
            and all(torch.is_tensor(v) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "weights", "params"):
            if key in obj:
                found = _find_state_dict(obj[key])
                if found is not None:
                    return found
    return None


def infer_num_classes(model_name: str, state_dict: dict, model_args: dict | None = None) -> int:
    """The class count a state_dict was trained for: the out-size of the model's last weight."""
    from .models import create_model

    probe = create_model(model_name, 10, **(model_args or {}))
    sd = strip_prefixes(state_dict)
    last = [k for k, v in probe.state_dict().items() if k.endswith("weight") and v.ndim == 2]
    if last and last[-1] in sd and torch.is_tensor(sd[last[-1]]):
        return int(sd[last[-1]].shape[0])
    return 10


def load_checkpoint(path, model: str | None = None, num_classes: int | None = None,
                    trust_pickle: bool = False, map_location="cpu") -> Checkpoint:
    """Read any supported file into a Checkpoint (weights on CPU unless ``map_location`` says)."""
    path = Path(path)
    if not path.exists():
        raise CifarkitError(f"checkpoint {path} does not exist", "check the path")
    if path.is_dir():
        raise CifarkitError(f"{path} is a folder, not a checkpoint", f"pass a file such as {path}/best.ckpt")
    try:
        is_st = _is_safetensors(path)
    except OSError as exc:
        raise CifarkitError(f"cannot read {path}: {exc.strerror or exc}", "check the path and permissions")
    if is_st:
        tensors, info = _load_safetensors(path)
        name = _network_for(path, info.get("model", {}), model) or model or info.get("model", {}).get("name")
        if not name:
            raise CifarkitError(f"{path} is a safetensors file without cifarkit metadata",
                                "pass --model NAME (see `cifarkit models`)")
        args = info.get("model", {}).get("args", {})
        n = num_classes or info.get("model", {}).get("num_classes") or infer_num_classes(name, tensors, args)
        return Checkpoint(name, args, int(n), tensors, info.get("classes") or _default_classes(n),
                          info.get("preprocess") or dict(DEFAULT_PREPROCESS), info.get("config", {}),
                          info.get("metrics", {}), int(info.get("epoch", 0)), source="safetensors",
                          path=str(path), model_source=info.get("model", {}).get("source") or {})

    obj = _torch_load(path, trust_pickle, map_location)

    if isinstance(obj, nn.Module):  # the notes' method 1, only reachable with trust_pickle
        return _from_module(obj, path, model)

    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        version = obj.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CifarkitError(f"{path} uses checkpoint format version {version}, newer than this "
                                f"cifarkit understands ({FORMAT_VERSION})", "upgrade cifarkit")
        m = obj["model"]
        known = {"format", "version", "model", "state_dict", "classes", "preprocess", "config",
                 "metrics", "epoch"}
        return Checkpoint(_network_for(path, m, model) or m["name"], dict(m.get("args", {})), int(m["num_classes"]),
                          obj["state_dict"], list(obj["classes"]), dict(obj["preprocess"]),
                          dict(obj.get("config", {})), dict(obj.get("metrics", {})),
                          int(obj.get("epoch", 0)), {k: v for k, v in obj.items() if k not in known},
                          source="cifarkit", path=str(path), model_source=dict(m.get("source") or {}))

    sd = _find_state_dict(obj)
    if sd is None:
        raise CifarkitError(f"{path} holds no model weights cifarkit recognises "
                            f"(a {type(obj).__name__})",
                            "expected a cifarkit checkpoint, a state_dict, or a dict with one under "
                            "'state_dict'/'model'/'net'")
    if not model:
        raise CifarkitError(f"{path} is a bare state_dict: it does not say which network it is for",
                            "pass --model NAME (see `cifarkit models`), e.g. --model tudui")
    n = num_classes or infer_num_classes(model, sd)
    meta = {k: obj[k] for k in ("epoch",) if isinstance(obj, dict) and isinstance(obj.get(k), int)}
    return Checkpoint(model, {}, int(n), strip_prefixes(sd), _default_classes(n),
                      dict(DEFAULT_PREPROCESS), {}, {}, meta.get("epoch", 0), source="state_dict",
                      path=str(path))


def _network_for(path: Path, recorded: dict, given) -> str | None:
    """For a checkpoint of your own network (``file.py:Name``): the reference to build it from,
    which must be the caller's ``--model`` (cifarkit never imports code that a file it reads
    names). None for a registered network."""
    from .models import user
    name = recorded.get("name")
    if not user.is_file_ref(name):
        return None
    src = recorded.get("source") or {}
    where = f"{src.get('path') or user.split_ref(name)[0]}:{src.get('name') or user.split_ref(name)[1]}"
    if not given:
        raise CifarkitError(f"{path} holds your own network {where}; cifarkit never imports code "
                            "that a checkpoint names", f"pass --model {where} (the file you trust) to load it")
    if not user.is_file_ref(given):
        raise CifarkitError(f"{path} holds your own network {where}, not the registered {given!r}",
                            f"pass --model {where}")
    file = user.split_ref(given)[0].expanduser()
    if src.get("sha256") and file.is_file() and user.file_sha256(file) != src["sha256"]:
        import warnings
        warnings.warn(f"{file} has changed since {path} was trained (its SHA-256 differs); "
                      "loading the weights into the network it defines now")
    return given


def _default_classes(n: int) -> list[str]:
    return list(CIFAR10_CLASSES) if n == 10 else [f"class_{i}" for i in range(n)]


def _from_module(module: nn.Module, path: Path, model: str | None) -> Checkpoint:
    """Identify a whole pickled model by trying each registered architecture's keys and shapes."""
    from .models import create_model, list_models

    sd = strip_prefixes({k: v for k, v in module.state_dict().items()})
    # cifarkit's own pickle export keeps the model's settings, class names and preprocessing
    meta = getattr(module, "cifarkit", None)
    meta = meta if isinstance(meta, dict) else {}
    args = meta.get("model_args") if isinstance(meta.get("model_args"), dict) else {}
    names = [model] if model else ([meta["model"]] if meta.get("model") in list_models() else list_models())
    for name in names:
        try:
            n = infer_num_classes(name, sd, args)
            probe = create_model(name, n, **args).state_dict()
        except Exception:
            continue
        if probe.keys() == sd.keys() and all(probe[k].shape == sd[k].shape for k in sd):
            classes = meta.get("classes")
            classes = list(classes) if isinstance(classes, list) and len(classes) == n else _default_classes(n)
            pre = meta.get("preprocess") if isinstance(meta.get("preprocess"), dict) else DEFAULT_PREPROCESS
            return Checkpoint(name, dict(args), n, sd, classes, dict(pre), source="pickle", path=str(path))
    raise CifarkitError(f"{path} holds a {type(module).__name__} whose layers match no registered model",
                        "see `cifarkit models`; only registered architectures can be converted")


def export_safetensors(ckpt: Checkpoint, path) -> None:
    from safetensors.torch import save as st_save

    info = {"format": FORMAT, "version": FORMAT_VERSION,
            "model": {"name": ckpt.model_name, "args": ckpt.model_args, "num_classes": ckpt.num_classes,
                      **({"source": ckpt.model_source} if ckpt.model_source else {})},
            "classes": list(ckpt.classes), "preprocess": ckpt.preprocess, "metrics": ckpt.metrics,
            "config": ckpt.config, "epoch": ckpt.epoch}
    tensors = {k: v.detach().cpu().contiguous() for k, v in strip_prefixes(ckpt.state_dict).items()}
    atomic.write_bytes(Path(path), st_save(tensors, metadata={"cifarkit": json.dumps(info)}))
    atomic.write_bytes(Path(str(path) + ".json"), json.dumps(info, indent=2).encode())


def export_pickle(ckpt: Checkpoint, path) -> None:
    """The notes' method 1: the whole nn.Module pickled. Only for tools that insist on it.
    Class names and preprocessing ride along as a plain ``cifarkit`` attribute of the module."""
    model = ckpt.build_model("cpu")
    model.cifarkit = {"model": ckpt.model_name, "model_args": dict(ckpt.model_args),
                      "classes": list(ckpt.classes), "preprocess": dict(ckpt.preprocess)}
    atomic.torch_save(model, Path(path))
