"""The training loop: the notes' forward / loss / zero_grad / backward / step, made real.

``train()`` tells a run's story: prepare (device, data, network) -> resume? -> for each epoch:
``train_one_epoch``, validate, write -> summary. Everything else has one home: batches in
``loader.py``, selective backprop in ``selective.py``, the resumable state in ``state.py``, the
files in ``writer.py``, the optimiser and schedule in ``optim.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checkpoint as ckpt_mod, kernels
from ..config import TrainConfig
from ..device import autocast, precision_note
from ..distributed import Dist, setup as dist_setup
from ..errors import CifarkitError, TrainingInterrupted
from ..evaluate import evaluate
from ..models import count_parameters, train_mode, user
from ..optim import freeze_stopped, make_optimizer, make_scheduler
from ..progress import Progress
from .interrupt import DeferredInterrupt, NonFinite
from .loader import Loader, batch_mixer, epoch_size
from .prep import Prepared, class_weights, prepare
from .selective import Selector
from .state import EpochSums, TrainState
from .writer import RunWriter, epoch_line, final_line, summary as make_summary


def make_loss(cfg: TrainConfig, num_classes: int, class_weights: torch.Tensor | None = None):
    """ce: cross-entropy on logits; mse/l1 (the notes' other losses): on softmax vs one-hot.
    ``class_weights`` (--balance weights) weigh each image's loss by its class."""
    if cfg.loss == "ce":
        return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    base = nn.MSELoss() if cfg.loss == "mse" else nn.L1Loss()

    def loss_fn(logits, y):
        target = F.one_hot(y, num_classes).to(logits.dtype)
        if cfg.label_smoothing:
            target = target * (1 - cfg.label_smoothing) + cfg.label_smoothing / num_classes
        return base(logits.float().softmax(1), target.float())
    return loss_fn


# ----------------------------------------------------------------------------- the story of a run

def train(cfg: TrainConfig | None = None, resume: str | None = None, progress: bool = True,
          log=print, epochs: int | None = None, model: str | None = None) -> dict:
    """Train per ``cfg`` (or continue the run in ``resume``); returns the summary dict.

    On resume the run's own config is used; ``epochs`` may extend it, and ``model`` names the
    file of your own network again (``file.py:Name``; a checkpoint never decides what is imported).
    """
    started = time.perf_counter()   # the wall time a user waits for, data loading included
    saved = None
    if resume:
        cfg, saved = _resume_point(resume, epochs, model)
    if cfg is None:
        raise CifarkitError("train() needs a config or a run to resume")
    dist = dist_setup(cfg.device)
    try:
        return _run(cfg, saved, dist, progress, log, started)
    finally:
        dist.close()


def fit(model: nn.Module, data: str, recipe: str = "tutorial", progress: bool = True, log=print,
        **overrides) -> dict:
    """Train your own ``nn.Module`` instance with cifarkit's loop; returns the summary dict.

        net = Tudui()                                    # the notes' network, as written
        summary = cifarkit.fit(net, data="path/to/images", epochs=5)

    Settings come from ``recipe`` and ``overrides`` (TrainConfig's fields). The run folder holds
    checkpoints like any run; ``net`` ends with the final weights (the average under EMA). A class
    defined in a .py file is recorded as ``file.py:Name``, so `cifarkit eval RUN/best.ckpt --model
    file.py:Name` works; one defined in a notebook can be reloaded in Python only
    (``net.load_state_dict(cifarkit.load_checkpoint(path).state_dict)``).
    """
    from ..config import resolve
    if not isinstance(model, nn.Module):
        raise CifarkitError(f"fit() trains an nn.Module, got {type(model).__name__}",
                            "pass an instance, e.g. fit(Tudui(), data=...)", 2)
    overrides.pop("model", None)
    cfg = resolve(recipe, None, {"data": str(data), **overrides})   # checked with the recipe's network
    if cfg.hard_proxy:
        raise CifarkitError("hard_proxy trains a narrower copy of a registered network; fit() has your own",
                            "pass hard_proxy=[] (the network then scores its own batches)", 2)
    cfg.model, cfg.model_args = user.reference_of(model), {}
    started = time.perf_counter()
    dist = dist_setup(cfg.device)
    try:
        summary = _run(cfg, None, dist, progress, log, started, network=model)
    finally:
        dist.close()
    final = ckpt_mod.load_checkpoint(Path(cfg.out) / "last.ckpt", model=cfg.model)
    ckpt_mod.load_weights(model, final.state_dict, str(Path(cfg.out) / "last.ckpt"))
    return summary


@dataclass
class Run:
    """What one step needs besides the state: settings, data and device, the loss, the
    network's forward pass, and how to report and stop."""
    cfg: TrainConfig
    p: Prepared
    state: TrainState
    loss_fn: object
    forward: "Forward"
    mix: object               # MixUp/CutMix of a batch (loader.batch_mixer), or None
    dist: Dist
    progress: bool
    stop: DeferredInterrupt
    in_steps: bool = False     # inside an epoch's steps: a Ctrl-C there saves the exact position


def _run(cfg: TrainConfig, saved, dist: Dist, progress: bool, log, started: float,
         network: nn.Module | None = None) -> dict:
    if not dist.is_main:  # one voice: only rank 0 logs, shows progress and writes files
        log, progress = (lambda *a, **k: None), False
    if cfg.batch_size < dist.world:
        raise CifarkitError(f"--batch-size {cfg.batch_size} is smaller than the {dist.world} processes",
                            "--batch-size is the global batch: use at least one image per process", 2)
    if saved is not None:
        ts = saved.extra["train_state"]
        log(f"resuming {cfg.out} at epoch {ts['epoch'] + 1}, step {ts['step_in_epoch']}")
    run_dir = _run_dir(cfg, dist)
    p = prepare(cfg, progress, log, dist, network)
    _make_folder(run_dir)
    state, loss_fn = _new_state(cfg, p, dist)
    if saved is not None:
        state.load_state_dict(saved)
    best_acc = max([h["val_acc"] for h in state.history if h.get("val_acc") is not None] or [-1.0])
    state.model, step_model = _distribute(cfg, state.model, p.device, dist)
    writer = RunWriter(run_dir, cfg, enabled=dist.is_main)
    writer.start(state.epoch, resumed=state.epoch > 0 or state.step > 0, samples=state.loader.samples)
    log(f"model {cfg.model}: {count_parameters(state.model):,} parameters | device {p.device} | "
        f"precision {p.precision}{precision_note(cfg.precision, p.device, p.precision)} | {cfg.epochs} epochs x {state.loader.steps_per_epoch} steps of {cfg.batch_size}")

    run = Run(cfg, p, state, loss_fn, Forward(step_model, cfg.compile), batch_mixer(cfg, len(p.classes)),
              dist, progress, DeferredInterrupt())
    saved_epoch = epoch = state.epoch
    try:
        # the handler is restored on leaving the block, before the except clauses run
        with run.stop, (contextlib.nullcontext() if cfg.native_kernels else kernels.disabled()):
            for epoch in range(state.epoch, cfg.epochs):
                state.epoch = epoch
                sums = train_one_epoch(run, epoch)
                metrics, val_result = validate(run, epoch, sums)
                is_best = metrics.get("val_acc") is not None and metrics["val_acc"] > best_acc
                best_acc = max(best_acc, metrics.get("val_acc") or -1.0)
                state.epoch, state.step = epoch + 1, 0
                writer.metrics(state.history, metrics, val_result, p.classes)
                log(epoch_line(metrics, cfg.epochs, cfg.image_size))
                writer.checkpoints(lambda: state.checkpoint(cfg, p, metrics), is_best)
                saved_epoch = epoch + 1
                if run.stop.should_stop(dist, 0) and epoch + 1 < cfg.epochs:   # asked during eval/save
                    raise KeyboardInterrupt
                if epoch + 1 < cfg.epochs and _patience_spent(state.history, cfg.patience):
                    best = max((h for h in state.history if h["val_acc"] is not None), key=lambda h: h["val_acc"])
                    log(f"early stop after epoch {epoch + 1}: val accuracy has not improved for "
                        f"{cfg.patience} epochs (best {best['val_acc']:.4f} at epoch {best['epoch']}, "
                        f"saved as {run_dir / 'best.ckpt'})")
                    break
    except KeyboardInterrupt:
        _interrupted(run, writer, run_dir, epoch, saved_epoch)
    except NonFinite as exc:
        writer.close()
        raise CifarkitError(
            f"training stopped: the loss became {exc.value} at step {exc.step} (epoch {epoch + 1})",
            f"the learning rate ({cfg.lr:g}) is probably too high; try --lr {cfg.lr / 10:g}. "
            f"The last good checkpoint ({run_dir / 'last.ckpt'}) is untouched")

    result = make_summary(cfg, p, state.history, time.perf_counter() - started, run_dir, dist.world)
    writer.finish(result, state.history)
    log(final_line(result, run_dir))
    return result


# ----------------------------------------------------------------------------- one epoch

def train_one_epoch(run: Run, epoch: int) -> dict:
    """The notes' loop over one epoch's batches; returns the epoch's totals (loss, correct, ...)."""
    cfg, state, loader, dist = run.cfg, run.state, run.state.loader, run.dist
    loader.start_epoch(epoch)
    global_step = epoch * loader.steps_per_epoch + state.step
    if not dist.enabled:   # DDP fixes the set of parameters with gradients when it wraps the network
        freeze_stopped(state.opt, global_step)
    state.selector.start_epoch(global_step)
    train_mode(state.model)   # .train(), frozen batch norms excepted
    state.sums = EpochSums(run.p.device, state.saved_sums if state.step else None)
    state.saved_sums = None
    bar = Progress(loader.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", "step", run.progress)
    bar.update(state.step)
    run.in_steps = True
    try:
        for step in range(state.step, loader.steps_per_epoch):
            # --hard-stale picks the images before the loader touches their pixels
            xb, yb, n_global, index = loader.batch(step, state.selector.chooser(epoch))
            state.sums.images += len(range(dist.rank, n_global, dist.world))   # this process's share
            xb, yb, whole = state.selector.pick(xb, yb, epoch, index)   # selective backprop: the hardest share
            target = yb
            if run.mix is not None:   # soft targets; accuracy is then counted on the dominant label
                xb, target = run.mix(xb, yb)
                yb = target.argmax(1)
            with autocast(run.p.device, run.p.precision):
                out = run.forward(xb)
                loss = run.loss_fn(out, target)
            state.selector.record(out, yb)   # --hard-stale: these images' losses, for later ranking
            state.opt.zero_grad(set_to_none=True)
            _backward(run, loss, len(yb), n_global, state.selector.fraction(epoch))
            if cfg.clip_grad:   # on the true gradients: unscaled first (a no-op outside fp16)
                state.scaler.unscale_(state.opt)
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.clip_grad)
            state.scaler.step(state.opt)
            state.scaler.update()
            state.sched.step()
            if state.ema is not None:
                state.ema.update_parameters(state.model)
            if whole is not None:   # the epoch's train metrics cover every image the network scored
                out, loss, yb = whole
            state.sums.add(loss, out, yb)
            state.step = step + 1
            _check_finite(run, loss, epoch, step)
            _show(run, bar, step)
            if run.stop.should_stop(dist, step):   # Ctrl-C takes effect here, between steps
                raise KeyboardInterrupt
    finally:
        bar.close()
    run.in_steps = False
    if run.p.device.type == "cuda":
        torch.cuda.synchronize()
    if dist.enabled:
        state.sums.all_reduce(dist)
    loader.end_epoch()
    return state.sums.totals()


def _patience_spent(history: list, patience: int) -> bool:
    """True when ``patience`` epochs have passed since the best val accuracy (its first epoch)."""
    scored = [h for h in history if h.get("val_acc") is not None]
    if not patience or not scored:
        return False
    best = max(scored, key=lambda h: h["val_acc"])   # the first of equal bests
    return history[-1]["epoch"] - best["epoch"] >= patience


def _backward(run: Run, loss, n_local: int, n_global: int, fraction: float) -> None:
    """``fraction``: the share of the global batch this step trains (1 without selection)."""
    share = 1.0
    if run.dist.enabled:
        # DDP averages gradients over ranks; weighting by this rank's share of the global batch
        # makes that average the gradient of the global-batch mean loss.
        share = n_local * run.dist.world / n_global / fraction
    # fp16 needs loss scaling against gradient underflow; a no-op in bf16/fp32.
    run.state.scaler.scale(loss * share if share != 1.0 else loss).backward()


def _check_finite(run: Run, loss, epoch: int, step: int) -> None:
    """Stop on a NaN or infinite loss. On the CPU .item() costs nothing, so every step is
    checked; on a GPU (where it waits for the device) every 25th and the epoch's last."""
    last = step + 1 == run.state.loader.steps_per_epoch
    if run.p.device.type == "cpu" or step % 25 == 0 or last:
        value = loss.item()
        if run.dist.all_min(float(math.isfinite(value))) < 1:   # every rank stops together
            raise NonFinite(epoch * run.state.loader.steps_per_epoch + step + 1, value)


def _show(run: Run, bar: Progress, step: int) -> None:
    if run.progress and (step % 10 == 0 or step + 1 == run.state.loader.steps_per_epoch):
        sums = run.state.sums
        dt = time.perf_counter() - sums.t0
        bar.set_postfix(f"loss {sums.loss.item() / max(sums.seen, 1):.3f} "
                        f"acc {sums.correct.item() / max(sums.seen, 1):.3f} "
                        f"{sums.images / max(dt, 1e-9):,.0f} img/s")
    bar.update(1)


def validate(run: Run, epoch: int, sums: dict):
    """The epoch's metrics, with a val pass every ``eval_every`` epochs and after the last;
    appended to the history. Returns (metrics, the val EvalResult or None)."""
    cfg, p, state = run.cfg, run.p, run.state
    last = epoch + 1 == cfg.epochs
    metrics = {"epoch": epoch + 1,
               "train_loss": sums["loss"] / max(sums["seen"], 1),
               "train_acc": sums["correct"] / max(sums["seen"], 1),
               "val_loss": None, "val_acc": None,
               "lr": state.opt.param_groups[0]["lr"],
               "seconds": sums["seconds"],
               "images_per_s": sums["images"] / max(sums["seconds"], 1e-9),
               "image_size": epoch_size(cfg, epoch)}
    r = None
    if len(p.val) and (last or (epoch + 1) % max(cfg.eval_every, 1) == 0):
        net = state.ema.module if state.ema is not None else p.model
        # Test-time augmentation multiplies the cost of a validation pass (4 views for
        # flip_translate): during training one view shows the progress, the last epoch gets all.
        tta = cfg.tta if last else "none"
        # A check on part of the split (eval_subset) is kept apart from val_acc, so that a lucky
        # sample can never be the best checkpoint or the run's reported accuracy.
        check = not last and 0 < cfg.eval_subset < len(p.val)
        split = p.val.subset(torch.linspace(0, len(p.val) - 1, cfg.eval_subset).round().long()) if check else p.val
        t0 = time.perf_counter()
        r = evaluate(net, split, p.classes, p.mean, p.std, p.device, p.precision, tta=tta)
        if check:
            metrics["val_check_loss"], metrics["val_check_acc"], metrics["val_check_images"] = r.loss, r.accuracy, r.n
            r = None
        else:
            metrics["val_loss"], metrics["val_acc"] = r.loss, r.accuracy
        metrics["val_tta"], metrics["val_seconds"] = tta, time.perf_counter() - t0
    state.history.append(metrics)
    return metrics, r


# ----------------------------------------------------------------------------- set-up pieces

def _new_state(cfg: TrainConfig, p: Prepared, dist: Dist):
    """A fresh TrainState (optimiser, schedule, scaler, selector, EMA, loader) and the loss."""
    model = p.model
    loader = Loader(p.train, cfg, p.mean, p.std, p.device, dist)
    total_steps = cfg.epochs * loader.steps_per_epoch
    opt = make_optimizer(cfg, model)
    sched = make_scheduler(cfg, opt, total_steps, loader.steps_per_epoch)
    weights = class_weights(p.train.y, len(p.classes)).to(p.device) if cfg.balance == "weights" else None
    loss_fn = make_loss(cfg, len(p.classes), weights)
    scaler = torch.amp.GradScaler(p.device.type, enabled=p.precision == "fp16")
    selector = Selector(cfg, model, loss_fn, p, total_steps, loader.steps_per_epoch, dist)
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    return TrainState(model, opt, sched, scaler, ema, selector, loader), loss_fn


def _distribute(cfg: TrainConfig, model: nn.Module, device, dist: Dist):
    """(the network, what the step calls): DDP-wrapped (SyncBN on request) across processes."""
    if not dist.enabled:
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP
    if cfg.sync_bn:
        if device.type != "cuda":
            raise CifarkitError("--sync-bn needs CUDA devices", "drop --sync-bn on CPUs", 2)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


class Forward:
    """The network's forward pass, compiled when ``--compile`` asks.

    torch.compile builds lazily, so a compiler that cannot work here fails on the first call: the
    run then goes on eagerly, with one warning, whatever the reason.
    """

    def __init__(self, model: nn.Module, compile: bool):
        self.eager = self.fn = model
        self.first = compile
        if compile:
            try:
                self.fn = torch.compile(model)
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"torch.compile unavailable ({type(exc).__name__}); running eagerly")
                self.first = False

    def __call__(self, x):
        if not self.first:
            return self.fn(x)
        self.first = False
        try:
            return self.fn(x)
        except Exception as exc:  # noqa: BLE001
            first = str(exc).splitlines()[0][:120] if str(exc) else ""
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {first}); running eagerly")
            self.fn = self.eager
            return self.fn(x)


def _interrupted(run: Run, writer: RunWriter, run_dir: Path, epoch: int, saved_epoch: int):
    """Ctrl-C: save the exact position if it came between two steps, then say how to go on."""
    state, cfg = run.state, run.cfg
    last = run_dir / "last.ckpt"
    if run.in_steps and run.dist.is_main and not run.stop.forced:
        # weights after step `state.step`, this epoch's data order and partial sums: the resumed
        # run continues as if never stopped
        at = state.epoch * state.loader.steps_per_epoch + state.step
        writer.interrupted(state.checkpoint(cfg, run.p, {"interrupted_at_step": at}, mid_epoch=True))
        where = f"epoch {epoch + 1}, step {state.step}"
    else:  # between epochs, or forced: the last complete checkpoint stands
        where = f"epoch {epoch + 1}; the last complete checkpoint is from epoch {saved_epoch}"
    writer.close()
    if not last.exists():
        raise TrainingInterrupted(f"interrupted at {where}; no checkpoint was written yet",
                                  "start the run again")
    raise TrainingInterrupted(f"interrupted at {where}; saved {last}",
                              f"continue with: cifarkit train --resume {run_dir}")


def _resume_point(resume: str, epochs: int | None, model: str | None = None):
    """(the run's own config, its last.ckpt) for ``--resume``; ``epochs`` may extend the run."""
    rpath = Path(resume)
    rpath = rpath / "last.ckpt" if rpath.is_dir() else rpath
    old = ckpt_mod.load_checkpoint(rpath, model=model)
    old.config["model"] = old.model_name   # your own network: the file the user named again
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
    return cfg, old


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.recipe}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _run_dir(cfg: TrainConfig, dist: Dist) -> Path:
    """The run folder (the same on every rank), checked writable before any data is loaded; the
    data path is recorded absolute, so `cifarkit eval RUN/best.ckpt` finds it from any folder."""
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    if dist.enabled:  # the time-stamped default name must be the same on every rank
        names = [str(run_dir)]
        torch.distributed.broadcast_object_list(names, src=0)
        run_dir = Path(names[0])
    cfg.out = str(run_dir)
    if cfg.data != "cifar10" and Path(cfg.data).exists():
        cfg.data = str(Path(cfg.data).resolve())
    if user.is_file_ref(cfg.model):   # your own network: recorded with its absolute path
        cfg.model = user.absolute_ref(cfg.model)
    _check_writable(run_dir)   # fail before the data is loaded, but create nothing yet
    return run_dir


def _make_folder(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarkitError(f"cannot create run folder {run_dir}: {exc.strerror or exc}",
                            "pass a writable --out folder")


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
