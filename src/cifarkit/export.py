"""Export for deployment: ONNX (dynamic batch axis, preprocessing in its metadata) and
TorchScript. Every export is run and compared with PyTorch on random and real inputs before it is
moved into place; a file that disagrees (max abs difference >= 1e-4 in fp32) is never written."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .checkpoint import Checkpoint, FORMAT_VERSION
from .data.sources import preprocess_of
from .errors import CifarkitError
from .predict import ImagePredictor

TOLERANCE = 1e-4


def _check_inputs(ckpt: Checkpoint, check_images=None, n_random: int = 4) -> torch.Tensor:
    """Random normalised inputs plus real images (given, or from the training folder if present)."""
    from .data.sources import is_image_file, read_image
    from .data.tensors import normalize

    size, crop_mode = preprocess_of(ckpt.preprocess)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n_random, 3, size, size, generator=g)]
    paths = list(check_images or [])
    data = (ckpt.config or {}).get("data")
    if not paths and data and data != "cifar10" and Path(data).is_dir():
        root = Path(data) / "train" if (Path(data) / "train").is_dir() else Path(data)
        for cls in sorted(p for p in root.iterdir() if p.is_dir())[:4]:
            paths += sorted(f for f in cls.iterdir() if is_image_file(f))[:2]
    if paths:
        arr = np.stack([read_image(p, size, crop_mode) for p in paths]).transpose(0, 3, 1, 2).copy()
        xs.append(normalize(torch.from_numpy(arr), ckpt.preprocess["mean"], ckpt.preprocess["std"]))
    return torch.cat(xs)


def _metadata(ckpt: Checkpoint) -> dict:
    return {"format": "cifarkit", "version": FORMAT_VERSION,
            "model": {"name": ckpt.model_name, "args": ckpt.model_args, "num_classes": ckpt.num_classes},
            "classes": list(ckpt.classes),
            "preprocess": {**ckpt.preprocess, "crop_mode": preprocess_of(ckpt.preprocess)[1],
                           "input": "float32 NCHW RGB, x = (pixel/255 - mean) / std, size×size: center = "
                                    "shorter side resized to size then the centre cut out, squash = "
                                    "stretched"},
            "metrics": ckpt.metrics}


def _failed(tmp: str, exc: Exception, what: str, hint: str):
    """Remove the half-made file and raise one line saying what failed."""
    atomic.discard(tmp)
    if isinstance(exc, CifarkitError):
        raise exc
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    raise CifarkitError(f"{what} failed: {type(exc).__name__}: {first}", hint) from None


def _finish(tmp: str, out: Path, diff: float, what: str) -> float:
    if not diff < TOLERANCE:
        atomic.discard(tmp)
        raise CifarkitError(f"the {what} export differs from PyTorch by {diff:.2e} (limit {TOLERANCE:g}); "
                            f"{out} was not written", "please report this model/exporter combination")
    atomic.commit(tmp, out)   # fsync'd, then moved in place: never a torn model file
    return diff


def export_onnx(ckpt: Checkpoint, out, check_images=None, opset: int = 18) -> float:
    """Write an ONNX model with a dynamic batch axis; returns the max abs difference to PyTorch."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise CifarkitError(f"ONNX export needs {exc.name or 'onnx and onnxruntime'}",
                            "pip install 'cifarkit[export]'")

    out = Path(out)
    model = ckpt.build_model("cpu").float().eval()
    size = preprocess_of(ckpt.preprocess)[0]
    example = torch.randn(2, 3, size, size)
    tmp = atomic.temp_beside(out, ".onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                batch = torch.export.Dim("batch", min=1, max=65536)
                prog = torch.onnx.export(model, (example,), dynamo=True, opset_version=opset,
                                         input_names=["images"], output_names=["logits"],
                                         dynamic_shapes=({0: batch},), verbose=False)
                prog.save(tmp)
            except Exception:  # older exporters: the TorchScript-based path
                torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=17,
                                  input_names=["images"], output_names=["logits"],
                                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load(tmp)
        meta = _metadata(ckpt)
        for k, v in (("cifarkit", json.dumps(meta)), ("classes", json.dumps(meta["classes"])),
                     ("preprocess", json.dumps(meta["preprocess"]))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp)
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        x = _check_inputs(ckpt, check_images)
        name = sess.get_inputs()[0].name
        with torch.no_grad():
            ref = model(x).numpy()
        got = np.concatenate([sess.run(None, {name: x[i:i + 3].numpy()})[0] for i in range(0, len(x), 3)])
        diff = float(np.abs(got - ref).max())
    except Exception as exc:
        _failed(tmp, exc, f"ONNX export of {ckpt.model_name}", "try --format torchscript or safetensors")
    return _finish(tmp, out, diff, "ONNX")


def _export_checked(ckpt: Checkpoint, out, check_images, suffix: str, name: str, doing: str, hint: str,
                    write) -> float:
    """Write the model to a temp file with ``write(model, example, tmp, extra_files)`` (which
    returns the reloaded, callable model), compare it with PyTorch, and move it in place only if
    it matches. Shared by the TorchScript and torch.export formats."""
    out = Path(out)
    model = ckpt.build_model("cpu").float().eval()
    size = preprocess_of(ckpt.preprocess)[0]
    tmp = atomic.temp_beside(out, suffix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = write(model, torch.randn(2, 3, size, size), tmp, {"cifarkit.json": json.dumps(_metadata(ckpt))})
        x = _check_inputs(ckpt, check_images)
        with torch.no_grad():
            diff = float((loaded(x) - model(x)).abs().max())
    except Exception as exc:
        _failed(tmp, exc, f"{doing} of {ckpt.model_name}", hint)
    return _finish(tmp, out, diff, name)


def export_torchscript(ckpt: Checkpoint, out, check_images=None) -> float:
    def write(model, example, tmp, extra):
        torch.jit.save(torch.jit.trace(model, example), tmp, _extra_files=extra)
        return torch.jit.load(tmp)
    return _export_checked(ckpt, out, check_images, ".pt", "TorchScript", "TorchScript export",
                           "try --format onnx or safetensors", write)


def export_pt2(ckpt: Checkpoint, out, check_images=None) -> float:
    """Write a ``torch.export`` program (.pt2) with a dynamic batch axis: the successor of
    TorchScript (whose ``torch.jit.trace`` this PyTorch deprecates). Its file format is not a
    pickle; ``torch.export.load(path).module()`` gives a callable model. Checked against PyTorch
    like the others."""
    def write(model, example, tmp, extra):
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, tmp, extra_files=extra)
        return torch.export.load(tmp).module()
    return _export_checked(ckpt, out, check_images, ".pt2", "pt2", "torch.export",
                           "try --format onnx or safetensors", write)


class OnnxPredictor(ImagePredictor):
    """Same interface as predict.Predictor, running an exported .onnx file with onnxruntime."""

    def __init__(self, path):
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise CifarkitError("predicting with an .onnx file needs onnxruntime",
                                "pip install 'cifarkit[export]'")
        path = Path(path)
        if not path.exists():
            raise CifarkitError(f"model file {path} does not exist", "check the path")
        try:
            proto = onnx.load(str(path), load_external_data=False)
            meta = json.loads({p.key: p.value for p in proto.metadata_props}["cifarkit"])
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except KeyError:
            raise CifarkitError(f"{path} has no cifarkit metadata (classes, preprocessing)",
                                "export it with `cifarkit export CKPT --format onnx`")
        except Exception as exc:
            raise CifarkitError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0][:160]}",
                                "export it again")
        self.classes = meta["classes"]
        self.size, self.crop_mode = preprocess_of(meta["preprocess"])
        self.mean, self.std = meta["preprocess"]["mean"], meta["preprocess"]["std"]
        self.input_name = self.session.get_inputs()[0].name
        self.card = {"model": meta["model"]["name"], "classes": self.classes, "format": "onnx",
                     "val_accuracy": meta.get("metrics", {}).get("val_acc")}

    def probs(self, arrays) -> torch.Tensor:
        from .data.tensors import normalize
        if not arrays:
            return torch.zeros(0, len(self.classes))
        x = normalize(torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()), self.mean, self.std)
        logits = self.session.run(None, {self.input_name: x.numpy()})[0]
        return torch.from_numpy(logits).softmax(1)
