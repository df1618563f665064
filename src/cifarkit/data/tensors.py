"""In-memory uint8 image tensors: splits, channel statistics, batches."""
from __future__ import annotations

import functools
import torch
import torch.nn.functional as F

from ..errors import CifarkitError


class TensorSplit:
    """Labelled uint8 images (N, 3, H, W) of one split.

    ``base`` holds the images: a tensor in memory, or (``mapped``) a memory-mapped decode cache.
    A subset of a mapped split keeps the map and a list of ``rows`` instead of copying images,
    so the training split of a set larger than memory costs one int64 per image; batches are read
    with ``images(idx)``. ``x`` gives all images of the split as one tensor (a copy for a subset
    of a mapped split: use it for small splits only).
    """

    def __init__(self, base: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None,
                 mapped: bool = False):
        self.base, self.y, self.rows, self.mapped = base, y, rows, mapped

    def __len__(self) -> int:
        return len(self.y)

    @property
    def x(self) -> torch.Tensor:
        return self.base if self.rows is None else self.base[self.rows]

    @property
    def shape(self) -> tuple:
        """Shape of the split's images as one tensor, without reading them."""
        return (len(self),) + tuple(self.base.shape[1:])

    def images(self, idx) -> torch.Tensor:
        """Images ``idx`` (an index tensor or a slice) of this split."""
        # rows exist only for a mapped split, which lives on the CPU (``to`` copies it elsewhere)
        return self.base[idx] if self.rows is None else self.base[self.rows[idx]]

    def subset(self, idx: torch.Tensor) -> "TensorSplit":
        if self.mapped:   # rows into the map, no copy of the images
            rows = idx if self.rows is None else self.rows[idx]
            return TensorSplit(self.base, self.y[idx], rows, mapped=True)
        return TensorSplit(self.x[idx], self.y[idx])

    def to(self, device) -> "TensorSplit":
        if self.mapped and torch.device(device).type == "cpu":
            return self   # stays on disk; batches are read from the map
        return TensorSplit(self.x.to(device), self.y.to(device))

    def resized(self, size: int) -> "TensorSplit":
        if self.base.shape[-1] == size and self.base.shape[-2] == size:
            return self
        x = F.interpolate(self.x.float(), size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        return TensorSplit(x.round().clamp(0, 255).to(torch.uint8), self.y)


def reader(x):
    """``get(idx)`` for images of a uint8 tensor or a TensorSplit (read lazily from its map)."""
    return x.images if isinstance(x, TensorSplit) else x.__getitem__


def stratified_split(y: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): ``val_size`` images held out, proportionally per class, fixed by seed."""
    n = len(y)
    if val_size == 0:
        return torch.arange(n), torch.arange(0)
    if val_size >= n:
        raise CifarkitError(f"--val-size {val_size} leaves no training images (the data has {n})",
                            "use a smaller --val-size, or add a val/ folder beside train/")
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(y, return_counts=True)
    # Largest-remainder apportionment so the per-class shares add up to exactly val_size.
    exact = counts.double() * val_size / n
    take = exact.floor().long()
    rest = val_size - int(take.sum())
    take[torch.argsort(exact - take, descending=True)[:rest]] += 1
    val_parts, train_parts = [], []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        val_parts.append(idx[:k])
        train_parts.append(idx[k:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def channel_stats(x, chunk_elements: int = 1 << 25) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (a tensor or a TensorSplit), on the [0, 1] scale.

    Counted as a histogram of the 256 pixel values per channel (torch.bincount: exact integers,
    so the result does not depend on how the set is chunked, and 4x faster than summing squares
    in int64), over chunks of about ``chunk_elements`` pixels (32 MB), so a memory-mapped set
    larger than memory is read once and never held whole."""
    get = reader(x)
    n, c = len(x), x.shape[1]
    per_image = c * x.shape[2] * x.shape[3]
    step = max(1, chunk_elements // max(per_image, 1))
    hist = torch.zeros(c, 256, dtype=torch.int64)
    for i in range(0, n, step):
        b = get(slice(i, i + step))
        for ch in range(c):
            hist[ch] += torch.bincount(b[:, ch].reshape(-1), minlength=256)
    count = n * x.shape[2] * x.shape[3]
    v = torch.arange(256, dtype=torch.float64) / 255.0
    mean = (hist.double() * v).sum(1) / count
    std = ((hist.double() * v * v).sum(1) / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


@functools.lru_cache(maxsize=32)
def _scaled_stats(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype):
    """255·mean and 255·std as (1,C,1,1) tensors, built once per device instead of every step."""
    m = torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1) * 255
    return m, s


def normalize(x: torch.Tensor, mean, std, dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N,3,H,W) -> normalised float, in one pass: (x/255 - mean)/std = (x - 255m) / (255s)."""
    m, s = _scaled_stats(tuple(map(float, mean)), tuple(map(float, std)), x.device, dtype)
    out = x.to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out.sub_(m).div_(s)
