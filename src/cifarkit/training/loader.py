"""The training batches: which images, in which order, augmented how, at which size.

One ``Loader`` owns everything that decides what the network sees: the per-epoch permutation
(its own generator), the augmentation generator, the alternating-flip bits, progressive resizing
and, under DDP, this process's slice of each global batch. Its ``state_dict()`` is what a resumed
run needs to see the same batches again, bit for bit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.augment import augment
from ..data.tensors import TensorSplit, normalize
from ..distributed import Dist, local_slice


def epoch_size(cfg, epoch: int) -> int:
    """Side in pixels of the training images in ``epoch`` (progressive resizing, else image_size)."""
    return cfg.progressive[epoch] if epoch < len(cfg.progressive) else cfg.image_size


def resize(xb: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised float images ``xb`` at ``size`` x ``size`` pixels (antialiased bilinear; as they
    are when already that size): progressive resizing's, and --hard-proxy-size's, resize."""
    if size == xb.shape[-1]:
        return xb
    return F.interpolate(xb, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


class Loader:
    """Batches of ``split`` (uint8 on the training device) for one run of ``cfg``."""

    def __init__(self, split: TensorSplit, cfg, mean, std, device: torch.device, dist: Dist):
        self.split, self.cfg, self.mean, self.std, self.device, self.dist = split, cfg, mean, std, device, dist
        self.batch_size = cfg.batch_size
        self.steps_per_epoch = math.ceil(len(split) / cfg.batch_size)
        # Two generators: one orders the data (its state at an epoch's start is what a resume
        # needs), one augments (its state moves every step).
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        self.aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        # Alternating flip: each image's start orientation, fixed by the seed (so resume needs no state).
        self.flip_bits = (torch.randint(0, 2, (len(split),), generator=torch.Generator().manual_seed(cfg.seed + 3))
                          .to(device) if cfg.flip and cfg.alt_flip else None)
        self.channels_last = cfg.channels_last and device.type != "mps"
        self.epoch, self.perm = 0, None
        self._order_state = self.order_gen.get_state()   # where this epoch's permutation came from

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order_state = self.order_gen.get_state()
        n = len(self.split)
        if self.cfg.balance == "sampler":   # every class equally likely per draw, with replacement
            counts = torch.bincount(self.split.y.cpu()).double()
            per_image = (1.0 / counts)[self.split.y.cpu()]
            self.perm = torch.multinomial(per_image, n, replacement=True, generator=self.order_gen).to(self.device)
        else:
            self.perm = torch.randperm(n, generator=self.order_gen).to(self.device)

    def end_epoch(self) -> None:
        """From here a saved state starts the next epoch (a resume draws its permutation anew)."""
        self._order_state = self.order_gen.get_state()

    @property
    def image_size(self) -> int:
        return epoch_size(self.cfg, self.epoch)

    def batch(self, step: int, choose=None):
        """Normalised float images and labels of this process for ``step`` of the epoch, the
        size of the global batch they are a slice of, and the images' positions in the split.

        ``choose(idx)``, when given, picks from the global batch's positions the images to train
        on before any pixel is read (--hard-stale ranks by a table, not by the images): only
        those are gathered, augmented, normalised and resized. That is half the loader's work at
        --hard-fraction 0.5 (about 30-45 ms of a 2,000-image step on a Zen 4, 2026-12-07)."""
        cfg = self.cfg
        idx = self.perm[step * self.batch_size:(step + 1) * self.batch_size]
        n_global = len(idx)
        if choose is not None:
            idx = choose(idx)
        xb, yb = self.split.images(idx), self.split.y[idx]
        xb = augment(xb, self.aug_gen, cfg.flip, cfg.crop_pad, cfg.cutout,
                     self.flip_bits[idx] if self.flip_bits is not None else None, self.epoch)
        xb, yb, idx = local_slice(xb, self.dist), local_slice(yb, self.dist), local_slice(idx, self.dist)
        xb = normalize(xb, self.mean, self.std, channels_last=self.channels_last)
        # Progressive resizing: early epochs see smaller images, which cost about (size/32)^2
        # of a full-size step; networks that end in a global pool take any size, and the last
        # full-size epochs adapt them back.
        return resize(xb, self.image_size), yb, n_global, idx

    def samples(self, n: int = 32) -> torch.Tensor:
        """A few training images after augmentation, for TensorBoard (own generator: the training
        stream is unchanged)."""
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 2)
        return augment(self.split.images(slice(0, n)), g, self.cfg.flip, self.cfg.crop_pad, self.cfg.cutout)

    def state_dict(self) -> dict:
        return {"data_gen_epoch_start": self._order_state, "aug_gen": self.aug_gen.get_state().cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.order_gen.set_state(state["data_gen_epoch_start"])
        self._order_state = self.order_gen.get_state()
        self.aug_gen.set_state(state["aug_gen"])


def batch_mixer(cfg, num_classes: int):
    """MixUp and/or CutMix on whole batches (torchvision's v2 transforms): ``mix(x, y)`` returns
    the mixed images and soft targets (rows summing to 1); None when both are off. They draw from
    the global RNG, which a checkpoint saves, so a resume mixes the same way."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from torchvision.transforms import v2
    chosen = ([v2.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup else []) + \
             ([v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix else [])
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)

