"""See inside: output-size arithmetic, per-layer summaries and the notes' worked examples.

The shape formula is written out by hand here (not taken from PyTorch) because the point is to
show it: ``H_out = floor((H + 2·p − d·(k−1) − 1) / s + 1)`` (ceil for pooling with ceil_mode).
A property test checks it against the shapes PyTorch really produces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CifarkitError


# ----------------------------------------------------------------------------- the formula

def out_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
             ceil_mode: bool = False) -> int:
    num = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (math.ceil(num / stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        # PyTorch's rule: the last window must start inside the input or the left padding,
        # never entirely in the right padding.
        out -= 1
    return out


def formula_text(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
                 ceil_mode: bool = False) -> str:
    """'(32 + 2·2 − 1·(5−1) − 1) / 1 + 1 = 32', with the rounding spelled out when inexact."""
    num = size + 2 * padding - dilation * (kernel - 1) - 1
    exact = num / stride + 1
    out = out_size(size, kernel, stride, padding, dilation, ceil_mode)
    text = f"({size} + 2·{padding} − {dilation}·({kernel}−1) − 1) / {stride} + 1"
    if float(exact).is_integer() and out == int(exact):
        return f"{text} = {out}"
    rounding = "ceil" if ceil_mode else "floor"
    note = " (last window would start in the padding: dropped)" if ceil_mode and out != math.ceil(num / stride) + 1 else ""
    return f"{text} = {exact:.4g} → {rounding} {out}{note}"


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def layer_geometry(layer: nn.Module):
    """(kernel, stride, padding, dilation, ceil_mode) pairs for conv/pool layers, else None."""
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str):
            return None  # 'same'/'valid' padding: no single number to show
        return (_pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding),
                _pair(layer.dilation), False)
    if isinstance(layer, nn.MaxPool2d):
        stride = layer.stride if layer.stride is not None else layer.kernel_size
        return (_pair(layer.kernel_size), _pair(stride), _pair(layer.padding), _pair(layer.dilation),
                layer.ceil_mode)
    if isinstance(layer, nn.AvgPool2d):
        stride = layer.stride if layer.stride is not None else layer.kernel_size
        return (_pair(layer.kernel_size), _pair(stride), _pair(layer.padding), (1, 1), layer.ceil_mode)
    return None


# ----------------------------------------------------------------------------- summary

@dataclass
class Row:
    name: str
    kind: str
    out_shape: tuple
    params: int
    macs: int
    formula: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "type": self.kind, "output": list(self.out_shape),
                "parameters": self.params, "mult_adds": self.macs, "formula": self.formula}


def _macs(layer: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-adds per image for the layers that do them (hand-counted: simple and exact)."""
    if isinstance(layer, nn.Conv2d):
        k = layer.kernel_size[0] * layer.kernel_size[1] * (layer.in_channels // layer.groups)
        return out[0].numel() * k
    if isinstance(layer, nn.Linear):
        return out[0].numel() * layer.in_features
    if isinstance(layer, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return out[0].numel()
    return 0


def summarize(model: nn.Module, input_shape=(3, 32, 32)) -> list[Row]:
    """One row per leaf layer, in execution order; raises CifarkitError naming a layer whose
    input is too small for it."""
    rows: list[Row] = []
    hooks = []
    names = {m: n for n, m in model.named_modules()}

    def pre(layer, args):
        geo = layer_geometry(layer)
        if geo is None or not args or args[0].dim() < 3:
            return
        h, w = args[0].shape[-2:]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil = geo
        oh = out_size(h, kh, sh, ph, dh, ceil)
        ow = out_size(w, kw, sw, pw, dw, ceil)
        if oh < 1 or ow < 1:
            raise CifarkitError(
                f"layer {names[layer]} ({type(layer).__name__}, kernel {kh}x{kw}) gets a {h}x{w} input "
                f"and would output {oh}x{ow}: {formula_text(h if oh < 1 else w, kh if oh < 1 else kw, sh, ph, dh, ceil)}",
                "use a larger --input size or a smaller kernel/stride", exit_code=2)

    def post(layer, args, out):
        if not torch.is_tensor(out):
            return
        inp = args[0] if args and torch.is_tensor(args[0]) else None
        geo = layer_geometry(layer)
        formula = ""
        if geo is not None and inp is not None:
            h, w = inp.shape[-2:]
            (kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil = geo
            formula = formula_text(h, kh, sh, ph, dh, ceil)
            if (h, kh, sh, ph, dh) != (w, kw, sw, pw, dw):
                formula = f"H: {formula}; W: {formula_text(w, kw, sw, pw, dw, ceil)}"
        params = sum(p.numel() for p in layer.parameters(recurse=False))
        rows.append(Row(names[layer], type(layer).__name__, tuple(out.shape[1:]), params,
                        _macs(layer, inp, out) if inp is not None else 0, formula))

    for m in model.modules():
        if next(iter(m.children()), None) is None:   # leaves only
            hooks.append(m.register_forward_pre_hook(pre))
            hooks.append(m.register_forward_hook(post))
    # Non-leaf modules may own parameters directly (e.g. a scale); count them in the total only.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except CifarkitError:
        raise
    except RuntimeError as exc:
        first = str(exc).splitlines()[0][:200]
        raise CifarkitError(f"the model cannot run on a {'x'.join(map(str, input_shape))} input: {first}",
                            "pass the input size the model was built for with --input CxHxW", 2)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


def parse_input(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in text.lower().replace("×", "x").split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise CifarkitError(f"--input {text!r} is not CxHxW", "write it like 3x32x32", exit_code=2)
    return dims


def print_summary(rows: list[Row], total_params: int, title: str, trainable: int | None = None) -> None:
    print(title)
    w = max([len(r.name) for r in rows] + [5])
    t = max([len(r.kind) for r in rows] + [4])
    print(f"{'layer':<{w}}  {'type':<{t}}  {'output':<14}  {'params':>9}  {'mult-adds':>11}  formula")
    for r in rows:
        shape = "×".join(map(str, r.out_shape))
        print(f"{r.name:<{w}}  {r.kind:<{t}}  {shape:<14}  {r.params:>9,}  {r.macs:>11,}  {r.formula}")
    split = (f" ({trainable:,} trainable, {total_params - trainable:,} frozen)"
             if trainable is not None else "")
    print(f"total parameters {total_params:,}{split}   mult-adds per image {sum(r.macs for r in rows):,}")


# ----------------------------------------------------------------------------- shape / solve

def solve(kind: str, what: str, size: int, target: int, kernel: int, stride: int, padding: int,
          dilation: int, ceil_mode: bool) -> list[int]:
    """Values of `padding` or `stride` that give output size `target` (others fixed)."""
    found = []
    if what == "padding":
        limit = kernel // 2 if kind == "pool" else dilation * (kernel - 1) + target * stride
        for p in range(0, limit + 1):
            if out_size(size, kernel, stride, p, dilation, ceil_mode) == target:
                found.append(p)
    else:
        for s in range(1, size + 2 * padding + 1):
            if out_size(size, kernel, s, padding, dilation, ceil_mode) == target:
                found.append(s)
    return found


# ----------------------------------------------------------------------------- worked examples

NOTES_INPUT = [[1, 2, 0, 3, 1], [0, 2, 1, 3, 1], [1, 2, 2, 2, 1], [1, 2, 1, 0, 1], [1, 2, 0, 3, 1]]
NOTES_KERNEL = [[1, 2, 1], [0, 1, 0], [2, 1, 0]]
NOTES_POOL_INPUT = [[1, 2, 0, 3, 1], [0, 1, 2, 3, 1], [1, 2, 1, 0, 0], [5, 2, 3, 1, 1], [2, 1, 0, 1, 1]]
NOTES_ACT_INPUT = [[1.0, -0.5], [-1.0, 3.0]]


def worked_examples() -> dict:
    """Every worked example of the notes, computed by PyTorch (the numbers the demo prints)."""
    x = torch.tensor(NOTES_INPUT, dtype=torch.float32).view(1, 1, 5, 5)
    k = torch.tensor(NOTES_KERNEL, dtype=torch.float32).view(1, 1, 3, 3)
    px = torch.tensor(NOTES_POOL_INPUT, dtype=torch.float32).view(1, 1, 5, 5)
    a = torch.tensor(NOTES_ACT_INPUT)
    l_in, l_tg = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 5.0])
    logits, label = torch.tensor([[0.1, 0.2, 0.3]]), torch.tensor([1])
    as_int = lambda t: t[0, 0].to(torch.int64).tolist()   # (1,1,H,W) -> H×W nested list
    return {
        "conv_stride1": as_int(F.conv2d(x, k, stride=1)),
        "conv_stride2": as_int(F.conv2d(x, k, stride=2)),
        "conv_padding1": as_int(F.conv2d(x, k, stride=1, padding=1)),
        "pool_ceil": as_int(nn.MaxPool2d(3, ceil_mode=True)(px)),
        "pool_floor": as_int(nn.MaxPool2d(3, ceil_mode=False)(px)),
        "relu": nn.ReLU()(a).tolist(),
        "sigmoid": [[round(v, 4) for v in row] for row in nn.Sigmoid()(a).tolist()],
        "l1": round(nn.L1Loss()(l_in, l_tg).item(), 4),
        "mse": round(nn.MSELoss()(l_in, l_tg).item(), 4),
        "cross_entropy": round(nn.CrossEntropyLoss()(logits, label).item(), 4),
    }


def _grid(m) -> str:
    return "\n".join("    " + " ".join(f"{v:>4}" for v in row) for row in m)


def demo_text(which: str = "all") -> str:
    ex = worked_examples()
    parts = []
    if which in ("conv", "all"):
        cell = " + ".join(f"{NOTES_INPUT[i][j]}·{NOTES_KERNEL[i][j]}" for i in range(3) for j in range(3))
        total = sum(NOTES_INPUT[i][j] * NOTES_KERNEL[i][j] for i in range(3) for j in range(3))
        parts.append("\n".join([
            "== convolution (F.conv2d) ==",
            "input 5×5:", _grid(NOTES_INPUT), "kernel 3×3:", _grid(NOTES_KERNEL),
            f"stride 1, padding 0: output size {formula_text(5, 3, 1, 0)}",
            _grid(ex["conv_stride1"]),
            f"by hand, top-left cell = {cell} = {total}",
            f"stride 2: output size {formula_text(5, 3, 2, 0)}", _grid(ex["conv_stride2"]),
            f"stride 1, padding 1: output size {formula_text(5, 3, 1, 1)}", _grid(ex["conv_padding1"]),
            f"the notes' padding for a 5×5 kernel keeping 32×32: {formula_text(32, 5, 1, 2)}",
        ]))
    if which in ("pool", "all"):
        parts.append("\n".join([
            "== max pooling (nn.MaxPool2d(3), stride defaults to the kernel) ==",
            "input 5×5:", _grid(NOTES_POOL_INPUT),
            f"ceil_mode=True:  output size {formula_text(5, 3, 3, 0, 1, True)}", _grid(ex["pool_ceil"]),
            f"ceil_mode=False: output size {formula_text(5, 3, 3, 0, 1, False)}", _grid(ex["pool_floor"]),
            "each output is the largest value in its 3×3 window; with ceil_mode the partial windows "
            "at the border are kept",
        ]))
    if which in ("activation", "all"):
        parts.append("\n".join([
            "== activations ==",
            f"input {NOTES_ACT_INPUT}",
            f"ReLU(x) = max(0, x)        -> {ex['relu']}",
            f"Sigmoid(x) = 1/(1+e^(−x))  -> {ex['sigmoid']}",
            f"by hand: Sigmoid(1) = 1/(1+e^(−1)) = {1 / (1 + math.exp(-1)):.4f}",
        ]))
    if which in ("loss", "all"):
        ce_hand = -0.2 + math.log(math.exp(0.1) + math.exp(0.2) + math.exp(0.3))
        parts.append("\n".join([
            "== losses ==",
            "inputs [1, 2, 3], targets [1, 2, 5]",
            f"L1Loss  = (|1−1| + |2−2| + |3−5|) / 3 = {ex['l1']:.4f}",
            f"MSELoss = (0² + 0² + 2²) / 3 = {ex['mse']:.4f}",
            "CrossEntropyLoss(x=[[0.1, 0.2, 0.3]], y=[1]) = −log(e^{x_y} / Σ_j e^{x_j})",
            f"  = −0.2 + log(e^0.1 + e^0.2 + e^0.3) = {ce_hand:.4f}   (PyTorch: {ex['cross_entropy']:.4f})",
        ]))
    if not parts:
        raise CifarkitError(f"unknown demo {which!r}", "choose conv, pool, activation, loss or all", 2)
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- CLI commands

def _model_from(spec: str, num_classes: int | None = None, model: str | None = None):
    """A registry name or a checkpoint path -> (model, title, input size from the checkpoint)."""
    from pathlib import Path

    from .models import create_model, list_models, user
    if spec in list_models() or user.is_file_ref(spec):
        return create_model(spec, num_classes or 10), f"model {spec}", None
    if Path(spec).exists():
        from .checkpoint import load_checkpoint
        ck = load_checkpoint(spec, model=model)
        from .data.sources import preprocess_of
        return ck.build_model(), f"checkpoint {spec} (model {ck.model_name})", preprocess_of(ck.preprocess)[0]
    create_model(spec)  # raises: unknown model, with suggestions
    raise AssertionError("unreachable")


def cmd_summary(a) -> int:
    import json

    from .models import count_parameters
    model, title, size = _model_from(a.target, a.num_classes, a.model)
    if a.freeze == "backbone":   # what `train --freeze backbone` would train: the head only
        from .models import freeze_backbone
        freeze_backbone(model)
    shape = parse_input(a.input) if a.input else (3, size or 32, size or 32)
    rows = summarize(model, shape)
    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if a.json:
        print(json.dumps({"input": list(shape), "layers": [r.to_json() for r in rows],
                          "total_parameters": total, "trainable_parameters": trainable,
                          "frozen_parameters": total - trainable,
                          "total_mult_adds": sum(r.macs for r in rows)}))
    else:
        print_summary(rows, total, f"{title}, input {'×'.join(map(str, shape))}", trainable)
    return 0


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.lower().replace("×", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) < 1:
        raise CifarkitError(f"--size {text!r} is not H or HxW with positive numbers", "e.g. --size 32x32", 2)
    return parts[0], parts[1]


def cmd_shape(a) -> int:
    h, w = _parse_hw(a.size)
    stride = a.stride if a.stride is not None else (a.kernel if a.kind == "pool" else 1)
    for name, v, lo in (("kernel", a.kernel, 1), ("stride", stride, 1), ("dilation", a.dilation, 1),
                        ("padding", a.padding, 0)):
        if v < lo:
            raise CifarkitError(f"--{name} must be >= {lo}, got {v}", exit_code=2)
    if a.kind == "pool" and a.padding > a.kernel // 2:
        raise CifarkitError(f"pooling padding {a.padding} is more than half the kernel ({a.kernel})",
                            "PyTorch requires padding <= kernel // 2 for pooling", 2)
    if a.ceil_mode and a.kind == "conv":
        raise CifarkitError("--ceil-mode applies to pooling only", "drop it, or use `shape pool`", 2)
    if a.solve:
        if a.target is None:
            raise CifarkitError("--solve needs --target T (the output size you want)", exit_code=2)
        for label, n in (("H", h), ("W", w)) if h != w else (("H=W", h),):
            vals = solve(a.kind, a.solve, n, a.target, a.kernel, stride, a.padding, a.dilation, a.ceil_mode)
            if not vals:
                print(f"{label}: no {a.solve} gives {a.target} from {n} with kernel {a.kernel}")
                continue
            print(f"{label}: {a.solve} {', '.join(map(str, vals))} gives {a.target}")
            for v in vals:
                s, p = (v, a.padding) if a.solve == "stride" else (stride, v)
                print(f"  {a.solve}={v}: {formula_text(n, a.kernel, s, p, a.dilation, a.ceil_mode)}")
        return 0
    oh = out_size(h, a.kernel, stride, a.padding, a.dilation, a.ceil_mode)
    ow = out_size(w, a.kernel, stride, a.padding, a.dilation, a.ceil_mode)
    print(f"H_out = {formula_text(h, a.kernel, stride, a.padding, a.dilation, a.ceil_mode)}")
    if w != h:
        print(f"W_out = {formula_text(w, a.kernel, stride, a.padding, a.dilation, a.ceil_mode)}")
    print(f"output {oh}×{ow}")
    if oh < 1 or ow < 1:
        raise CifarkitError(f"the input {h}×{w} is too small for kernel {a.kernel}: output {oh}×{ow}",
                            "use more padding, a smaller kernel or dilation")
    return 0


def cmd_demo(a) -> int:
    print(demo_text(a.which))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("summary", help="per-layer table: output shape, parameters, mult-adds, size formula")
    p.add_argument("target", help="a registered model name, your own file.py:Name, or a checkpoint file")
    p.add_argument("--input", help="input size CxHxW (default 3x32x32 or the checkpoint's size)")
    p.add_argument("--num-classes", type=int, help="head size for a registry model (default 10)")
    p.add_argument("--model", help="for a checkpoint of your own network: its file.py:Name")
    p.add_argument("--freeze", choices=("none", "backbone"), default="none",
                   help="count as `train --freeze` would: backbone = only the head trains")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("shape", help="conv/pool output size with the formula filled in; solve for padding or stride")
    p.add_argument("kind", choices=("conv", "pool"))
    p.add_argument("--size", required=True, help="input H or HxW")
    p.add_argument("--kernel", type=int, required=True)
    p.add_argument("--stride", type=int, help="default 1 for conv, the kernel for pool")
    p.add_argument("--padding", type=int, default=0)
    p.add_argument("--dilation", type=int, default=1)
    p.add_argument("--ceil-mode", action="store_true", help="pooling: round up")
    p.add_argument("--solve", choices=("padding", "stride"), help="find the values that give --target")
    p.add_argument("--target", type=int, help="wanted output size for --solve")
    p.set_defaults(func=cmd_shape)

    p = sub.add_parser("demo", help="the notes' worked examples, computed and explained by hand")
    p.add_argument("which", nargs="?", default="all", choices=("conv", "pool", "activation", "loss", "all"))
    p.set_defaults(func=cmd_demo)
