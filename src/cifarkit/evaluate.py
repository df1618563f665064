"""Accuracy (top-1 and top-5), loss, per-class recall, precision and F1 with their macro means, and
the confusion matrix, with optional test-time augmentation."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.tensors import TensorSplit, normalize, reader
from .device import autocast


@dataclass
class EvalResult:
    accuracy: float
    loss: float
    n: int
    per_class: dict  # recall ("per-class accuracy"): right answers over the images of the class
    confusion: list  # confusion[true][pred] counts
    probs: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    top5: float | None = None        # with 5 or more classes
    precision: dict = field(default_factory=dict)   # right answers over the predictions of the class
    f1: dict = field(default_factory=dict)
    macro: dict = field(default_factory=dict)        # unweighted means over the classes with images

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "top5": self.top5, "loss": self.loss, "n": self.n,
                "per_class": self.per_class, "recall": self.per_class, "precision": self.precision,
                "f1": self.f1, "macro": self.macro, "confusion": self.confusion}


def class_metrics(confusion: torch.Tensor, classes: list) -> tuple[dict, dict, dict, dict]:
    """(recall, precision, F1 per class, their macro means) from confusion[true][pred].

    Recall is None for a class without images. Precision is None for a class with neither images
    nor predictions, and 0 for one with images that was never predicted (all of them missed), as
    scikit-learn counts it. The macro means average the classes that have images.
    """
    c = confusion.double()
    tp, true_n, pred_n = c.diag(), c.sum(1), c.sum(0)
    recall, precision, f1 = {}, {}, {}
    for i, name in enumerate(classes):
        recall[name] = (tp[i] / true_n[i]).item() if true_n[i] else None
        precision[name] = (tp[i] / pred_n[i]).item() if pred_n[i] else (0.0 if true_n[i] else None)
        r, p = recall[name], precision[name]
        f1[name] = None if r is None else (2 * p * r / (p + r) if p + r else 0.0)
    present = [name for i, name in enumerate(classes) if true_n[i]]
    mean = lambda d: sum(d[n] for n in present) / len(present) if present else None
    return recall, precision, f1, {"recall": mean(recall), "precision": mean(precision), "f1": mean(f1)}


def _translate(x: torch.Tensor, dx: int, dy: int | None = None) -> torch.Tensor:
    """Shift images by dx pixels horizontally and dy (default dx) vertically, reflect-padding."""
    dy = dx if dy is None else dy
    p = max(abs(dx), abs(dy))
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    h, w = x.shape[-2:]
    return padded[..., p + dy:p + dy + h, p + dx:p + dx + w]


@torch.no_grad()
def logits_tta(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Model logits averaged over test-time views.

    flip: the image and its mirror (2 views); flip_translate: plus a 1-pixel diagonal shift each
    way, weighted like the unshifted pair (4 views); multi: image and mirror, each unshifted and
    shifted by 1 pixel left/right/up/down, the unshifted pair weighted as much as the 4 shifts
    (10 views, 2.5x the cost of flip_translate).
    """
    out = model(x).float()
    if tta == "none":
        return out
    out = 0.5 * out + 0.5 * model(x.flip(3)).float()
    if tta == "flip_translate":
        shifted = 0.5 * model(_translate(x, 1)).float() + 0.5 * model(_translate(x, -1).flip(3)).float()
        out = 0.5 * out + 0.5 * shifted
    elif tta == "multi":
        shifts = [(1, 0), (-1, 0), (0, 1), (0, -1)]
        shifted = sum(0.5 * model(_translate(v, dx, dy)).float()
                      for dx, dy in shifts for v in (x, x.flip(3))) / len(shifts)
        out = 0.5 * out + 0.5 * shifted
    return out


@torch.no_grad()
def predict_tensors(model: nn.Module, x_uint8: torch.Tensor, mean, std, device, precision="fp32",
                    batch_size: int = 1000, tta: str = "none", channels_last: bool = True) -> torch.Tensor:
    """Logits (float32, on CPU) for uint8 images (a tensor or a TensorSplit), batch by batch on
    ``device``; only one batch of images is read at a time."""
    model.eval()
    outs = []
    get = reader(x_uint8)
    for i in range(0, len(x_uint8), batch_size):
        xb = normalize(get(slice(i, i + batch_size)).to(device, non_blocking=True), mean, std,
                       channels_last=channels_last and device.type != "mps")
        with autocast(device, precision):
            outs.append(logits_tta(model, xb, tta).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, split: TensorSplit, classes: list, mean, std, device,
             precision: str = "fp32", batch_size: int = 1000, tta: str = "none",
             keep_probs: bool = False) -> EvalResult:
    logits = predict_tensors(model, split, mean, std, device, precision, batch_size, tta)
    y = split.y.cpu()
    n = len(y)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0, {}, [])
    loss = F.cross_entropy(logits, y).item()
    pred = logits.argmax(1)
    k = len(classes)
    confusion = torch.bincount(y * k + pred, minlength=k * k).view(k, k)
    recall, precision, f1, macro = class_metrics(confusion, classes)
    top5 = ((logits.topk(5, 1).indices == y[:, None]).any(1).double().mean().item() if k >= 5 else None)
    return EvalResult((pred == y).double().mean().item(), loss, n, recall, confusion.tolist(),
                      logits.softmax(1) if keep_probs else None, y if keep_probs else None,
                      top5, precision, f1, macro)


def split_for_checkpoint(ckpt, data: str | None, split: str = "val", data_root: str | None = None,
                         download: bool = True, progress: bool = True):
    """Rebuild the split a checkpoint was validated on (same data, val size and seed)."""
    from .data import load_data, stratified_split
    from .data.sources import preprocess_of
    from .errors import CifarkitError

    cfg = ckpt.config or {}
    data = data or cfg.get("data") or "cifar10"
    size, crop_mode = preprocess_of(ckpt.preprocess)
    bundle = load_data(data, data_root or cfg.get("data_root"), download, size, progress, crop_mode)
    if bundle.classes != list(ckpt.classes):
        if len(bundle.classes) != len(ckpt.classes):
            raise CifarkitError(f"{data} has {len(bundle.classes)} classes but the model was trained on "
                                f"{len(ckpt.classes)} ({', '.join(ckpt.classes[:5])}...)",
                                "evaluate on data with the model's classes")
        if ckpt.source == "cifarkit":
            raise CifarkitError(f"the class names of {data} ({', '.join(bundle.classes[:4])}...) differ "
                                f"from the model's ({', '.join(ckpt.classes[:4])}...)",
                                "use data with the same class folders")
    if split in bundle.splits:
        return bundle.splits[split], bundle.classes
    if split == "test":
        raise CifarkitError(f"{data} has no test split", "add DIR/test/<class>/ or use --split val")
    if split in ("val", "train") and "val" not in bundle.splits:
        val_size = int(cfg.get("val_size", 5000))
        if split == "val" and val_size == 0:
            raise CifarkitError(f"the model was trained on every image of {data} (--val-size 0): "
                                "it has no val split", "evaluate with --split test, or --data on "
                                "images it was not trained on")
        tr, va = stratified_split(bundle.train.y, val_size, int(cfg.get("seed", 0)))
        return bundle.train.subset(va if split == "val" else tr), bundle.classes
    if split == "train":
        return bundle.train, bundle.classes
    raise CifarkitError(f"unknown split {split!r}", "use val, test or train", exit_code=2)


def evaluate_checkpoint(ckpt, data: str | None = None, split: str = "val", device: str = "auto",
                        precision: str = "auto", tta: str | None = None, batch_size: int = 1000,
                        data_root: str | None = None, keep_probs: bool = False, progress: bool = True):
    from .device import resolve_device, resolve_precision

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    s, classes = split_for_checkpoint(ckpt, data, split, data_root, progress=progress)
    model = ckpt.build_model(dev)
    if dev.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    tta = tta if tta is not None else (ckpt.config or {}).get("tta", "none")
    return evaluate(model, s.to(dev), list(ckpt.classes), ckpt.preprocess["mean"], ckpt.preprocess["std"],
                    dev, prec, batch_size, tta, keep_probs), s
