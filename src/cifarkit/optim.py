"""Optimisers beyond torch.optim: orthogonalised momentum ("Muon") for convolution filters.

Muon (Jordan et al., 2024) replaces each filter's momentum update by its nearest semi-orthogonal
matrix, computed with a few Newton-Schulz iterations; it reaches a given CIFAR-10 accuracy in
fewer epochs than SGD. Parameters that are not filters (biases, norm shifts, the linear head) are
updated by plain SGD with Nesterov momentum, each group at its own learning rate. One optimiser
object holds both kinds so that a checkpoint has one state and the schedule one set of groups.
"""
from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients from the Muon write-up: they push small singular values up
# fast, converging roughly (not exactly) to 1, which is what the update needs.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of the 2-D matrix g = U S V^T (singular values pushed towards 1)."""
    a, b, c = _NS_COEFFS
    x = g.to(torch.bfloat16) if g.device.type in ("cuda", "cpu") else g.float()
    x = x / (x.norm() + eps)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Param groups with kind="muon" get orthogonalised Nesterov momentum and weight norm
    projection; groups with kind="sgd" get SGD with Nesterov momentum and weight decay."""

    def __init__(self, groups, lr: float = 0.02, momentum: float = 0.6, weight_decay: float = 0.0):
        for g in groups:
            g.setdefault("kind", "sgd")
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                if group["kind"] == "muon":
                    buf.mul_(mom).add_(g)
                    g = g.add(buf, alpha=mom)                     # Nesterov
                    # Keep each filter bank at a fixed norm: the update then sets its direction.
                    p.mul_(p.size(0) ** 0.5 / (p.norm() + 1e-12))
                    p.add_(orthogonalize(g.reshape(len(g), -1)).view_as(p), alpha=-lr)
                else:
                    if wd:
                        g = g.add(p, alpha=wd)
                    buf.mul_(mom).add_(g)
                    p.add_(g.add(buf, alpha=mom), alpha=-lr)
        return None
