"""Augmentation on whole uint8 batches, as tensor operations (no Python loop over images).

All functions take a (N, C, H, W) tensor and a torch.Generator on the same device, so results are
reproducible from the seed and identical whether or not a run was resumed.
"""
from __future__ import annotations

import torch


def random_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = torch.rand(len(x), generator=gen, device=x.device) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def alternating_flip(x: torch.Tensor, start_bits: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mirror image i in epoch e iff ``start_bits[i] + e`` is odd (airbench's alternating flip).

    Each image is seen mirrored and unmirrored in consecutive epochs instead of by coin toss, so a
    short run covers both orientations of every image; ``start_bits`` (0/1 per image of the batch)
    keeps the first epoch random.
    """
    mask = (start_bits + epoch) % 2 == 1
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` (reflect) and cut a random HxW window: a shift of up to +-pad pixels.

    One gather for the whole batch: row/column index grids offset per image.
    """
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    # reflect needs a float tensor on CPU for some dtypes; uint8 reflect pad works on 4-D input
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect") if x.is_floating_point() \
        else torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # N,1,H,1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]   # N,1,1,W
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def cutout(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Zero one random size x size square per image (the square may hang over the border)."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n,), generator=gen, device=x.device)
    cx = torch.randint(0, w, (n,), generator=gen, device=x.device)
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = ((ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None]))
    in_x = ((xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None]))
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]                       # N,1,H,W
    return x.masked_fill(mask, 0)


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool, crop_pad: int, cutout_size: int,
            flip_bits: torch.Tensor | None = None, epoch: int = 0):
    """flip/translate/cutout in that order; with ``flip_bits`` the flips alternate per epoch."""
    if flip and flip_bits is not None:
        x = alternating_flip(x, flip_bits, epoch)
    elif flip:
        x = random_flip(x, gen)
    if crop_pad:
        x = random_translate(x, crop_pad, gen)
    if cutout_size:
        x = cutout(x, cutout_size, gen)
    return x
