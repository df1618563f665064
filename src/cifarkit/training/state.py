"""Everything a run is, between two steps: what last.ckpt holds and a resume puts back.

``TrainState`` gathers the pieces (network, optimiser, schedule, loss scaler, EMA, the selector's
proxy, the loader's generators, the global RNG, history, position and the running sums of the
epoch in progress). ``state_dict()`` / ``load_state_dict()`` are the two directions; ``checkpoint()``
wraps the state with the network's description into a ``Checkpoint``. A run saved mid-epoch on
Ctrl-C resumes at the same step with the same sums, so it ends bit-exact with one never stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .. import checkpoint as ckpt_mod


class EpochSums:
    """Running loss and correct count of the epoch in progress.

    They stay tensors on the device: no .item() sync per step, and .detach() means no autograd
    graph is kept alive (the notes' `running_loss += loss` pitfall).
    """

    def __init__(self, device, saved: dict | None = None):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.int64)
        self.seen = self.images = 0          # images trained on / through the step (more with a proxy)
        self.seconds_before = 0.0            # time spent on this epoch before a resume
        if saved:
            self.loss += saved["loss"].to(device)
            self.correct += saved["correct"].to(device)
            self.seen, self.seconds_before = saved["seen"], saved["seconds"]
            self.images = saved.get("images", self.seen)
        self.t0 = time.perf_counter()

    def add(self, loss, out, yb) -> None:
        self.loss += loss.detach().float() * len(yb)
        self.correct += (out.detach().argmax(1) == yb).sum()
        self.seen += len(yb)

    def seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.t0

    def all_reduce(self, dist) -> None:
        """Totals over all processes (DDP), at the end of an epoch."""
        totals = dist.all_sum(torch.stack([self.loss.double().cpu(), self.correct.double().cpu(),
                                           torch.tensor(float(self.seen), dtype=torch.float64),
                                           torch.tensor(float(self.images), dtype=torch.float64)]))
        self.loss, self.correct = totals[0].float(), totals[1].long()
        self.seen, self.images = int(totals[2]), int(totals[3])

    def totals(self) -> dict:
        return {"loss": self.loss.item(), "correct": int(self.correct.item()), "seen": self.seen,
                "seconds": self.seconds(), "images": self.images}

    def state_dict(self) -> dict:
        """The partial epoch, exactly, for a checkpoint written mid-epoch."""
        return {"loss": self.loss.detach().cpu(), "correct": self.correct.cpu(), "seen": self.seen,
                "images": self.images, "seconds": self.seconds()}


@dataclass
class TrainState:
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler
    ema: object | None
    selector: object
    loader: object
    history: list = field(default_factory=list)
    epoch: int = 0              # the epoch in progress (= epochs completed at an epoch's end)
    step: int = 0               # optimiser steps done in that epoch
    sums: EpochSums | None = None
    saved_sums: dict | None = None   # a resumed partial epoch's totals, until its EpochSums is made

    def averaged_weights(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.ema.module.state_dict().items()}

    def state_dict(self, mid_epoch: bool = False) -> dict:
        """The resume state (a checkpoint's ``extra``), written at an epoch's end or mid-epoch."""
        extra = {
            "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "proxy": self.selector.state_dict(),
            "hard_memory": self.selector.memory_state(),   # --hard-stale's loss table
            "history": list(self.history),
            "train_state": {"epoch": self.epoch, "step_in_epoch": self.step if mid_epoch else 0,
                            **self.loader.state_dict(), "torch_rng": torch.get_rng_state(),
                            "sums": self.sums.state_dict() if mid_epoch else {}},
        }
        if self.ema is not None:   # what we evaluate and ship is the average; keep the raw one too
            extra["model_raw"] = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return extra

    def load_state_dict(self, ckpt) -> None:
        """Put every piece back as ``ckpt`` (a last.ckpt) saved it."""
        extra = ckpt.extra
        ckpt_mod.load_weights(self.model, extra.get("model_raw") or ckpt.state_dict, "resume checkpoint")
        self.opt.load_state_dict(extra["optimizer"])
        self.sched.load_state_dict(extra["scheduler"])
        if self.scaler.is_enabled() and extra.get("grad_scaler"):
            self.scaler.load_state_dict(extra["grad_scaler"])
        if self.ema is not None and extra.get("ema") is not None:
            self.ema.load_state_dict(extra["ema"])
        if extra.get("proxy") is not None:
            self.selector.load_state_dict(extra["proxy"])
        self.selector.load_memory(extra.get("hard_memory"))
        ts = extra["train_state"]
        self.loader.load_state_dict(ts)
        torch.set_rng_state(ts["torch_rng"])
        self.epoch, self.step = ts["epoch"], ts["step_in_epoch"]
        self.saved_sums = ts["sums"] or None
        self.history = list(extra.get("history", []))

    def checkpoint(self, cfg, p, metrics: dict, mid_epoch: bool = False) -> ckpt_mod.Checkpoint:
        """The whole run as a Checkpoint: the network's description, weights (the average with
        EMA) and the resume state."""
        from ..models import user
        weights = self.averaged_weights() if self.ema is not None else self.model.state_dict()
        return ckpt_mod.Checkpoint(cfg.model, dict(cfg.model_args), len(p.classes), weights,
                                   list(p.classes), {"mean": p.mean, "std": p.std, "size": cfg.image_size,
                                    "crop_mode": cfg.crop_mode},
                                   cfg.to_dict(), metrics, self.epoch, self.state_dict(mid_epoch),
                                   model_source=user.source_of(cfg.model) if user.is_file_ref(cfg.model) else {})
