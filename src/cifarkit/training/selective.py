"""Selective backprop: train each step on the hardest share of the batch only.

``--hard-fraction F`` (from epoch ``--hard-start``) ranks the images of every batch by their loss
and takes the backward pass on the top F of them: the backward pass is about two thirds of a
step, so F = 0.5 saves about a third. Who ranks:

- the network itself (a forward pass without a graph: the forward on the other images is spent);
- with ``--hard-proxy``, a small copy of it trained alongside on every whole batch;
- with ``--hard-stale``, nobody: each image's loss from the last step that trained on it, kept in
  a table the size of the training set (Jiang et al. 2019 call it stale selective backprop). Only
  the trained share is ever forwarded, so a step costs F of a full one. An image's entry ages
  while others train (the network improves, the entry does not), so images left out rise in the
  ranking; images never trained rank first.

``--hard-fraction-small F2`` trains a different share, usually smaller, in the progressive epochs
whose images are smaller than ``--image-size``. On the sprint recipe a third there instead of a
half cost 0.04 points on seed 0 for 18 % of the run's time, while a third in the full-size epochs
cost 0.62 points for 19 % (docs/benchmarks.md section 7). Why the early epochs give up less is
not measured; a guess is that what is learnt at 16-28 px is coarse and shared by many images.

The loop sees one object: ``Selector.pick(xb, yb, epoch, index)`` returns the images to train on,
and the whole batch's outputs when the network scored them itself (the epoch's train metrics then
cover every image seen); ``Selector.record(out, yb)`` gives it the trained images' outputs.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..device import autocast
from ..models import create_model, init_from_data
from ..optim import freeze_stopped, make_optimizer, make_scheduler
from .loader import epoch_size, resize


def selecting(cfg, epoch: int) -> bool:
    """Whether ``epoch``'s batches are ranked and only a share of them trained."""
    return cfg.hard_fraction < 1 and epoch >= cfg.hard_start


def trained_share(cfg, epoch: int) -> float:
    """The share of each batch trained in ``epoch``: 1 when not selecting, --hard-fraction-small
    in the progressive epochs of smaller images where set, else --hard-fraction. (A function of
    the config alone, so that the benchmarks' FLOP count follows the same rule as training.)"""
    if not selecting(cfg, epoch):
        return 1.0
    small = cfg.hard_fraction_small and epoch_size(cfg, epoch) < cfg.image_size
    return cfg.hard_fraction_small if small else cfg.hard_fraction


class Selector:
    def __init__(self, cfg, model: nn.Module, loss_fn, prepared, total_steps: int, steps_per_epoch: int,
                 dist=None):
        self.cfg, self.model, self.loss_fn, self.dist = cfg, model, loss_fn, dist
        self.device, self.precision = prepared.device, prepared.precision
        self.proxy = Proxy(cfg, prepared, total_steps, steps_per_epoch) if cfg.hard_proxy else None
        # --hard-stale: every training image's loss when it was last trained (inf: not yet).
        self.memory = (torch.full((len(prepared.train),), float("inf"), device=prepared.device)
                       if cfg.hard_stale else None)
        self._trained = None   # indices of the images pick() last returned (--hard-stale)

    def selecting(self, epoch: int) -> bool:
        return selecting(self.cfg, epoch)

    def fraction(self, epoch: int) -> float:
        return trained_share(self.cfg, epoch)

    def start_epoch(self, global_step: int) -> None:
        if self.proxy is not None:
            freeze_stopped(self.proxy.opt, global_step)
            self.proxy.model.train()

    def pick(self, xb, yb, epoch: int, index: torch.Tensor | None = None):
        """(images to train on, their labels, None or the whole batch's (outputs, loss, labels)).
        ``index``: the images' positions in the training set (needed by --hard-stale)."""
        if self.memory is not None:
            return self._pick_stale(xb, yb, epoch, index)
        scores = None
        if self.proxy is not None:   # trained on every whole batch, selecting or not
            scores = self.proxy.step(shrink(xb, self.cfg.hard_proxy_size), yb, self.loss_fn,
                                     self.device, self.precision)
        if not self.selecting(epoch):
            return xb, yb, None
        whole = None
        if scores is None:
            out_all, loss_all = score(self.model, self.loss_fn, xb, yb, self.device, self.precision)
            scores, whole = out_all, (out_all, loss_all, yb)
        xb, yb = hardest(xb, yb, scores, self.fraction(epoch), self.cfg.hard_per_class)
        return xb, yb, whole

    def chooser(self, epoch: int):
        """For ``Loader.batch(step, choose=...)``: under --hard-stale (while selecting) a function
        from a global batch's positions to those of the images to train on; None otherwise."""
        if self.memory is None or not self.selecting(epoch):
            return None
        return functools.partial(self.choose_stale, fraction=self.fraction(epoch))

    def choose_stale(self, index: torch.Tensor, fraction: float) -> torch.Tensor:
        """The ``fraction`` of ``index`` (positions in the training set) with the highest table
        entries, in batch order. Every process holds the same table, so each picks the same
        images from the global batch before taking its slice."""
        k = max(1, round(len(index) * fraction))
        # topk among equal entries (the untrained ones, all inf) takes them in batch order, which
        # the epoch's random permutation already shuffled.
        keep = self.memory[index].topk(k).indices.sort().values
        return index[keep]

    def _pick_stale(self, xb, yb, epoch: int, index: torch.Tensor):
        """The loader already took the images chooser() picked: these are the ones to train on."""
        if index is None:
            raise ValueError("--hard-stale needs the images' positions in the training set")
        self._trained = index
        return xb, yb, None

    def record(self, out: torch.Tensor, yb: torch.Tensor) -> None:
        """The trained images' outputs of this step (before its update): their new table entries
        under --hard-stale (plain cross-entropy, as hardest() ranks); a no-op otherwise."""
        if self.memory is None or self._trained is None:
            return
        with torch.no_grad():
            loss = F.cross_entropy(out.detach().float(), yb, reduction="none")
            if self.dist is not None and self.dist.enabled:
                # Each process trains its own slice of the batch: share the entries, so every
                # process ranks the next batches with the same table.
                new = torch.zeros_like(self.memory)
                mask = torch.zeros_like(self.memory)
                new[self._trained], mask[self._trained] = loss, 1.0
                self.dist.all_sum(new), self.dist.all_sum(mask)
                self.memory = torch.where(mask > 0, new, self.memory)
            else:
                self.memory[self._trained] = loss
        self._trained = None

    def state_dict(self):
        return self.proxy.state_dict() if self.proxy is not None else None

    def memory_state(self):
        """The --hard-stale table for a checkpoint (None without it)."""
        return self.memory.cpu().clone() if self.memory is not None else None

    def load_memory(self, table) -> None:
        if self.memory is not None and table is not None and len(table) == len(self.memory):
            self.memory = table.to(self.memory.device)

    def load_state_dict(self, state) -> None:
        if self.proxy is not None:
            self.proxy.load_state_dict(state)


def shrink(xb: torch.Tensor, size: int) -> torch.Tensor:
    """The batch resized to at most ``size`` pixels a side (0: as it is), as progressive resizing
    does. A proxy step at 16 px costs about a third of one at 32 px on a CPU (its narrow layers are
    bound by memory traffic), but the ranking loses: on the fast recipe at 13 epochs a 16 px proxy
    cost 2.1 points of val accuracy on seed 0 (docs/benchmarks.md), so no recipe uses it."""
    return xb if not size or xb.shape[-1] <= size else resize(xb, size)


def score(model: nn.Module, loss_fn, xb, yb, device, precision):
    """Logits and mean loss of the whole batch, without a graph.

    A forward pass without saved activations costs about a third of a training step; the
    batch-norm layers see the whole batch here (train mode), so their running statistics follow
    all images, not only the hard ones.
    """
    with torch.no_grad(), autocast(device, precision):
        out = model(xb)
        return out, loss_fn(out, yb)


class Proxy:
    """A small copy of the network (narrower widths, same recipe and optimiser) that picks the
    images, as airbench96's fastest variant does: one training step of it on the whole batch
    costs a fraction of the network's own no-grad scoring pass, and its loss per image (before
    its update) ranks the batch."""

    def __init__(self, cfg, p, total_steps: int, steps_per_epoch: int):
        from .prep import place, whitening_sample
        self.model = create_model(cfg.model, len(p.classes), **cfg.proxy_model_args())
        init_from_data(self.model, lambda: whitening_sample(cfg, p.train, p.mean, p.std))
        self.model = place(self.model, cfg, p.device)
        # The proxy's first group trains to the end even where the network's is frozen
        # (first_group_epochs): a worse ranking costs more accuracy than the proxy's step costs time.
        if cfg.optimizer_args.get("first_group_epochs"):
            cfg = dataclasses.replace(cfg, optimizer_args={**cfg.optimizer_args, "first_group_epochs": 0})
        self.opt = make_optimizer(cfg, self.model)
        self.sched = make_scheduler(cfg, self.opt, total_steps, steps_per_epoch)

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


def hardest(xb, yb, logits, fraction: float, per_class: bool = False):
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
    return _take(xb, keep), yb[keep]


def _take(xb: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The images ``keep`` of ``xb``, in its memory layout (indexing returns contiguous NCHW)."""
    x = xb[keep]
    if xb.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x
