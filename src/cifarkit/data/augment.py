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


def _reflect_index(size: int, pad: int, device) -> torch.Tensor:
    """Indices that reflect-pad one axis by ``pad`` (edge not repeated, like F.pad 'reflect')."""
    idx = list(range(pad, 0, -1)) + list(range(size)) + list(range(size - 2, size - 2 - pad, -1))
    return torch.tensor(idx, device=device)


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` (reflect) and cut a random HxW window: a shift of up to +-pad pixels."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    if pad >= min(h, w):
        raise ValueError(f"translate by {pad} px needs images larger than {pad} px, got {h}x{w}")
    # Reflect padding by indexing works on uint8 directly (F.pad's reflect mode needs floats).
    padded = x.index_select(2, _reflect_index(h, pad, x.device)).index_select(3, _reflect_index(w, pad, x.device))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=x.device)
    if x.device.type == "cpu":
        return _windows_by_slices(padded, dy, dx, h, w)
    return _windows_by_gather(padded, dy, dx, h, w)


def _windows_by_slices(padded, dy, dx, h: int, w: int) -> torch.Tensor:
    """Image i's HxW window at (dy[i], dx[i]): one slice copy per distinct shift.

    On a CPU this is several times faster than one gather with per-pixel int64 indices.
    """
    out = padded.new_empty(padded.shape[:2] + (h, w))
    for sy in range(padded.shape[2] - h + 1):
        for sx in range(padded.shape[3] - w + 1):
            sel = ((dy == sy) & (dx == sx)).nonzero().squeeze(1)
            if len(sel):
                out[sel] = padded[sel, :, sy:sy + h, sx:sx + w]
    return out


def _windows_by_gather(padded, dy, dx, h: int, w: int) -> torch.Tensor:
    """The same windows with one gather: no host sync per shift, so better on accelerators."""
    n, c = padded.shape[:2]
    dev = padded.device
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]   # N,1,H,1
    cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]   # N,1,1,W
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
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
