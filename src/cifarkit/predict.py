"""Image files -> tensors with the checkpoint's preprocessing -> top-k classes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint
from .data.sources import is_image_file, preprocess_of, read_image
from .errors import CifarkitError
from .evaluate import predict_tensors


def collect_images(paths) -> list[Path]:
    """Files as given, folders searched recursively (hidden entries and non-images skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += [Path(dirpath, f) for f in sorted(filenames) if is_image_file(Path(f))]
        else:
            out.append(p)  # named explicitly: try it whatever its extension, report if unreadable
    return out


def top_k(probs: torch.Tensor, classes: list, k: int) -> list[list[dict]]:
    k = max(1, min(k, probs.shape[1]))
    p, i = probs.topk(k, dim=1)
    return [[{"class": classes[j], "prob": round(float(q), 6)} for q, j in zip(pr, ix)]
            for pr, ix in zip(p.tolist(), i.tolist())]


class ImagePredictor:
    """Image files or bytes -> top-k classes. Subclasses set ``size``, ``crop_mode``, ``classes``,
    ``card`` and implement ``probs`` (PyTorch here, onnxruntime in export.OnnxPredictor). Images
    are read exactly as evaluation reads the data set (data.sources.read_image)."""

    size: int
    crop_mode: str = "squash"
    classes: list

    def read(self, src) -> np.ndarray:
        return read_image(src, self.size, self.crop_mode)

    def probs(self, arrays: list[np.ndarray]) -> torch.Tensor:
        raise NotImplementedError

    def predict_bytes(self, data: bytes, k: int = 3) -> list[dict]:
        return top_k(self.probs([self.read(data)]), self.classes, k)[0]

    def predict_paths(self, paths, k: int = 3) -> tuple[list[dict], list[str]]:
        """([{"path", "top"}], [error lines]); unreadable files are reported, the others predicted."""
        arrays, ok, errors = [], [], []
        for f in collect_images(paths):
            try:
                arrays.append(self.read(f))
                ok.append(f)
            except CifarkitError as exc:
                errors.append(str(exc))
        if not arrays:
            return [], errors
        tops = top_k(self.probs(arrays), self.classes, k)
        return [{"path": str(f), "top": t} for f, t in zip(ok, tops)], errors


class Predictor(ImagePredictor):
    """A loaded checkpoint plus its preprocessing; used by `predict`, `serve` and the API."""

    def __init__(self, ckpt: Checkpoint, device="cpu", precision: str = "fp32"):
        self.ckpt = ckpt
        self.device = torch.device(device)
        self.precision = precision
        self.model = ckpt.build_model(self.device)
        self.size, self.crop_mode = preprocess_of(ckpt.preprocess)
        self.mean, self.std = ckpt.preprocess["mean"], ckpt.preprocess["std"]
        self.classes = list(ckpt.classes)
        self.card = ckpt.card()

    def probs(self, arrays: list[np.ndarray]) -> torch.Tensor:
        if not arrays:
            return torch.zeros(0, len(self.classes))
        x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
        logits = predict_tensors(self.model, x, self.mean, self.std, self.device, self.precision,
                                 channels_last=False)
        return logits.softmax(1)
