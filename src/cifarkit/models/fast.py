"""A small, fast CIFAR network in the spirit of the speed-run literature (airbench, hlb-cifar10).

Ideas used (re-implemented here, not copied): a frozen-ish 2x2 patch-whitening first layer,
conv-pool-BN-GELU groups, a scaled linear head. Widths are arguments so the recipe can trade
accuracy for CPU FLOPs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register_model


class ConvGroup(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, momentum: float = 0.6):
        # BatchNorm's default momentum 0.1 lags badly in a ~10-epoch run; 0.6 (PyTorch convention:
        # weight of the new batch) tracks the fast-moving weights.
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(c_out, momentum=momentum),
            nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out, momentum=momentum),
            nn.GELU(),
        )


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), whiten_width: int = 24,
                 scale: float = 1 / 9):
        super().__init__()
        self.whiten = nn.Conv2d(3, whiten_width, 2, padding=0, bias=True)
        self.layers = nn.Sequential(
            nn.GELU(),
            ConvGroup(whiten_width, widths[0]),
            ConvGroup(widths[0], widths[1]),
            ConvGroup(widths[1], widths[2]),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = scale
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.whiten:
                # Dirac (identity) init on the first in-channels keeps signal flowing early on.
                w = m.weight.data
                torch.nn.init.kaiming_normal_(w, nonlinearity="relu")
                torch.nn.init.dirac_(w[: w.size(1)])

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the 2x2 first layer to whiten the patches of ``x`` (normalised float images).

        Each output channel pair is +/- an eigenvector of the patch covariance scaled by
        1/sqrt(eigenvalue), so the layer's outputs start decorrelated with unit variance.
        """
        c, k = x.shape[1], self.whiten.kernel_size[0]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)            # N,C,H',W',k,k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov)
        eigval, eigvec = eigval.flip(0), eigvec.T.flip(0)              # largest first
        w = eigvec / torch.sqrt(eigval + eps)[:, None]
        half = self.whiten.out_channels // 2
        w = torch.cat([w[:half], -w[:half]]).view(-1, c, k, k)
        self.whiten.weight.copy_(w.to(self.whiten.weight.dtype))
        self.whiten.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.whiten(x))
        return self.head(x) * self.scale


@register_model
def fast(num_classes: int = 10, widths=(64, 256, 256), whiten_width: int = 24) -> nn.Module:
    """Speed-run network: 2x2 whitening conv + three conv-pool-BN-GELU groups (~1.9M params)."""
    return FastNet(num_classes, tuple(widths), whiten_width)
