"""The training loop: the notes' forward / loss / zero_grad / backward / step, made real.

Read top to bottom: prepare (device, data, model, optimiser) -> for each epoch: batches from the
in-memory uint8 tensor -> augment the whole batch -> forward/loss -> backward/step -> metrics ->
validate -> checkpoint. Everything a resume needs (weights, optimiser, schedule, RNG and data
order, history) goes into last.ckpt, written atomically every epoch and on Ctrl-C.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt_mod, kernels
from .config import TrainConfig, save_yaml
from .data import load_data, stratified_split, channel_stats
from .data.augment import augment
from .data.tensors import TensorSplit, normalize
from .device import autocast, resolve_device, resolve_precision, set_threads
from .distributed import Dist, local_slice, setup as dist_setup
from .errors import CifarkitError, TrainingInterrupted
from .evaluate import evaluate
from .models import create_model, count_parameters
from .progress import Progress


# ----------------------------------------------------------------------------- pieces

def make_loss(cfg: TrainConfig, num_classes: int):
    """ce: cross-entropy on logits; mse/l1 (the notes' other losses): on softmax vs one-hot."""
    if cfg.loss == "ce":
        return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    base = nn.MSELoss() if cfg.loss == "mse" else nn.L1Loss()

    def loss_fn(logits, y):
        target = F.one_hot(y, num_classes).to(logits.dtype)
        if cfg.label_smoothing:
            target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
        return base(logits.float().softmax(1), target.float())
    return loss_fn


def make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "muon":
        return _make_muon(cfg, model)
    # No weight decay on biases and norm weights (1-D tensors): decaying them only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


MUON_DEFAULTS = {"muon_momentum": 0.6, "sgd_momentum": 0.85, "bias_lr": 0.053, "head_lr": 0.67,
                 "decay": 2e-6, "whiten_bias_epochs": 3}


def _make_muon(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Muon for conv filters; Nesterov SGD for the rest. Per-image rates are scaled by the batch
    size because the loss is a batch mean (the published values are for a summed loss)."""
    from .optim import Muon

    unknown = set(cfg.optimizer_args) - set(MUON_DEFAULTS)
    if unknown:
        raise CifarkitError(f"unknown optimizer_args for muon: {', '.join(sorted(unknown))}",
                            f"known: {', '.join(MUON_DEFAULTS)}", 2)
    a = {**MUON_DEFAULTS, **cfg.optimizer_args}
    bs = cfg.batch_size
    filters, whiten_bias, biases, head = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 4:
            filters.append(p)
        elif name.endswith("whiten.bias"):
            whiten_bias.append(p)
        elif p.ndim >= 2:
            head.append(p)
        else:
            biases.append(p)
    shrink = a["decay"] * bs   # per step; SGD's coupled decay multiplies weight_decay by lr
    groups = [{"params": filters, "kind": "muon", "lr": cfg.lr, "momentum": a["muon_momentum"],
               "weight_decay": 0.0}]
    for params, lr, tag in ((whiten_bias, a["bias_lr"] * bs, "whiten_bias"),
                            (biases, a["bias_lr"] * bs, "bias"), (head, a["head_lr"] * bs, "head")):
        if params:
            groups.append({"params": params, "kind": "sgd", "lr": lr, "momentum": a["sgd_momentum"],
                           "weight_decay": shrink / lr, "tag": tag})
    return Muon(groups)


def lr_lambdas(cfg: TrainConfig, opt, total_steps: int, steps_per_epoch: int):
    """One multiplier function per param group; the whitening bias stops after a few epochs."""
    main = lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch)
    out = []
    for g in opt.param_groups:
        if g.get("tag") == "whiten_bias":
            stop = max(1, int(whiten_bias_epochs(cfg) * steps_per_epoch))
            out.append(lambda s, stop=stop: max(0.0, 1 - s / stop))
            g["stop_step"] = stop    # from here on its learning rate is 0 for good (see freeze_stopped)
        else:
            out.append(main)
    return out


def whiten_bias_epochs(cfg: TrainConfig) -> float | None:
    """How long the whitening layer's bias trains (Muon recipes); None where no schedule applies."""
    return {**MUON_DEFAULTS, **cfg.optimizer_args}["whiten_bias_epochs"] if cfg.optimizer == "muon" else None


def freeze_stopped(opt, global_step: int) -> None:
    """Stop computing gradients for parameter groups whose learning rate has reached 0 for good.

    The whitening bias stops training after a few epochs; its gradient would still cost the
    backward pass of the first convolution with respect to its input (and a GELU backward at full
    resolution), about 6 % of a step on a CPU. With a learning rate of 0 the update is exactly
    zero, so freezing changes no weight: it only skips work.
    """
    for g in opt.param_groups:
        if g.get("stop_step") is not None and global_step >= g["stop_step"]:
            for p in g["params"]:
                p.requires_grad_(False)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier on cfg.lr at a given step: linear warm-up, then the chosen schedule."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total_steps - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return max(0.0, 1 - progress)
    # onecycle: cosine up over the warm-up (or 30 % when none), cosine down to ~0.
    if warm == 0:
        up = max(1, int(0.3 * total_steps))
        if step < up:
            return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * step / up))
        progress = (step - up) / max(1, total_steps - up)
    return 0.5 * (1 + math.cos(math.pi * progress)) * (1 - 1e-4) + 1e-4


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


def prepare(cfg: TrainConfig, progress: bool = True, log=print, dist: Dist | None = None) -> Prepared:
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
    bundle = load_data(cfg.data, cfg.data_root, cfg.download, cfg.image_size, progress and dist.is_main)
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
    mean, std = channel_stats(train.x)
    log(f"data: {len(train)} train / {len(val)} val images, {len(bundle.classes)} classes, "
        f"{cfg.image_size}x{cfg.image_size} ({bundle.source}, {time.perf_counter() - t0:.1f}s)")

    model = create_model(cfg.model, len(bundle.classes), **cfg.model_args)
    _init_whitening(model, cfg, train.x, mean, std)
    _check_sizes(model, cfg, len(bundle.classes))
    model = _place(model, cfg, device)
    _native_kernels(cfg, model, device, precision, log, len(bundle.classes))
    # The whole data set lives on the training device as uint8 (150 MB for CIFAR-10).
    return Prepared(cfg, device, precision, train.to(device), val.to(device), bundle.classes,
                    mean, std, model, {k: v for k, v in bundle.splits.items() if k != "val"})


def _place(model: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """On the training device, NHWC where asked (MPS keeps NCHW)."""
    model = model.to(device)
    if cfg.channels_last and device.type != "mps":
        model = model.to(memory_format=torch.channels_last)
    return model


def _init_whitening(model: nn.Module, cfg: TrainConfig, images: torch.Tensor, mean, std) -> None:
    """Networks with a patch-whitening first layer set it from 5,000 training images (seeded)."""
    if hasattr(model, "init_whitening"):
        g = torch.Generator().manual_seed(cfg.seed)
        sample = images[torch.randperm(len(images), generator=g)[:5000]]
        model.init_whitening(normalize(sample.cpu(), mean, std))


def _native_kernels(cfg: TrainConfig, model: nn.Module, device, precision: str, log,
                    num_classes: int) -> None:
    """Build cifarkit's C++ kernels where the network would use them (bf16 channels_last on CPU):
    the max-pool, and the 3x3 convolution weight gradient where the CPU has AVX-512 BF16; then
    keep each only on the shapes where it beats PyTorch's op on this CPU (kernels.choose).

    Done here, before training starts, so the one-time build and timing are reported like the
    data decode and not counted in training time. Without them, one line says why and training
    uses PyTorch's ops: the same max-pool results, weight gradients equal up to summation order.
    """
    if not (cfg.native_kernels and device.type == "cpu" and precision == "bf16" and cfg.channels_last
            and any(isinstance(m, (kernels.MaxPool2x2, kernels.Conv3x3)) for m in model.modules())):
        return
    t0 = time.perf_counter()
    reason = kernels.load()
    if reason is not None:
        log(f"native kernels: not used, {reason}; training uses PyTorch's max-pool and convolution "
            f"gradients (--no-native-kernels silences this)")
        return
    models = [model]
    if cfg.hard_proxy:   # the proxy network's layers have their own shapes
        with torch.random.fork_rng(devices=[]):   # its random init must not shift the run's
            models.append(create_model(cfg.model, num_classes, **cfg.proxy_model_args()))
    sizes = sorted(set(cfg.progressive) | {cfg.image_size})
    chosen = kernels.choose(models, sizes, batch=min(cfg.batch_size, 256))
    timed = f", {chosen['timed']} shapes timed against PyTorch's" if chosen.get("timed") else ""
    log(f"native kernels: {_native_line(chosen)} ({time.perf_counter() - t0:.1f}s{timed})")


def _native_line(chosen: dict) -> str:
    """Which native ops are used, e.g. 'C++ max-pool (3 shapes); PyTorch's 3x3 ... (16 shapes)'."""
    if chosen.get("always"):
        return "C++ max-pool and 3x3 convolution weight gradient wherever they apply (CIFARKIT_NATIVE=always)"
    parts = []
    for op, name in (("pool", "max-pool"), ("wgrad", "3x3 convolution weight gradient")):
        native, total = chosen.get(op, (0, 0))
        if op == "wgrad" and not kernels.conv_wgrad_available():
            parts.append("no native convolution weight gradient (this CPU lacks AVX-512 BF16)")
        elif total and native == total:
            parts.append(f"C++ {name} ({total} shapes)")
        elif native:
            parts.append(f"C++ {name} on {native} of {total} shapes, PyTorch's faster on the rest")
        elif total:
            parts.append(f"PyTorch's {name}, faster on this CPU ({total} shapes)")
    return "; ".join(parts)


def _check_sizes(model: nn.Module, cfg: TrainConfig, num_classes: int) -> None:
    """Fail before training if the network cannot take the --progressive image sizes."""
    sizes = sorted(set(cfg.progressive) - {cfg.image_size})
    if not sizes:
        return
    was_training = model.training
    model.eval()   # no batch-norm statistics are touched
    try:
        with torch.no_grad():
            for size in sizes:
                out = model(torch.zeros(2, 3, size, size))
                if tuple(out.shape) != (2, num_classes):
                    raise RuntimeError(f"output shape {tuple(out.shape)}")
    except RuntimeError as exc:
        raise CifarkitError(
            f"model {cfg.model} cannot take {size}x{size} images for --progressive "
            f"({str(exc).splitlines()[0][:100]})",
            "use a network that ends in global pooling (fast, resnet18) or drop --progressive", 2)
    finally:
        model.train(was_training)


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.recipe}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig | None = None, resume: str | None = None, progress: bool = True,
          log=print, stop_after_steps: int | None = None, epochs: int | None = None) -> dict:
    """Train per ``cfg`` (or continue the run in ``resume``); returns the summary dict.

    On resume the run's own config is used; ``epochs`` may extend it. ``stop_after_steps``
    simulates a Ctrl-C after that many optimiser steps (tests).
    """
    started = time.perf_counter()   # the wall time a user waits for, data loading included
    state = None
    if resume:
        rpath = Path(resume)
        rpath = rpath / "last.ckpt" if rpath.is_dir() else rpath
        old = ckpt_mod.load_checkpoint(rpath)
        if "train_state" not in old.extra:
            raise CifarkitError(f"{rpath} has no training state to resume from",
                                "resume from a run folder's last.ckpt")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        dropped = sorted(set(old.config) - known)
        if dropped:  # written by another cifarkit version
            warnings.warn(f"{rpath}: ignoring settings this version does not know: {', '.join(dropped)}")
        cfg = TrainConfig(**{k: v for k, v in old.config.items() if k in known}).validate()
        if epochs:  # extending a finished run is the one change a resume accepts
            done = old.extra["train_state"]["epoch"]
            if epochs < done or (epochs == done and old.extra["train_state"]["step_in_epoch"]):
                raise CifarkitError(f"--epochs {epochs} is fewer than the run has already trained "
                                    f"({done} complete epochs in {rpath})",
                                    f"pass --epochs {done + 1} or more to continue it", 2)
            cfg.epochs = epochs
        cfg.out = str(rpath.parent)
        state = old

    if cfg is None:
        raise CifarkitError("train() needs a config or a run to resume")
    dist = dist_setup(cfg.device)
    try:
        return _train(cfg, state, dist, progress, log, stop_after_steps, started)
    finally:
        dist.close()


def _train(cfg: TrainConfig, state, dist: Dist, progress: bool, log, stop_after_steps,
           started: float) -> dict:
    if not dist.is_main:  # one voice: only rank 0 logs, shows progress and writes files
        log, progress = (lambda *a, **k: None), False
    if cfg.batch_size < dist.world:
        raise CifarkitError(f"--batch-size {cfg.batch_size} is smaller than the {dist.world} processes",
                            "--batch-size is the global batch: use at least one image per process", 2)
    if state is not None:
        ts = state.extra["train_state"]
        log(f"resuming {cfg.out} at epoch {ts['epoch'] + 1}, step {ts['step_in_epoch']}")
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if dist.enabled:  # the time-stamped default name must be the same on every rank
        names = [str(run_dir)]
        torch.distributed.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    cfg.out = str(run_dir)
    if cfg.data != "cifar10" and Path(cfg.data).exists():
        # recorded absolute, so `cifarkit eval RUN/best.ckpt` finds the data from any folder
        cfg.data = str(Path(cfg.data).resolve())
    _check_writable(run_dir)   # fail before the data is loaded, but create nothing yet
    p = prepare(cfg, progress, log, dist)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarkitError(f"cannot create run folder {run_dir}: {exc.strerror or exc}",
                            "pass a writable --out folder")
    model, device, precision = p.model, p.device, p.precision
    num_classes = len(p.classes)
    if dist.is_main:
        save_yaml(cfg, run_dir / "config.yaml")

    opt = make_optimizer(cfg, model)
    n_train = len(p.train)
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambdas(cfg, opt, total_steps, steps_per_epoch))
    loss_fn = make_loss(cfg, num_classes)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    proxy = _Proxy(cfg, p, total_steps, steps_per_epoch) if cfg.hard_proxy else None
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)

    # Two generators: one orders the data (reset per epoch from a saved state), one augments.
    data_gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    # Alternating flip: each image's start orientation, fixed by the seed (so resume needs no state).
    flip_bits = (torch.randint(0, 2, (n_train,), generator=torch.Generator().manual_seed(cfg.seed + 3))
                 .to(device) if cfg.flip and cfg.alt_flip else None)
    history: list[dict] = []
    best_acc, start_epoch, start_step = -1.0, 0, 0
    resumed_sums = None  # the partial epoch's running totals, restored exactly (bit-exact resume)
    if state is not None:
        raw = state.extra.get("model_raw") or state.state_dict
        ckpt_mod.load_weights(model, raw, "resume checkpoint")
        opt.load_state_dict(state.extra["optimizer"])
        sched.load_state_dict(state.extra["scheduler"])
        if scaler.is_enabled() and state.extra.get("grad_scaler"):
            scaler.load_state_dict(state.extra["grad_scaler"])
        if ema is not None and state.extra.get("ema") is not None:
            ema.load_state_dict(state.extra["ema"])
        if proxy is not None:
            proxy.load_state_dict(state.extra["proxy"])
        ts = state.extra["train_state"]
        data_gen.set_state(ts["data_gen_epoch_start"])
        aug_gen.set_state(ts["aug_gen"])
        torch.set_rng_state(ts["torch_rng"])
        start_epoch, start_step = ts["epoch"], ts["step_in_epoch"]
        resumed_sums = ts["sums"] or None
        history = list(state.extra.get("history", []))
        best_acc = max([h["val_acc"] for h in history if h.get("val_acc") is not None] or [-1.0])

    step_model = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        if cfg.sync_bn:
            if device.type != "cuda":
                raise CifarkitError("--sync-bn needs CUDA devices", "drop --sync-bn on CPUs", 2)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        step_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    eager_model = step_model
    if cfg.compile:
        try:
            step_model = torch.compile(step_model)
        except Exception as exc:  # noqa: BLE001 - fall back with one warning, whatever the reason
            warnings.warn(f"torch.compile unavailable ({type(exc).__name__}); running eagerly")

    writer = _tensorboard(run_dir, cfg, start_epoch) if dist.is_main else None
    if writer is not None and start_epoch == 0 and start_step == 0:
        # What the network sees: a few training images after augmentation (own generator, so the
        # training stream is unchanged).
        g = torch.Generator(device=device).manual_seed(cfg.seed + 2)
        sample = augment(p.train.x[:32], g, cfg.flip, cfg.crop_pad, cfg.cutout)
        writer.add_images("train_samples_augmented", sample.cpu(), 0, dataformats="NCHW")
    log(f"model {cfg.model}: {count_parameters(model):,} parameters | device {device} | "
        f"precision {precision} | {cfg.epochs} epochs x {steps_per_epoch} steps of {cfg.batch_size}")

    def snapshot(epoch: int, step_in_epoch: int, data_state, metrics: dict, sums_now: dict):
        extra = {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "ema": ema.state_dict() if ema is not None else None,
            "proxy": proxy.state_dict() if proxy is not None else None,
            "history": list(history),
            "train_state": {"epoch": epoch, "step_in_epoch": step_in_epoch,
                            "data_gen_epoch_start": data_state, "aug_gen": aug_gen.get_state().cpu(),
                            "torch_rng": torch.get_rng_state(), "sums": dict(sums_now)},
        }
        weights = model.state_dict()
        if ema is not None:  # what we evaluate and ship is the averaged model; keep the raw one
            extra["model_raw"] = {k: v.detach().cpu() for k, v in weights.items()}
            weights = _ema_state(ema)
        return ckpt_mod.Checkpoint(cfg.model, dict(cfg.model_args), num_classes, weights,
                                   list(p.classes),
                                   {"mean": p.mean, "std": p.std, "size": cfg.image_size},
                                   cfg.to_dict(), metrics, epoch, extra)

    steps_done = 0
    epoch, pos, in_steps, bar = start_epoch, start_step, False, None
    epoch_data_state = data_gen.get_state()
    stop = _DeferredInterrupt()
    saved_epoch = start_epoch
    try:
        # the handler is restored on leaving the block, before the except clauses run
        with stop, (contextlib.nullcontext() if cfg.native_kernels else kernels.disabled()):
            for epoch in range(start_epoch, cfg.epochs):
                epoch_data_state = data_gen.get_state()
                perm = torch.randperm(n_train, generator=data_gen).to(device)
                pos = start_step if epoch == start_epoch else 0
                size = epoch_size(cfg, epoch)
                selecting = cfg.hard_fraction < 1 and epoch >= cfg.hard_start   # selective backprop
                if not dist.enabled:   # DDP fixes the set of parameters with gradients at wrap time
                    freeze_stopped(opt, epoch * steps_per_epoch + pos)
                if proxy is not None:
                    freeze_stopped(proxy.opt, epoch * steps_per_epoch + pos)
                    proxy.model.train()
                model.train()
                bar = Progress(steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", "step", progress)
                bar.update(pos)
                # Running totals stay tensors on the device: no .item() sync, and .detach() means no
                # autograd graph is kept alive (the notes' `running_loss += loss` pitfall).
                loss_acc = torch.zeros((), device=device)
                correct_acc = torch.zeros((), device=device, dtype=torch.int64)
                seen, seconds_before = 0, 0.0
                images = 0   # images through the step (with a proxy, more than the `seen` trained on)
                if pos and resumed_sums:
                    loss_acc += resumed_sums["loss"].to(device)
                    correct_acc += resumed_sums["correct"].to(device)
                    seen, seconds_before = resumed_sums["seen"], resumed_sums["seconds"]
                    images = resumed_sums.get("images", seen)
                t_epoch = time.perf_counter()
                in_steps = True
                for step in range(pos, steps_per_epoch):
                    idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                    xb, yb = p.train.x[idx], p.train.y[idx]
                    xb = augment(xb, aug_gen, cfg.flip, cfg.crop_pad, cfg.cutout,
                                 flip_bits[idx] if flip_bits is not None else None, epoch)
                    n_global = len(yb)
                    xb, yb = local_slice(xb, dist), local_slice(yb, dist)
                    xb = normalize(xb, p.mean, p.std, channels_last=cfg.channels_last and device.type != "mps")
                    if size != xb.shape[-1]:
                        # Progressive resizing: early epochs see smaller images, which cost about
                        # (size/32)^2 of a full-size step; the network ends in a global pool, so it
                        # takes any size, and the last full-size epochs adapt it back.
                        xb = F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)
                    out_all = None
                    images += len(yb)
                    if proxy is not None:   # trained on every whole batch, selecting or not
                        scores = proxy.step(xb, yb, loss_fn, device, precision)
                    if selecting:
                        if proxy is None:
                            out_all, loss_all = _score(model, loss_fn, xb, yb, device, precision)
                            scores, yb_all = out_all, yb
                        xb, yb = _hardest(xb, yb, scores, cfg.hard_fraction, cfg.hard_per_class)
                    with autocast(device, precision):
                        if step_model is not eager_model and steps_done == 0:
                            # torch.compile builds lazily: a compiler that fails does so here.
                            try:
                                out = step_model(xb)
                            except Exception as exc:  # noqa: BLE001
                                warnings.warn(f"torch.compile failed ({type(exc).__name__}: "
                                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                                              "running eagerly")
                                step_model = eager_model
                                out = step_model(xb)
                        else:
                            out = step_model(xb)
                        loss = loss_fn(out, yb)
                    opt.zero_grad(set_to_none=True)
                    # DDP averages gradients over ranks; weighting by this rank's share of the global
                    # batch makes that average the gradient of the global-batch mean loss.
                    share = (len(yb) * dist.world / n_global / (cfg.hard_fraction if selecting else 1)
                             if dist.enabled else 1.0)
                    # fp16 needs loss scaling against gradient underflow; a no-op in bf16/fp32.
                    scaler.scale(loss * share if share != 1.0 else loss).backward()
                    scaler.step(opt)
                    scaler.update()
                    sched.step()
                    if ema is not None:
                        ema.update_parameters(model)
                    if out_all is not None:   # the epoch's train metrics cover every image seen
                        out, loss, yb = out_all, loss_all, yb_all
                    # (with a proxy they cover the images trained on: the network never sees the rest)
                    bs = len(yb)
                    _accumulate(loss_acc, correct_acc, loss, out, yb)
                    seen += bs
                    pos = step + 1
                    steps_done += 1
                    global_step = epoch * steps_per_epoch + pos
                    # On the CPU .item() costs nothing, so every step is checked; on a GPU every 25.
                    if device.type == "cpu" or step % 25 == 0 or pos == steps_per_epoch:
                        lv = loss.item()
                        if dist.all_min(float(math.isfinite(lv))) < 1:   # every rank stops together
                            raise _NonFinite(global_step, lv)
                    if progress and (step % 10 == 0 or pos == steps_per_epoch):
                        dt = time.perf_counter() - t_epoch
                        bar.set_postfix(f"loss {loss_acc.item() / max(seen, 1):.3f} "
                                        f"acc {correct_acc.item() / max(seen, 1):.3f} "
                                        f"{images / max(dt, 1e-9):,.0f} img/s")
                    bar.update(1)
                    if stop_after_steps is not None and steps_done >= stop_after_steps:
                        stop.requested = True
                    if stop.should_stop(dist, step):   # Ctrl-C takes effect here, between steps
                        raise KeyboardInterrupt
                in_steps = False
                bar.close()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if dist.enabled:
                    totals = dist.all_sum(torch.stack([loss_acc.double().cpu(), correct_acc.double().cpu(),
                                                       torch.tensor(float(seen), dtype=torch.float64),
                                                       torch.tensor(float(images), dtype=torch.float64)]))
                    loss_acc, correct_acc, seen = totals[0].float(), totals[1].long(), int(totals[2])
                    images = int(totals[3])
                sums = _sums(loss_acc, correct_acc, seen, seconds_before + time.perf_counter() - t_epoch,
                             images)
                metrics, val_result = _end_epoch(epoch, cfg, p, ema, sums, opt, history)
                is_best = metrics.get("val_acc") is not None and metrics["val_acc"] > best_acc
                best_acc = max(best_acc, metrics.get("val_acc") or -1.0)
                if dist.is_main:
                    _write_metrics(run_dir, history)
                if writer is not None:
                    for k, v in metrics.items():
                        if isinstance(v, (int, float)) and k != "epoch":
                            writer.add_scalar(k, v, epoch + 1)
                    if val_result is not None and epoch + 1 == cfg.epochs:
                        from .plots import confusion_figure
                        writer.add_figure("val_confusion", confusion_figure(val_result.confusion, p.classes),
                                          epoch + 1)
                    writer.flush()
                log(_epoch_line(metrics, cfg.epochs, cfg.image_size))
                if dist.is_main:
                    snap = snapshot(epoch + 1, 0, data_gen.get_state(), metrics, {})
                    if is_best:
                        ckpt_mod.save_checkpoint(snap, run_dir / "best.ckpt", with_training_state=False)
                    ckpt_mod.save_checkpoint(snap, run_dir / "last.ckpt")
                saved_epoch = epoch + 1
                if stop.should_stop(dist, 0) and epoch + 1 < cfg.epochs:   # asked during eval/save
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        last = run_dir / "last.ckpt"
        if in_steps and dist.is_main and not stop.forced:
            # Save exactly where we are: weights after step `pos`, this epoch's data order and
            # partial sums, so the resumed run continues as if never stopped.
            partial = {"loss": loss_acc.detach().cpu(), "correct": correct_acc.cpu(), "seen": seen,
                       "images": images, "seconds": seconds_before + time.perf_counter() - t_epoch}
            ckpt_mod.save_checkpoint(snapshot(epoch, pos, epoch_data_state,
                                              {"interrupted_at_step": epoch * steps_per_epoch + pos},
                                              partial), last)
            where = f"epoch {epoch + 1}, step {pos}"
        else:  # between epochs, or forced: the last complete checkpoint stands
            where = f"epoch {epoch + 1}; the last complete checkpoint is from epoch {saved_epoch}"
        _close(writer)
        if not last.exists():
            raise TrainingInterrupted(f"interrupted at {where}; no checkpoint was written yet",
                                      "start the run again")
        raise TrainingInterrupted(f"interrupted at {where}; saved {last}",
                                  f"continue with: cifarkit train --resume {run_dir}")
    except _NonFinite as exc:
        if bar is not None:
            bar.close()
        _close(writer)
        raise CifarkitError(
            f"training stopped: the loss became {exc.value} at step {exc.step} (epoch {epoch + 1})",
            f"the learning rate ({cfg.lr:g}) is probably too high; try --lr {cfg.lr / 10:g}. "
            f"The last good checkpoint ({run_dir / 'last.ckpt'}) is untouched")

    _close(writer)
    summary = _summary(cfg, p, history, time.perf_counter() - started, run_dir, precision)
    summary["processes"] = dist.world
    if not dist.is_main:
        return summary
    ckpt_mod.atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    try:
        from .plots import plot_curves
        plot_curves(history, run_dir / "curves.png")
    except Exception as exc:  # a plotting problem must never lose a finished run
        warnings.warn(f"could not draw curves.png: {exc}")
    log(_final_line(summary, run_dir))
    return summary


def _final_line(summary: dict, run_dir: Path) -> str:
    if summary["best_val_acc"] is None:
        result = (f"no validation split (--val-size 0): the final weights are {run_dir / 'last.ckpt'}")
    else:
        result = f"best val accuracy {summary['best_val_acc']:.4f}"
    return (f"{result} | {summary['train_seconds']:.1f}s training, {summary['eval_seconds']:.1f}s "
            f"validation, {summary['other_seconds']:.1f}s other | {summary['train_images_per_s']:,.0f} "
            f"train images/s | run folder {run_dir}")


def _check_writable(run_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, must be a writable folder."""
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise CifarkitError(f"cannot create run folder {run_dir}: {probe} is not a folder",
                            "pass a writable --out folder")
    if not os.access(probe, os.W_OK):
        raise CifarkitError(f"cannot create run folder {run_dir}: {probe} is not writable",
                            "pass a writable --out folder")


class _DeferredInterrupt:
    """Turns Ctrl-C into a request honoured at the next step boundary, so the state saved on
    interrupt is always a consistent one (weights, optimiser, position and sums of the same
    step). A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = self.forced = False
        self._old = None

    def __enter__(self):
        import signal
        import threading
        # Only where Ctrl-C would raise KeyboardInterrupt anyway (not where it is ignored or
        # handled by the embedding program).
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self, dist: Dist, step: int) -> bool:
        if not dist.enabled:
            return self.requested
        # every rank must stop at the same step: agree every 10 steps (a collective is not free)
        return step % 10 == 0 and dist.all_min(0.0 if self.requested else 1.0) < 1

    def __exit__(self, *exc):
        if self._old is not None:
            import signal
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class _NonFinite(Exception):
    def __init__(self, step: int, value: float):
        self.step, self.value = step, value


def _ema_state(ema) -> dict:
    return {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}


def _score(model: nn.Module, loss_fn, xb, yb, device, precision):
    """Logits and mean loss of the whole batch, without a graph (for selective backprop).

    A forward pass without saved activations costs about a third of a training step; the
    batch-norm layers see the whole batch here (train mode), so their running statistics follow
    all images, not only the hard ones.
    """
    with torch.no_grad(), autocast(device, precision):
        out = model(xb)
        return out, loss_fn(out, yb)


class _Proxy:
    """A small copy of the network (narrower widths, same recipe and optimiser) that picks the
    images for selective backprop, as airbench96's fastest variant does: one training step of it
    on the whole batch costs a fraction of the network's own no-grad scoring pass, and its loss
    per image (before its update) ranks the batch."""

    def __init__(self, cfg: TrainConfig, p: "Prepared", total_steps: int, steps_per_epoch: int):
        self.model = create_model(cfg.model, len(p.classes), **cfg.proxy_model_args())
        _init_whitening(self.model, cfg, p.train.x, p.mean, p.std)
        self.model = _place(self.model, cfg, p.device)
        self.opt = make_optimizer(cfg, self.model)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambdas(cfg, self.opt, total_steps,
                                                                            steps_per_epoch))

    def step(self, xb, yb, loss_fn, device, precision) -> torch.Tensor:
        with autocast(device, precision):
            out = self.model(xb)
            loss = loss_fn(out, yb)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return out.detach()

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])


def _hardest(xb, yb, logits, fraction: float, per_class: bool = False):
    """The ``fraction`` of the batch with the highest cross-entropy (at least one image).

    Ranking the whole batch lets the scorer's view of the classes decide too: a proxy that finds
    a few classes hard picks mostly their images. For a proxy too small to learn (16/32/32 under
    the fast recipe) that is all it picks, and the network forgets the other classes (82 % on
    the GPU against 91 %, docs/benchmarks.md). ``per_class`` ranks images within their own class
    and takes about ``fraction`` of each, so the trained images keep the batch's class mix; a
    bias for or against a class shifts all its losses alike and no longer changes the ranking.
    It helps early (3 epochs at 16 px with a 16/64/64 proxy: 53.7 % val accuracy against 37.9 %)
    but costs the full fast recipe about half a point (seeds 0 and 1: 90.28/90.38 % against
    90.76/91.02 %), which gains from training most on the classes it finds hard.
    """
    per_image = F.cross_entropy(logits.float(), yb, reduction="none")
    k = max(1, round(len(yb) * fraction))
    if per_class:
        # Sort by loss (hardest first), then stably by class: each class's images in a run,
        # hardest first. An image's rank within its class as a share of the class's count
        # (0 = hardest) makes the classes comparable; the k smallest shares take about
        # `fraction` of every class and exactly k images in all.
        order = per_image.argsort(descending=True)
        order = order[yb[order].argsort(stable=True)]
        ys = yb[order]
        counts = torch.bincount(ys)
        first = counts.cumsum(0) - counts
        share = (torch.arange(len(ys), device=ys.device) - first[ys]).float() / counts[ys]
        keep = order[share.topk(k, largest=False).indices].sort().values
    else:
        keep = per_image.topk(k).indices.sort().values
    x = xb[keep]
    if xb.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, yb[keep]


def _accumulate(loss_acc: torch.Tensor, correct_acc: torch.Tensor, loss, out, yb) -> None:
    """Add a batch's summed loss and correct count in place; detached, so no graph is kept."""
    loss_acc += loss.detach().float() * len(yb)
    correct_acc += (out.detach().argmax(1) == yb).sum()


def _sums(loss_acc, correct_acc, seen: int, seconds: float, images: int) -> dict:
    return {"loss": loss_acc.item(), "correct": int(correct_acc.item()), "seen": seen, "seconds": seconds,
            "images": images}


def _end_epoch(epoch, cfg, p: Prepared, ema, sums, opt, history):
    """Append the epoch's metrics to history; returns (metrics, the val EvalResult or None)."""
    last = epoch + 1 == cfg.epochs
    metrics = {"epoch": epoch + 1,
               "train_loss": sums["loss"] / max(sums["seen"], 1),
               "train_acc": sums["correct"] / max(sums["seen"], 1),
               "val_loss": None, "val_acc": None,
               "lr": opt.param_groups[0]["lr"],
               "seconds": sums["seconds"],
               "images_per_s": sums["images"] / max(sums["seconds"], 1e-9),
               "image_size": epoch_size(cfg, epoch)}
    r = None
    if len(p.val) and (last or (epoch + 1) % max(cfg.eval_every, 1) == 0):
        net = ema.module if ema is not None else p.model
        # Test-time augmentation multiplies the cost of a validation pass (4 views for
        # flip_translate): during training one view shows the progress, the last epoch gets all.
        tta = cfg.tta if last else "none"
        t0 = time.perf_counter()
        r = evaluate(net, p.val, p.classes, p.mean, p.std, p.device, p.precision, tta=tta)
        metrics["val_loss"], metrics["val_acc"] = r.loss, r.accuracy
        metrics["val_tta"], metrics["val_seconds"] = tta, time.perf_counter() - t0
    history.append(metrics)
    return metrics, r


def epoch_size(cfg: TrainConfig, epoch: int) -> int:
    """Side in pixels of the training images in ``epoch`` (progressive resizing, else image_size)."""
    return cfg.progressive[epoch] if epoch < len(cfg.progressive) else cfg.image_size


def _epoch_line(m: dict, epochs: int, image_size: int = 0) -> str:
    val = (f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}" if m["val_acc"] is not None
           else "val -")
    size = f" | {m['image_size']} px" if m.get("image_size") and m["image_size"] != image_size else ""
    return (f"epoch {m['epoch']:>3}/{epochs}{size} | train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}"
            f" | {val} | lr {m['lr']:.4g} | {m['seconds']:.1f}s {m['images_per_s']:,.0f} img/s")


def _write_metrics(run_dir: Path, history: list) -> None:
    # Rewritten whole from the history each epoch (atomically), so a kill never leaves half a line
    # and a resume never duplicates one.
    text = "".join(json.dumps(h) + "\n" for h in history)
    ckpt_mod.atomic_write_bytes(run_dir / "metrics.jsonl", text.encode())


def _tensorboard(run_dir: Path, cfg: TrainConfig, start_epoch: int):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed: no TensorBoard events written")
        return None
    return SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1 if start_epoch else None)


def _close(writer) -> None:
    if writer is not None:
        writer.close()


def _summary(cfg, p: Prepared, history, wall, run_dir, precision) -> dict:
    vals = [h["val_acc"] for h in history if h["val_acc"] is not None]
    seconds = sum(h["seconds"] for h in history)
    eval_seconds = sum(h.get("val_seconds", 0.0) for h in history)
    seen = sum(h["images_per_s"] * h["seconds"] for h in history)
    return {
        "recipe": cfg.recipe, "model": cfg.model,
        "best_val_acc": max(vals) if vals else None,
        "final_val_acc": vals[-1] if vals else None,
        "epochs": len(history),
        "train_seconds": seconds,
        "eval_seconds": eval_seconds,
        "wall_seconds": wall,
        # data loading, kernel build, checkpoints, plots: what the user waits for beyond the work
        "other_seconds": max(0.0, wall - seconds - eval_seconds),
        "train_images_per_s": seen / max(seconds, 1e-9),
        "device": str(p.device) if p.device.type != "cuda" else torch.cuda.get_device_name(p.device),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "torch_version": str(torch.__version__),
        "n_train": len(p.train), "n_val": len(p.val),
        "run_dir": str(run_dir),
    }
