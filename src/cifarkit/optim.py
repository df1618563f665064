"""Optimisers beyond torch.optim: orthogonalised momentum ("Muon") for convolution filters.

Also: building the optimiser and learning-rate schedule a run names (make_optimizer,
make_scheduler), and freezing groups whose schedule has ended.

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


def _ns_dtype(device: torch.device) -> torch.dtype:
    """The iterations' dtype: bf16 where its matrix products are fast (CUDA; CPUs with AVX-512
    BF16 or AMX), else fp32. A CPU without native bf16 emulates it: on an AMD Zen 3 these products
    in bf16 took 3.0 s of a 4.4 s fast-recipe step at 16 px (`benchmarks/step_variants.py
    --conv32`), and fp32 is the more exact of the two anyway."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and _cpu_bf16():
        return torch.bfloat16
    return torch.float32


def _cpu_bf16() -> bool:   # read /proc/cpuinfo once, not once per filter per step
    if "fast" not in _CPU_BF16:
        from .device import cpu_has_fast_bf16
        _CPU_BF16["fast"] = cpu_has_fast_bf16()
    return _CPU_BF16["fast"]


_CPU_BF16: dict = {}


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of the 2-D matrix g = U S V^T (singular values pushed towards 1)."""
    a, b, c = _NS_COEFFS
    x = g.to(_ns_dtype(g.device))
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


# ----------------------------------------------------------------------------- construction

# The Muon recipe's settings (optimizer_args): momenta, per-image learning rates of the SGD groups
# (multiplied by the batch size, see make_optimizer), decoupled decay per image and step, and how
# many epochs the whitening layer's bias trains before it is frozen.
MUON_DEFAULTS = {"muon_momentum": 0.6,     # momentum of the orthogonalised filter updates
                 "sgd_momentum": 0.85,     # Nesterov momentum of biases and the head
                 "bias_lr": 0.053,         # per image: x batch size
                 "head_lr": 0.67,          # per image: x batch size
                 "decay": 2e-6,            # per image and step: x batch size
                 "whiten_bias_epochs": 3,  # epochs; then its learning rate is 0 for good
                 "first_group_epochs": 0}  # epochs the network's first conv group trains (on the
                                           # run's schedule), then it is frozen; 0 = all epochs


def make_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser ``cfg`` names, over the trainable parameters of ``model``."""
    if cfg.optimizer == "muon":
        return _make_muon(cfg, model)
    # No weight decay on biases and norm weights (1-D tensors): decaying them only hurts.
    # With --head-lr, the head's parameters are groups of their own at that rate.
    head = set()
    if getattr(cfg, "head_lr", 0):
        from .models import head_parameters
        head = {id(p) for p in head_parameters(model)}
    groups = []
    for in_head in ((False, True) if head else (False,)):
        ps = [p for p in model.parameters() if p.requires_grad and (id(p) in head) == in_head]
        extra = {"lr": cfg.head_lr, "tag": "head"} if in_head else {}
        groups += [{"params": [p for p in ps if p.ndim > 1], "weight_decay": cfg.weight_decay, **extra},
                   {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0, **extra}]
    groups = [g for g in groups if g["params"]] if head else groups
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def muon_settings(cfg) -> dict:
    """MUON_DEFAULTS with the run's optimizer_args on top; unknown keys are refused."""
    from .errors import CifarkitError
    unknown = set(cfg.optimizer_args) - set(MUON_DEFAULTS)
    if unknown:
        raise CifarkitError(f"unknown optimizer_args for muon: {', '.join(sorted(unknown))}",
                            f"known: {', '.join(MUON_DEFAULTS)}", 2)
    return {**MUON_DEFAULTS, **cfg.optimizer_args}


def _make_muon(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Muon for conv filters; Nesterov SGD for the rest. Per-image rates are scaled by the batch
    size because the loss is a batch mean (the published values are for a summed loss)."""
    from .models import parameter_roles
    a = muon_settings(cfg)
    bs = cfg.batch_size
    roles = parameter_roles(model)      # e.g. {"whiten_bias": [...]}: the network says which
    if not a["first_group_epochs"]:     # the first group is then trained like the rest
        roles.pop("first_group", None)
    special = {id(p) for params in roles.values() for p in params}
    filters, biases, head = [], [], []
    for p in model.parameters():
        if not p.requires_grad or id(p) in special:
            continue
        (filters if p.ndim == 4 else head if p.ndim >= 2 else biases).append(p)
    shrink = a["decay"] * bs   # per step; SGD's coupled decay multiplies weight_decay by lr
    groups = [{"params": filters, "kind": "muon", "lr": cfg.lr, "momentum": a["muon_momentum"],
               "weight_decay": 0.0}]
    first = [p for p in roles.get("first_group", []) if p.requires_grad]
    if first:
        groups.append({"params": [p for p in first if p.ndim == 4], "kind": "muon", "lr": cfg.lr,
                       "momentum": a["muon_momentum"], "weight_decay": 0.0, "tag": "first_group"})
    whiten_bias = [p for p in roles.get("whiten_bias", []) if p.requires_grad]
    for params, lr, tag in ((whiten_bias, a["bias_lr"] * bs, "whiten_bias"),
                            ([p for p in first if p.ndim < 4], a["bias_lr"] * bs, "first_group"),
                            (biases, a["bias_lr"] * bs, "bias"), (head, a["head_lr"] * bs, "head")):
        if params:
            groups.append({"params": params, "kind": "sgd", "lr": lr, "momentum": a["sgd_momentum"],
                           "weight_decay": shrink / lr, "tag": tag})
    return Muon(groups)


# ----------------------------------------------------------------------------- schedule

def lr_factor(cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier on cfg.lr at a given step: linear warm-up, then the chosen schedule."""
    import math
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total_steps - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return max(0.0, 1 - progress)
    # onecycle: cosine up over the warm-up (or 30 % when none), cosine down to ~0.
    if warm == 0:
        up = max(1, int(0.3 * total_steps))
        if step < up:
            return 0.04 + 0.96 * 0.5 * (1 - math.cos(math.pi * step / up))
        progress = (step - up) / max(1, total_steps - up)
    return 0.5 * (1 + math.cos(math.pi * progress)) * (1 - 1e-4) + 1e-4


def whiten_bias_epochs(cfg) -> float | None:
    """How long the whitening layer's bias trains (Muon recipes); None where no schedule applies."""
    return muon_settings(cfg)["whiten_bias_epochs"] if cfg.optimizer == "muon" else None


def first_group_epochs(cfg) -> float | None:
    """How long the first conv group trains (Muon recipes that set it); None: all epochs."""
    return (muon_settings(cfg)["first_group_epochs"] or None) if cfg.optimizer == "muon" else None


def make_scheduler(cfg, opt, total_steps: int, steps_per_epoch: int):
    """Per-step LambdaLR: one multiplier per group; the whitening bias decays to 0 and stops.
    Where first_group_epochs is set, the first conv group follows the run's schedule and then
    stops: its rate drops to 0 (earlier layers settle first; FreezeOut, Brock et al., 2017, anneals
    each layer to 0 by its own time instead, which cost the fast recipe more accuracy here:
    docs/benchmarks.md)."""
    main = lambda s: lr_factor(cfg, s, total_steps, steps_per_epoch)
    lambdas = []
    for g in opt.param_groups:
        if g.get("tag") == "whiten_bias":
            stop = max(1, int(whiten_bias_epochs(cfg) * steps_per_epoch))
            lambdas.append(lambda s, stop=stop: max(0.0, 1 - s / stop))
            g["stop_step"] = stop    # from here on its learning rate is 0 for good (see freeze_stopped)
        elif g.get("tag") == "first_group":
            stop = max(1, int(first_group_epochs(cfg) * steps_per_epoch))
            lambdas.append(lambda s, stop=stop: main(s) if s < stop else 0.0)
            g["stop_step"] = stop
        else:
            lambdas.append(main)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambdas)


def freeze_stopped(opt, global_step: int) -> None:
    """Stop computing gradients for parameter groups whose learning rate has reached 0 for good.

    The whitening bias stops training after a few epochs; its gradient would still cost the
    backward pass of the first convolution with respect to its input (and a GELU backward at full
    resolution), about 6 % of a step on a CPU. With a learning rate of 0 the update is exactly
    zero, so freezing changes no weight: it only skips work. A frozen first conv group
    (first_group_epochs) skips more: its weight gradients, and every gradient below the second
    group's input, where the images are largest. Its batch norms then normalise with their running
    statistics (models.train_mode), as a frozen backbone's do.
    """
    for g in opt.param_groups:
        if g.get("stop_step") is not None and global_step >= g["stop_step"]:
            for p in g["params"]:
                p.requires_grad_(False)
