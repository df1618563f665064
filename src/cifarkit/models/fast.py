"""A small, fast CIFAR network in the spirit of the speed-run literature (airbench, hlb-cifar10).

Ideas used (re-implemented here): a frozen 2x2 patch-whitening first layer whose bias trains only
early on, conv-pool-BN-GELU groups with identity-initialised convolutions, batch norms with a fixed
scale, a max-pooled scaled linear head. Widths are arguments so a recipe can trade accuracy for
CPU FLOPs.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import CifarkitError
from ..kernels import Conv3x3, MaxPool2x2, bn_gelu
from . import register_model


class FrozenScaleBN(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 (only the shift trains) and fast-moving statistics.

    The default running-stat momentum of 0.1 lags badly in a ~10-epoch run; 0.4 (PyTorch's
    convention: weight of the new batch) tracks the quickly changing weights.
    """

    def __init__(self, c: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(c, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Sequential):
    """conv -> 2x2 max-pool -> BN -> GELU, then ``depth - 1`` more conv -> BN -> GELU at the pooled size.

    With ``residual``, the output of the first block is added to that of the last (airbench96's
    group): the extra convolutions then learn a correction on top of a pass-through.
    """

    def __init__(self, c_in: int, c_out: int, depth: int = 2, residual: bool = False,
                 pool_first: bool = False):
        layers = [Conv3x3(c_in, c_out),   # nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
                  MaxPool2x2(),   # nn.MaxPool2d(2), with cifarkit's native CPU kernel when it is built
                  FrozenScaleBN(c_out), nn.GELU()]
        for _ in range(depth - 1):
            layers += [Conv3x3(c_out, c_out), FrozenScaleBN(c_out), nn.GELU()]
        super().__init__(*layers)   # module indices = state_dict keys: conv 0, pool 1, BN 2, GELU 3, ...
        self.residual = residual and depth > 1
        # pool -> conv instead of conv -> pool: the first convolution then runs on a quarter of
        # the pixels (same weights, same state_dict; a pool has no parameters)
        self.pool_first = pool_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # each BN -> GELU pair is one op in training on a CPU, bf16 or fp32 (kernels.bn_gelu, when the
        # native kernels are loaded): fewer passes over the activations, which bound their time
        x = self[0](self[1](x)) if self.pool_first else self[1](self[0](x))   # conv -> pool (or pool -> conv)
        x = skip = bn_gelu(self[2], self[3], x)                     # -> BN -> GELU
        for i in range(4, len(self), 3):                           # conv -> BN -> GELU
            x = bn_gelu(self[i + 1], self[i + 2], self[i](x))
        return x + skip if self.residual else x


class FastNet(nn.Module):
    def __init__(self, num_classes: int = 10, widths=(64, 256, 256), whiten_width: int = 24,
                 depths=(2, 2, 2), residual: bool = False, pool_first=(False, False, False)):
        super().__init__()
        self.whiten = nn.Conv2d(3, whiten_width, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)   # set from the data by init_whitening
        self.layers = nn.Sequential(
            nn.GELU(),
            ConvGroup(whiten_width, widths[0], depths[0], residual, pool_first[0]),
            ConvGroup(widths[0], widths[1], depths[1], residual, pool_first[1]),
            ConvGroup(widths[1], widths[2], depths[2], residual, pool_first[2]),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.head_scale = 1.0 / widths[2]   # logits = head(x) / width, with a unit-std head init
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and m is not self.whiten:
                    # Identity (Dirac) on the first in-channels: each block starts near a pass-through.
                    torch.nn.init.dirac_(m.weight[: m.weight.size(1)])
            self.head.weight.div_(self.head.weight.std())

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the 2x2 first layer to whiten the patches of ``x`` (normalised float images).

        Output channel pairs are +/- the eigenvectors of the patch covariance scaled by
        1/sqrt(eigenvalue), so the layer's outputs start decorrelated with unit variance.
        """
        c, k = x.shape[1], self.whiten.kernel_size[0]
        patches = x.float().unfold(2, k, 1).unfold(3, k, 1)            # N,C,H',W',k,k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov)
        w = eigvec.T / torch.sqrt(eigval + eps)[:, None]
        half = self.whiten.out_channels // 2
        w = torch.cat([w[-half:], -w[-half:]]).view(-1, c, k, k)      # the largest `half` directions
        self.whiten.weight.copy_(w.to(self.whiten.weight.dtype))
        self.whiten.bias.zero_()

    def init_from_data(self, x: torch.Tensor) -> None:   # models.init_from_data calls it
        self.init_whitening(x)

    def parameter_roles(self) -> dict:   # models.parameter_roles: for the optimiser's groups
        # first_group: frozen after optimizer_args' first_group_epochs, when that is set
        return {"whiten_bias": [self.whiten.bias], "first_group": list(self.layers[1].parameters())}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.whiten(x))) * self.head_scale


@register_model
def fast(num_classes: int = 10, widths=(64, 256, 256), whiten_width: int = 24, depths=(2, 2, 2),
         residual: bool = False, pool_first=(False, False, False)) -> nn.Module:
    """Speed-run network: 2x2 whitening conv + three conv-pool-BN-GELU groups (~1.9M params).

    ``depths``: convolutions per group (2 as in airbench94; airbench96 uses 3); ``residual``: add
    each group's first block output to its last (only matters where a group has depth >= 2);
    ``pool_first``: per group, max-pool before its first convolution instead of after it (that
    convolution then costs a quarter of the FLOPs).
    """
    if not (isinstance(widths, (list, tuple)) and len(widths) == 3
            and all(isinstance(w, int) and w > 0 for w in widths)):
        raise CifarkitError(f"model_args: fast's widths must be three positive whole numbers, got {widths!r}",
                            "e.g. widths: [64, 256, 256]", exit_code=2)
    # The whitening layer holds +/- the top eigenvectors of the 2x2 RGB patch covariance, which has
    # 3*2*2 = 12 dimensions: so at most 24 channels, in pairs.
    if not (isinstance(whiten_width, int) and 2 <= whiten_width <= 24 and whiten_width % 2 == 0):
        raise CifarkitError(f"model_args: fast's whiten_width must be an even number from 2 to 24, "
                            f"got {whiten_width!r}", "a 2x2 RGB patch has 12 directions, each used "
                            "with both signs; the default is 24", exit_code=2)
    if not (isinstance(depths, (list, tuple)) and len(depths) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 8 for d in depths)):
        raise CifarkitError(f"model_args: fast's depths must be three whole numbers from 1 to 8 "
                            f"(convolutions per group), got {depths!r}", "e.g. depths: [2, 2, 3]", exit_code=2)
    if not isinstance(residual, bool):
        raise CifarkitError(f"model_args: fast's residual must be true or false, got {residual!r}",
                            "e.g. residual: true", exit_code=2)
    if not (isinstance(pool_first, (list, tuple)) and len(pool_first) == 3
            and all(isinstance(b, bool) for b in pool_first)):
        raise CifarkitError(f"model_args: fast's pool_first must be three true/false values (one per "
                            f"group), got {pool_first!r}", "e.g. pool_first: [false, false, true]", exit_code=2)
    return FastNet(num_classes, tuple(widths), whiten_width, tuple(depths), residual, tuple(pool_first))
