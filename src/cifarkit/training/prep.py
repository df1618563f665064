"""Before the first step: device, threads, seeds, data and split, the network on its device,
and the native CPU kernels built and chosen. ``prepare(cfg)`` returns it all as ``Prepared``,
which tests and benchmarks reuse too.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .. import kernels
from ..config import TrainConfig
from ..data import channel_stats, load_data, stratified_split
from ..data.tensors import TensorSplit, normalize
from ..device import resolve_device, resolve_precision, set_threads
from ..distributed import Dist
from ..errors import CifarkitError
from ..models import create_model, freeze_backbone, init_from_data


@dataclass
class Prepared:
    """What the loop needs; also what tests and benchmarks reuse."""
    cfg: TrainConfig
    device: torch.device
    precision: str
    train: TensorSplit
    val: TensorSplit
    classes: list
    mean: list
    std: list
    model: nn.Module
    extra_splits: dict = field(default_factory=dict)


def prepare(cfg: TrainConfig, progress: bool = True, log=print, dist: Dist | None = None,
            network: nn.Module | None = None) -> Prepared:
    """Device, data, split and the network (``network``: an instance to train, else built from
    ``cfg.model``), checked against the data and placed on the device."""
    dist = dist or Dist()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        # ranks on one machine share its cores
        set_threads(cfg.threads or max(1, len(os.sched_getaffinity(0)) // dist.local_world))
    torch.manual_seed(cfg.seed)
    if device.type == "cuda" and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True   # fixed shapes: let cuDNN pick the fastest kernels
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False

    t0 = time.perf_counter()
    if not dist.is_main:
        dist.barrier()          # rank 0 downloads / decodes first; the others then read its cache
    bundle = load_data(cfg.data, cfg.data_root, cfg.download, cfg.image_size, progress and dist.is_main,
                       cfg.crop_mode)
    if dist.is_main:
        dist.barrier()
    if "val" in bundle.splits:
        train, val = bundle.train, bundle.splits["val"]
    else:
        tr_idx, va_idx = stratified_split(bundle.train.y, cfg.val_size, cfg.seed)
        train, val = bundle.train.subset(tr_idx), bundle.train.subset(va_idx)
    if len(train) == 0:
        raise CifarkitError(f"no training images in {cfg.data}", "add images to DIR/train/<class>/")
    if len(bundle.classes) < 2:
        raise CifarkitError(f"{cfg.data} has only one class ({bundle.classes[0]!r}): nothing to learn",
                            "a classifier needs at least two class folders")
    if cfg.batch_size > len(train):
        raise CifarkitError(f"--batch-size {cfg.batch_size} is larger than the training set "
                            f"({len(train)} images)", f"use --batch-size {len(train)} or less", 2)
    mean, std = channel_stats(train)
    log(f"data: {len(train)} train / {len(val)} val images, {len(bundle.classes)} classes, "
        f"{cfg.image_size}x{cfg.image_size} ({bundle.source}, {time.perf_counter() - t0:.1f}s)")
    _report_classes(train, bundle.classes, cfg, log)

    pre = None
    if cfg.pretrained:   # the normalisation the weights were trained with, not this data's
        from ..models.pretrained import preprocessing
        pre = preprocessing(cfg.model)
        mean, std = pre["mean"], pre["std"]
    model = _network(cfg, network, len(bundle.classes), log, pre)
    init_from_data(model, lambda: whitening_sample(cfg, train, mean, std))
    check_sizes(model, cfg, len(bundle.classes))
    model = place(model, cfg, device)
    native_kernels(cfg, model, device, precision, log, len(bundle.classes))
    # The data set lives on the training device as uint8 (150 MB for CIFAR-10); a decoded folder
    # on a CPU stays memory-mapped (TensorSplit).
    return Prepared(cfg, device, precision, train.to(device), val.to(device), bundle.classes,
                    mean, std, model, {k: v for k, v in bundle.splits.items() if k != "val"})


def _network(cfg: TrainConfig, network: nn.Module | None, num_classes: int, log,
             pre: dict | None = None) -> nn.Module:
    """The network to train: the given instance, the ImageNet-pretrained one (``pre``: its
    weights' preprocessing), or a new one."""
    if network is not None:
        model = network
    elif cfg.pretrained:
        from ..models.pretrained import build_pretrained
        model = build_pretrained(cfg.model, num_classes)
        size = pre["size"]
        log(f"pretrained: {cfg.model} with torchvision's ImageNet weights, a new {num_classes}-class head"
            + (f" (the weights were trained at {size} px; this run uses {cfg.image_size})"
               if size != cfg.image_size else ""))
    else:
        model = create_model(cfg.model, num_classes, **cfg.model_args)
    if cfg.freeze == "backbone":
        freeze_backbone(model)
    return model


def _report_classes(train: TensorSplit, classes: list, cfg: TrainConfig, log) -> None:
    """Print the training images per class; warn when the largest class has over 3x the smallest."""
    counts = torch.bincount(train.y.cpu(), minlength=len(classes)).tolist()
    if len(classes) <= 12:
        log("classes: " + ", ".join(f"{c} {n}" for c, n in zip(classes, counts)))
    big, small = max(range(len(counts)), key=counts.__getitem__), min(range(len(counts)), key=counts.__getitem__)
    if counts[big] > 3 * counts[small] and cfg.balance == "none":
        warnings.warn(f"unbalanced classes: {classes[big]} has {counts[big]} training images, {classes[small]} "
                      f"{counts[small]} ({counts[big] / max(counts[small], 1):.1f}x); accuracy then favours the "
                      "large classes - consider --balance weights or --balance sampler")


def class_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequencies, scaled so that a balanced set gets weight 1 everywhere."""
    counts = torch.bincount(y.cpu(), minlength=num_classes).double().clamp(min=1)
    return (len(y) / (num_classes * counts)).float()


def place(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """On the training device, NHWC where asked (MPS keeps NCHW)."""
    model = model.to(device)
    if cfg.channels_last and device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    return model


def whitening_sample(cfg: TrainConfig, train: TensorSplit, mean, std) -> torch.Tensor:
    """5,000 training images (seeded), normalised: what a network's ``init_from_data`` sees."""
    g = torch.Generator().manual_seed(cfg.seed)
    return normalize(train.images(torch.randperm(len(train), generator=g)[:5000]).cpu(), mean, std)


def native_kernels(cfg: TrainConfig, model: nn.Module, device, precision: str, log,
                    num_classes: int) -> None:
    """Build cifarkit's C++ kernels where the network would use them (channels_last on CPU): in
    bf16 the max-pool, the fused batch norm + GELU, and the 3x3 convolution weight gradient where
    the CPU has AVX-512 BF16; in fp32 (CPUs without native bf16) the max-pool, the fused batch
    norm + GELU and the weight gradient with AVX2. Then keep each, and the convolution's matrix-product forms, only on the
    shapes where it beats PyTorch's op on this CPU (kernels.choose). In fp32 the matrix products
    need no build: where the kernels cannot be built they are still timed.

    Done here, before training starts, so the one-time build and timing are reported like the
    data decode and not counted in training time. Without them, one line says why and training
    uses PyTorch's ops: the same max-pool results, weight gradients equal up to summation order.
    """
    layers = (kernels.MaxPool2x2, kernels.Conv3x3)
    if not (cfg.native_kernels and device.type == "cpu" and precision in ("bf16", "fp32")
            and cfg.channels_last and any(isinstance(m, layers) for m in model.modules())):
        return
    t0 = time.perf_counter()
    reason = kernels.load()
    if reason is not None and (precision == "bf16" or reason == "CIFARKIT_NATIVE=0"):
        log(f"native kernels: not used, {reason}; training uses PyTorch's max-pool and convolution "
            f"gradients (--no-native-kernels silences this)")
        return
    if reason is not None:   # fp32: the convolutions' matrix-product forms need no build
        log(f"native kernels: not used, {reason}; training uses PyTorch's max-pool, and oneDNN's "
            f"convolutions or their matrix-product forms (--no-native-kernels silences this)")
    models = [model]
    if cfg.hard_proxy:   # the proxy network's layers have their own shapes
        with torch.random.fork_rng(devices=[]):   # its random init must not shift the run's
            models.append(create_model(cfg.model, num_classes, **cfg.proxy_model_args()))
    sizes = sorted(set(cfg.progressive) | {cfg.image_size})
    chosen = kernels.choose(models, sizes, batch=min(cfg.batch_size, 256), precision=precision)
    if not chosen:
        return
    timed = f", {chosen['timed']} shapes timed against PyTorch's" if chosen.get("timed") else ""
    # in fp32 without a build nothing native runs: PyTorch's convolution or its matrix-product forms
    label = "native kernels" if kernels.loaded() else "kernels"
    log(f"{label}: {native_line(chosen)} ({time.perf_counter() - t0:.1f}s{timed})")


def native_line(chosen: dict) -> str:
    """Which implementations are used, e.g. 'C++ max-pool (3 shapes); 3x3 convolution weight
    gradient: nine matrix products on 4 shapes, PyTorch's on 12'."""
    if chosen.get("always"):
        return ("C++ max-pool, fused batch norm + GELU and 3x3 convolution weight gradient wherever "
                "they apply (CIFARKIT_NATIVE=always)")
    parts = []
    native, total = chosen.get("pool", (0, 0))
    if total and native == total:
        parts.append(f"C++ max-pool ({total} shapes)")
    elif native:
        parts.append(f"C++ max-pool on {native} of {total} shapes, PyTorch's faster on the rest")
    elif total:
        parts.append(f"PyTorch's max-pool, faster on this CPU ({total} shapes)")
    native, total = chosen.get("bngelu", (0, 0))
    if total:
        parts.append(f"fused batch norm + GELU on {native} of {total} shapes" if native
                     else f"PyTorch's batch norm and GELU, faster on this CPU ({total} shapes)")
    by = chosen.get("wgrad_by", {})
    if by:
        names = {"native": "C++ weight gradient" if chosen.get("fp32") else "C++", "matmul": "nine matrix products",
                 "gemm": "the whole convolution as matrix products", "pytorch": "PyTorch's"}
        what = "3x3 convolution in fp32" if chosen.get("fp32") else "3x3 convolution weight gradient"
        parts.append(f"{what}: " + ", ".join(
            f"{names[k]} on {by[k]}" for k in ("native", "matmul", "gemm", "pytorch") if by.get(k))
            + f" of {sum(by.values())} shapes")
    if not chosen.get("fp32") and not kernels.conv_wgrad_available():
        parts.append("no C++ convolution weight gradient (this CPU lacks AVX-512 BF16)")
    return "; ".join(parts)


def check_sizes(model: nn.Module, cfg: TrainConfig, num_classes: int) -> None:
    """Fail before training, in one line, if the network cannot take the run's images (its
    --image-size, then any --progressive sizes) or does not give one score per class."""
    sizes = [cfg.image_size] + sorted(set(cfg.progressive) - {cfg.image_size})
    was_training = model.training
    model.eval()   # no batch-norm statistics are touched
    try:
        for size in sizes:
            try:
                with torch.no_grad():
                    out = model(torch.zeros(2, 3, size, size))
            except Exception as exc:  # noqa: BLE001 - a user's network can raise anything here
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
                if size == cfg.image_size:
                    raise CifarkitError(f"model {cfg.model} cannot take {size}x{size} images ({why})",
                                        "pass the --image-size the network was written for, or change its "
                                        "layers (`cifarkit summary MODEL --input 3xSxS` shows every size)", 2)
                raise CifarkitError(f"model {cfg.model} cannot take {size}x{size} images for --progressive ({why})",
                                    "use a network that ends in global pooling (fast, resnet18) or drop "
                                    "--progressive", 2)
            if not (torch.is_tensor(out) and out.ndim == 2 and out.shape[0] == 2):
                shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
                raise CifarkitError(f"model {cfg.model} returns {shape} for a batch of 2 images",
                                    "a classifier returns one row of class scores per image: (batch, classes)", 2)
            if out.shape[1] != num_classes:
                raise CifarkitError(f"model {cfg.model} outputs {out.shape[1]} scores per image but "
                                    f"{cfg.data} has {num_classes} classes",
                                    f"make its last layer output {num_classes} (e.g. nn.Linear(..., {num_classes})), "
                                    "or give it a num_classes argument", 2)
    finally:
        model.train(was_training)
