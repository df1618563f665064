"""Images/s of one training step under implementation variants, each in a fresh process:
eager vs torch.compile, with and without cifarkit's glibc malloc tuning, for the tutorial
network (batch 64) and the fast network (batch 2000). `--profile` prints the op breakdown.
`--sizes` times the fast network's step at several image sides instead (progressive resizing
costs), interleaved in one process, and prints each median against the 32 px step. `--layers`
times each convolution of the recipe's network (forward, backward to the input, backward to the
weights: PyTorch's, where built cifarkit's native one, and as nine matrix products) and a full
step with and without the whitening bias's gradient (frozen after epoch 3).
`--native` times a full 32 px step (`--size`) with PyTorch's ops, with cifarkit's C++ max-pool
only, with the max-pool and the native 3x3 convolution weight gradient everywhere (kernels.py),
with the max-pool and the weight gradient as nine matrix products everywhere, with what
kernels.choose kept before the matrix products were a candidate (PyTorch's or native, shape by
shape), with what it keeps now but PyTorch's batch norm and GELU (chosen-no-bngelu: before the
fused op), with what it would keep without the whole convolution as matrix products (chosen-no-gemm),
and with what it keeps now on this CPU (what training uses).
`--conv32` times the recipe's whole step in fp32 (a CPU without native bf16) at each of `--sizes`:
Muon's Newton-Schulz products in bf16 as before (emulated there), in fp32 (now), with the
convolutions kernels.choose keeps in fp32 among the matrix products (before the fp32 C++
kernels), with what it keeps but PyTorch's batch norm and GELU (before the fp32 fused op), and
with what it keeps now (also the C++ fp32 max-pool, weight gradient and fused batch norm + GELU);
`--modes` picks some of them, `--recipe sprint` times sprint's step (the network alone on its
trained share) instead of fast's; `--profile` adds op tables.
`--select` times selective backprop's parts: a full step, the network's own no-grad scoring pass,
a step on the hardest share, and a proxy network's step (--hard-proxy).
`--models` times a full 32 px step of several fast-network variants (model_args), interleaved.
`--freeze` times the recipe's whole step (proxy on the batch, network on the harder half) with
only the whitening bias frozen and with the first conv group frozen too (first_group_epochs).
`--proxies` times the same whole step with variants of the proxy (changes to its model_args);
with `--profile`, then the op breakdown of that step.

    python benchmarks/step_variants.py [--profile] [--only fast]
    python benchmarks/step_variants.py --sizes 16,20,24,28,32
    python benchmarks/step_variants.py --layers
    python benchmarks/step_variants.py --conv32 --sizes 16,20,24,28,32   # fp32: CPUs without bf16
    python benchmarks/step_variants.py --conv32 --recipe sprint --sizes 16,24,32 --modes chosen-no-bngelu,chosen
    python benchmarks/step_variants.py --native [--widths 64,256,384]   # default: the recipe's network
    python benchmarks/step_variants.py --select --widths 64,256,384 --proxy 16,64,64 --fraction 0.5
    python benchmarks/step_variants.py --models '[{"widths": [64,256,384]}, {"widths": [64,256,384], "depths": [2,2,3]}]' [--size 16]
    python benchmarks/step_variants.py --freeze [--size 32] [--repeats 7]
    python benchmarks/step_variants.py --proxies '[{}, {"whiten_width": 12}]' [--size 32] [--repeats 7] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _training_step(model_name: str, compiled: bool = False, model_args: dict | None = None):
    """A bf16 training step of the recipe's network and optimiser: ``step(x, y)``."""
    import torch
    import torch.nn.functional as F

    from cifarkit import create_model, resolve_config
    from cifarkit.device import set_threads
    from cifarkit.optim import make_optimizer

    set_threads(0)
    cfg = resolve_config("fast" if model_name == "fast" else "tutorial")
    model = create_model(model_name, **(model_args or {})).to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    run = torch.compile(model) if compiled else model

    def step(x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(run(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step.model = model
    return step


def child(model_name: str, batch: int, compiled: bool, steps: int, profile: bool) -> float:
    import torch

    train_step = _training_step(model_name, compiled)
    x = torch.randn(batch * 4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch * 4,))

    def step(i):
        sl = slice((i % 4) * batch, (i % 4 + 1) * batch)
        train_step(x[sl], y[sl])

    for i in range(3):
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    rate = steps * batch / (time.perf_counter() - t)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for i in range(2):
                step(i)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    return rate


def _interleaved_medians(cases: dict, repeats: int = 5) -> dict:
    """Median seconds of each callable, run in turn so drift in the machine's speed hits all alike
    (one warm-up call each first: first calls allocate and pick kernels)."""
    import statistics

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for fn in cases.values():
        fn()
    times = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def size_costs(sizes: list[int], batch: int = 2000, repeats: int = 5) -> dict:
    """Median seconds of one fast-recipe training step per image side, interleaved."""
    import torch

    train_step = _training_step("fast")
    y = torch.randint(0, 10, (batch,))
    xs = {s: torch.randn(batch, 3, s, s).contiguous(memory_format=torch.channels_last) for s in sizes}
    return _interleaved_medians({s: lambda s=s: train_step(xs[s], y) for s in sizes}, repeats)


def _median_ms(fn, repeats: int = 5) -> float:
    return _interleaved_medians({0: fn}, repeats)[0] * 1e3


def layer_costs(model_args: dict, batch: int = 2000, size: int = 32, dtype: str = "bf16") -> None:
    """Per-convolution times of the fast network in bf16 (or fp32: what a CPU without native bf16
    trains in)/channels_last, then, in bf16 only, the frozen-bias ratio of a full step."""
    import torch
    import torch.nn.functional as F

    from cifarkit import create_model, kernels
    from cifarkit.device import set_threads

    set_threads(0)
    kernels.load()
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    native = kernels._native_wgrad(dt)   # bf16: AVX-512 BF16; fp32: AVX2 and FMA
    model = create_model("fast", **model_args)
    shapes = []   # (name, input shape, conv) of every convolution, recorded on a small forward
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: shapes.append((n, i[0].shape, m)))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    model(torch.randn(2, 3, size, size))
    for h in hooks:
        h.remove()
    cl = torch.channels_last
    totals = [0.0, 0.0, 0.0, 0.0]   # forward, input gradient, PyTorch's and the fastest weight gradient
    print(f"fast network {json.dumps(model_args)}, batch {batch}, {size} px, {dtype} channels_last "
          f"(medians of 5; native weight gradient {'built' if native else 'unavailable'})")
    for name, shape, conv in shapes:
        x = torch.randn(batch, *shape[1:], dtype=dt).contiguous(memory_format=cl)
        w = conv.weight.detach().to(dt).contiguous(memory_format=cl)
        args = (conv.stride, conv.padding, conv.dilation, False, [0, 0], 1)
        y = F.conv2d(x, w, None, conv.stride, conv.padding)
        g = torch.randn_like(y).contiguous(memory_format=cl)
        flop = 2 * y.numel() * w[0].numel() / 1e9
        bwd = lambda mask: torch.ops.aten.convolution_backward(g, x, w, None, *args, mask)
        t = [_median_ms(lambda: F.conv2d(x, w, None, conv.stride, conv.padding)),
             _median_ms(lambda: bwd([True, False, False])), _median_ms(lambda: bwd([False, True, False]))]
        conv3x3 = isinstance(conv, kernels.Conv3x3) and kernels._conv_static_ok(conv)
        m = kernels._state["module"]
        wgrad = m.conv3x3_wgrad32 if dtype == "fp32" else m.conv3x3_wgrad
        t.append(_median_ms(lambda: wgrad(x, g)) if native and conv3x3 else float("nan"))
        t.append(_median_ms(lambda: kernels.matmul_wgrad(x, g)) if conv3x3 else float("nan"))
        best = min(v for v in t[2:] if v == v)           # the fastest weight gradient (NaN: not built)
        totals = [a + b for a, b in zip(totals, t[:3] + [best])]
        print(f"{name:18} {tuple(shape[1:])!s:15} fwd {t[0]:6.1f} ms ({flop / t[0] * 1e3:4.0f} GFLOP/s) | "
              f"grad input {t[1]:6.1f} ms ({flop / t[1] * 1e3:4.0f}) | grad weight {t[2]:6.1f} ms "
              f"({flop / t[2] * 1e3:4.0f}) | native {t[3]:6.1f} ms ({flop / t[3] * 1e3:4.0f}) | "
              f"9 matmuls {t[4]:6.1f} ms ({flop / t[4] * 1e3:4.0f})", flush=True)
    print(f"{'all convolutions':34} fwd {totals[0]:6.1f} ms | grad input {totals[1]:6.1f} ms | "
          f"grad weight {totals[2]:6.1f} ms | fastest grad weight of each layer {totals[3]:6.1f} ms")
    if dtype != "bf16":   # the full step below is a bf16 one (emulated, and slow, where fp32 is asked for)
        return
    train_step = _training_step("fast", model_args=model_args)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (batch,))
    net = train_step.model

    def step_with(trained: bool):
        net.whiten.bias.requires_grad_(trained)
        train_step(x, y)
    med = _interleaved_medians({k: lambda k=k: step_with(k) for k in (True, False)})
    on, off = med[True], med[False]
    print(f"full step, batch {batch}, {size} px: whitening bias trained {on * 1e3:.0f} ms, frozen "
          f"{off * 1e3:.0f} ms (ratio {off / on:.3f}; medians of 5 after one warm-up each)")


def _timings(chosen: dict, batch: int) -> dict:
    """{shape key: its cached timing entry} for the shapes kernels.choose just decided at the
    timing batch training uses (min(batch, 256)): each implementation's milliseconds."""
    from cifarkit import kernels
    known = json.loads(kernels._cache_path().read_text())
    return {k: known[kernels.cache_key(k, min(batch, 256))] for k in chosen}


def native_costs(model_args: dict, batch: int = 2000, size: int = 32, keep: list | None = None,
                 repeats: int = 7) -> None:
    """A full fast-network step with PyTorch's ops, with the native max-pool only, with the
    max-pool and the native convolution weight gradient (or the nine matrix products) everywhere,
    with what kernels.choose kept before the matrix products and before the fused batch norm +
    GELU were candidates, and with what it keeps now on this CPU (what training uses),
    interleaved."""
    import torch

    from cifarkit import kernels

    reason = kernels.load()
    if reason is not None:
        raise SystemExit(f"native kernels unavailable: {reason}")
    train_step = _training_step("fast", model_args=model_args)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    wgrad = kernels.conv_wgrad_available
    chosen_map = kernels.choose([train_step.model], [size], batch=min(batch, 256))
    chosen = kernels._state["choice"]
    # what the chooser kept before the matrix products were a candidate: PyTorch's or native
    known = _timings(chosen, batch)

    def only(**ops):   # {op: implementation} for the shapes of those ops, PyTorch's elsewhere
        return {k: ops.get(k.split()[0], "pytorch") for k in chosen}
    no_bngelu = {k: ("pytorch" if k.startswith("bngelu") else v) for k, v in chosen.items()}
    choices = {"pool": only(pool="native"), "pool+wgrad": only(pool="native", wgrad="native"),
               "pool+matmul": only(pool="native", wgrad="matmul"),
               "chosen-no-matmul": {k: ("pytorch" if k.startswith("bngelu") else kernels._pick(
                   {i: known[k][i] for i in ("pytorch", "native")})) for k in chosen},
               "chosen-no-bngelu": no_bngelu,
               # what it kept before the whole convolution as matrix products was a candidate
               "chosen-no-gemm": {k: (kernels._pick({i: e for i, e in known[k].items()
                                                     if i in ("pytorch", "native", "matmul")})
                                      if v == "gemm" else v) for k, v in chosen.items()},
               "chosen": chosen}

    def step(mode: str):
        if mode == "pytorch":
            with kernels.disabled():
                train_step(x, y)
            return
        kernels._state["choice"] = choices[mode]
        try:
            train_step(x, y)
        finally:
            kernels._state["choice"] = chosen
    modes = ("pytorch", "pool", "pool+wgrad", "pool+matmul", "chosen-no-matmul", "chosen-no-bngelu",
             "chosen-no-gemm", "chosen")
    if not wgrad():
        modes = tuple(m for m in modes if m != "pool+wgrad")
    if keep:   # e.g. chosen-no-bngelu,chosen: fewer modes, so more repeats in the same minutes
        unknown = set(keep) - set(modes)
        if unknown:
            raise SystemExit(f"--modes: unknown {', '.join(sorted(unknown))}; choose from {', '.join(modes)}")
        modes = tuple(m for m in modes if m in keep)
    med = _interleaved_medians({k: lambda k=k: step(k) for k in modes}, repeats=repeats)
    base = modes[0]
    print(f"full step, fast {json.dumps(model_args)}, batch {batch}, {size} px (medians of {repeats} after one "
          f"warm-up each; ratios to {base}): " + ", ".join(f"{k} {med[k] * 1e3:.0f} ms ({med[k] / med[base]:.3f})"
                                                            for k in modes))
    print(f"chosen: native on {chosen_map['pool'][0]} of {chosen_map['pool'][1]} pool shapes and "
          f"{chosen_map['bngelu'][0]} of {chosen_map['bngelu'][1]} batch norm + GELU shapes; weight "
          f"gradient of {chosen_map['wgrad'][1]} shapes: {json.dumps(chosen_map['wgrad_by'])}")


def select_costs(widths: list[int], proxy: list[int], fraction: float, batch: int = 2000,
                 size: int = 32) -> None:
    """Selective backprop's costs per 32 px step, interleaved (medians of 5)."""
    import torch

    from cifarkit import kernels
    from cifarkit.device import autocast

    kernels.load()
    train_step = _training_step("fast", model_args={"widths": widths})
    proxy_step = _training_step("fast", model_args={"widths": proxy})
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    k = round(batch * fraction)
    xs, ys = x[:k].contiguous(memory_format=torch.channels_last), y[:k]

    def score():
        with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
            train_step.model(x)
    med = _interleaved_medians({"full step": lambda: train_step(x, y), "no-grad scoring pass": score,
                                f"step on {k} images": lambda: train_step(xs, ys),
                                f"proxy {proxy} step": lambda: proxy_step(x, y)})
    for name, t in med.items():
        print(f"{name:32} {t * 1e3:7.0f} ms = {t / med['full step']:.2f} of a full step")
    own = (med["no-grad scoring pass"] + med[f"step on {k} images"]) / med["full step"]
    prox = (med[f"proxy {proxy} step"] + med[f"step on {k} images"]) / med["full step"]
    print(f"fast widths {widths}, batch {batch}, {size} px, fraction {fraction}: self-scored step "
          f"{own:.2f}, proxy-scored step {prox:.2f} of a full step")


def _recipe_parts(cfg, nets: list, batch: int, size: int):
    """What the recipe's step timings share: ``nets`` in channels_last and train mode, with the
    kernels training would choose, their optimisers and the whitening biases frozen (as after
    epoch 3); a random batch and its first half (the network's share): (nets, opts, batch, half)."""
    from cifarkit import kernels

    nets, opts = _recipe_nets(cfg, nets)
    kernels.load()
    kernels.choose(nets, [size])
    return nets, opts, *_recipe_batch(batch, size)


def _recipe_nets(cfg, nets: list):
    """``nets`` in channels_last and train mode with their optimisers and the whitening biases
    frozen (as after epoch 3): (nets, opts)."""
    import torch

    from cifarkit.device import set_threads
    from cifarkit.optim import make_optimizer

    set_threads(0)
    nets = [n.to(memory_format=torch.channels_last).train() for n in nets]
    opts = [make_optimizer(cfg, n) for n in nets]
    for n in nets:
        n.whiten.bias.requires_grad_(False)
    return nets, opts


def _recipe_batch(batch: int, size: int):
    """A random batch and its first half (the network's share): ((x, y), (x_half, y_half))."""
    import torch

    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    return (x, y), (x[:batch // 2].contiguous(memory_format=torch.channels_last), y[:batch // 2])


def freeze_costs(batch: int = 2000, size: int = 32, repeats: int = 7) -> None:
    """The recipe's whole step (its proxy on the batch, the network on the harder half), with the
    kernels training would choose, with the whitening bias frozen (after epoch 3) against the
    network's first conv group frozen too (optimizer_args' first_group_epochs); interleaved medians."""
    from cifarkit import create_model, resolve_config
    from cifarkit.models import train_mode

    cfg = resolve_config("fast")
    nets = [create_model("fast", **cfg.model_args), create_model("fast", **cfg.proxy_model_args())]
    # the network's group's trainable parameters (its batch norms' scales never train); the
    # proxy's first group trains to the end (training.selective.Proxy)
    groups = [[p for p in nets[0].parameter_roles()["first_group"] if p.requires_grad], []]
    nets, opts, (x, y), half = _recipe_parts(cfg, nets, batch, size)

    def step(group_frozen: bool):
        for net, opt, group, (xb, yb) in zip(nets, opts, groups, (half, (x, y)), strict=True):
            for p in group:
                p.requires_grad_(not group_frozen)
            train_mode(net)   # a frozen group's batch norms use their running statistics, as in training
            _train_once(net, opt, xb, yb)
    med = _interleaved_medians({k: lambda k=k: step(k) for k in (False, True)}, repeats)
    print(f"recipe step (proxy on {batch}, network on {batch // 2} images), {size} px: whitening bias "
          f"frozen {med[False] * 1e3:.0f} ms, first conv group frozen too {med[True] * 1e3:.0f} ms "
          f"(ratio {med[True] / med[False]:.3f}; medians of {repeats}, interleaved)")


CONV32_MODES = ("muon-bf16", "pytorch", "chosen-no-cpp", "chosen-no-bngelu", "chosen")


def conv32_costs(sizes: list[int], batch: int = 2000, repeats: int = 5, profile: bool = False,
                 modes: tuple = CONV32_MODES, recipe: str = "fast") -> None:
    """The recipe's whole step in fp32 (what a CPU without native bf16 trains in), per image side,
    interleaved medians. ``recipe`` "fast": its proxy on the batch and the network on the harder
    half; "sprint": the network alone on its trained share of the batch at each size (a third at
    16-28 px, a half at 32; the ranking by stale losses costs no step). Modes: "muon-bf16" as
    before 2026-12-02 (PyTorch's convolutions, Muon's Newton-Schulz products in bf16, emulated on
    such a CPU), "pytorch" (those products in fp32), "chosen-no-cpp" (and the convolutions
    kernels.choose(precision="fp32") keeps among the matrix-product forms: what training used
    before the fp32 C++ kernels, 2026-12-07), "chosen-no-bngelu" (what it keeps but PyTorch's batch
    norm and GELU: before the fp32 fused op, later on 2026-12-07), "chosen" (what it keeps now: also
    the C++ fp32 max-pool, weight gradient and fused batch norm + GELU where built and faster).
    Ratios are to the first mode. With ``profile``, the op breakdown of one step of the first and
    the last mode at the first size."""
    import torch

    from cifarkit import create_model, kernels, optim, resolve_config
    from cifarkit.training.loader import epoch_size
    from cifarkit.training.selective import trained_share

    cfg = resolve_config(recipe)
    first = {size: next((e for e in range(cfg.epochs) if epoch_size(cfg, e) == size), None) for size in sizes}
    if not cfg.hard_proxy and None in first.values():
        raise SystemExit(f"--sizes: {recipe} has no epoch at {[s for s, e in first.items() if e is None]} px")
    shares = {size: trained_share(cfg, e) for size, e in first.items() if e is not None}
    models = [create_model("fast", **cfg.model_args)]
    if cfg.hard_proxy:
        models.append(create_model("fast", **cfg.proxy_model_args()))
    nets, opts = _recipe_nets(cfg, models)
    reason = kernels.load()
    got = kernels.choose(nets, sizes, batch=min(batch, 256), precision="fp32")
    chosen = kernels._state["choice"]
    print(f"{recipe} recipe; C++ kernels: {reason or 'built'}; fp32 max-pool native on {got['pool'][0]} of "
          f"{got['pool'][1]} shapes, batch norm + GELU on {got['bngelu'][0]} of {got['bngelu'][1]}; fp32 "
          f"convolutions chosen on {got['wgrad'][1]} shapes: {json.dumps(got['wgrad_by'])}; "
          + ", ".join(f"{k}: {v}" for k, v in sorted(chosen.items()) if v != "pytorch"))
    known = _timings(chosen, batch)
    no_cpp = {k: "pytorch" if "pool" in k or "bngelu" in k else kernels._pick(
        {i: e for i, e in known[k].items() if i in ("pytorch", "matmul", "gemm")}) for k in chosen}
    no_bngelu = {k: "pytorch" if "bngelu" in k else v for k, v in chosen.items()}
    choices = {"chosen": chosen, "chosen-no-cpp": no_cpp, "chosen-no-bngelu": no_bngelu}
    ns_bf16 = optim._CPU_BF16.get("fast")
    total = {k: 0.0 for k in modes}
    base, last = modes[0], modes[-1]
    for size in sizes:
        if cfg.hard_proxy:   # the proxy on the whole batch, the network on the harder half
            (x, y), half = _recipe_batch(batch, size)
            work = (half, (x, y))
        else:                # the network alone, on its share in the first epoch of that size
            k = max(1, round(shares[size] * batch))
            (x, y), _ = _recipe_batch(batch, size)
            work = ((x[:k].contiguous(memory_format=torch.channels_last), y[:k]),)

        def step(mode: str):
            kernels._state["choice"] = choices.get(mode, {})
            optim._CPU_BF16["fast"] = mode == "muon-bf16" or bool(ns_bf16)
            try:
                for net, opt, (xb, yb) in zip(nets, opts, work, strict=True):
                    _train_once(net, opt, xb, yb, bf16=False)
            finally:
                kernels._state["choice"] = chosen
                optim._CPU_BF16.pop("fast")
        if profile and size == sizes[0]:
            from torch.profiler import ProfilerActivity, profile as prof
            for mode in dict.fromkeys((base, last)):
                step(mode)
                with prof(activities=[ProfilerActivity.CPU]) as p:
                    step(mode)
                print(f"{mode}, {size} px:\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        med = _interleaved_medians({k: lambda k=k: step(k) for k in total}, repeats)
        for k in total:
            total[k] += med[k]
        print(f"recipe step in fp32, {size} px, batch {batch}: " + ", ".join(
            f"{k} {med[k] * 1e3:.0f} ms ({med[k] / med[base]:.3f})" for k in total)
            + f" (medians of {repeats}, interleaved)", flush=True)
    print(f"sum over {sizes}: " + ", ".join(f"{k} {total[k] / total[base]:.3f}" for k in total)
          + f" of {base}")


def _train_once(net, opt, xb, yb, bf16: bool = True) -> None:
    import torch
    import torch.nn.functional as F

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(net(xb), yb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def proxy_costs(variants: list[dict], batch: int = 2000, size: int = 32, repeats: int = 7,
                profile: bool = False) -> None:
    """The recipe's whole step (a proxy trained on the batch, the network on the harder half; the
    whitening biases frozen, as after epoch 3), once per proxy variant (the recipe's proxy
    model_args updated by each dict), with the kernels training would choose; interleaved medians.
    ``profile``: then the op breakdown of three steps with the first variant."""
    from cifarkit import create_model, resolve_config

    cfg = resolve_config("fast")
    nets = [create_model("fast", **cfg.model_args)]
    nets += [create_model("fast", **{**cfg.proxy_model_args(), **v}) for v in variants]
    nets, opts, (x, y), half = _recipe_parts(cfg, nets, batch, size)

    def step(i: int):
        _train_once(nets[i + 1], opts[i + 1], x, y)
        _train_once(nets[0], opts[0], *half)
    med = _interleaved_medians({i: lambda i=i: step(i) for i in range(len(variants))}, repeats)
    for i, v in enumerate(variants):
        print(f"recipe step, proxy {json.dumps(v):40} {med[i] * 1e3:6.0f} ms = {med[i] / med[0]:.3f} of the "
              f"first (proxy on {batch}, network on {batch // 2} images, {size} px; medians of {repeats}, "
              f"interleaved)", flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                step(0)
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def model_costs(variants: list[dict], batch: int = 2000, size: int = 32) -> None:
    """Full training steps of fast-network variants (model_args each), interleaved (medians of 5)."""
    import torch

    from cifarkit import kernels

    kernels.load()
    steps = [_training_step("fast", model_args=v) for v in variants]
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    med = _interleaved_medians({i: lambda i=i: steps[i](x, y) for i in range(len(variants))})
    for i, v in enumerate(variants):
        params = sum(p.numel() for p in steps[i].model.parameters())
        print(f"{json.dumps(v):60} {med[i] * 1e3:6.0f} ms = {med[i] / med[0]:.2f} of the first "
              f"({params / 1e6:.2f} M parameters; batch {batch}, {size} px)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--only", choices=("tudui", "fast"), help="measure one network only")
    ap.add_argument("--sizes", help="comma-separated image sides: time the fast step at each")
    ap.add_argument("--layers", action="store_true", help="time each convolution of the fast network")
    ap.add_argument("--layers-dtype", choices=("bf16", "fp32"), default="bf16",
                    help="with --layers: the precision (fp32: what a CPU without native bf16 trains in)")
    ap.add_argument("--native", action="store_true", help="full step: native kernels vs PyTorch's")
    ap.add_argument("--widths", help="with --native, --layers or --select: the fast network's widths "
                                     "(default: the recipe's network; --select: 64,256,256)")
    ap.add_argument("--conv32", action="store_true", help="the recipe's step in fp32 at --sizes: "
                    "PyTorch's convolutions against those kernels.choose keeps in fp32")
    ap.add_argument("--select", action="store_true", help="selective backprop's costs per step")
    ap.add_argument("--proxy", default="16,64,64", help="with --select: the proxy's widths")
    ap.add_argument("--fraction", type=float, default=0.5, help="with --select: share trained on")
    ap.add_argument("--models", help="JSON list of fast model_args: time a full step of each")
    ap.add_argument("--freeze", action="store_true", help="the recipe's step with its first conv group "
                                                          "frozen or not (first_group_epochs)")
    ap.add_argument("--proxies", help="JSON list of changes to the recipe's proxy model_args: time the "
                                      "recipe's whole step with each, e.g. '[{}, {\"whiten_width\": 12}]'")
    ap.add_argument("--size", type=int, default=32, help="with --models, --proxies, --layers, --native or --freeze: image side in px")
    ap.add_argument("--modes", help="with --native or --conv32: comma-separated modes to time only "
                                    "(e.g. chosen-no-bngelu,chosen)")
    ap.add_argument("--recipe", choices=("fast", "sprint"), default="fast",
                    help="with --conv32: whose step (sprint: the network alone on its trained share)")
    ap.add_argument("--repeats", type=int, default=7, help="with --native, --proxies or --freeze: interleaved repeats per mode")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.models:
        model_costs(json.loads(a.models), size=a.size)
        return 0
    if a.proxies:
        proxy_costs(json.loads(a.proxies), size=a.size, repeats=a.repeats, profile=a.profile)
        return 0
    if a.freeze:
        freeze_costs(size=a.size, repeats=a.repeats)
        return 0
    widths = [int(v) for v in a.widths.split(",")] if a.widths else None
    if a.select:
        select_costs(widths or [64, 256, 256], [int(v) for v in a.proxy.split(",")], a.fraction)
        return 0
    if a.native or a.layers:
        from cifarkit import resolve_config
        model_args = {"widths": widths} if widths else dict(resolve_config("fast").model_args)
        if a.native:
            native_costs(model_args, size=a.size, keep=a.modes.split(",") if a.modes else None, repeats=a.repeats)
        else:
            layer_costs(model_args, size=a.size, dtype=a.layers_dtype)
        return 0
    if a.conv32:
        modes = tuple(a.modes.split(",")) if a.modes else CONV32_MODES
        unknown = set(modes) - set(CONV32_MODES)
        if unknown:
            ap.error(f"--modes: unknown {', '.join(sorted(unknown))}; --conv32 has {', '.join(CONV32_MODES)}")
        conv32_costs([int(v) for v in (a.sizes or "16,20,24,28,32").split(",")], repeats=min(a.repeats, 5),
                     profile=a.profile, modes=modes, recipe=a.recipe)
        return 0
    if a.sizes:
        med = size_costs([int(v) for v in a.sizes.split(",")])
        full = med.get(32) or max(med.values())
        for s, t in med.items():
            print(f"fast step, batch 2000, {s:2d} px: {t:6.3f} s median = {t / full:.2f} of the 32 px step", flush=True)
        return 0
    if a.child:
        name, batch, compiled, steps = a.child
        print(json.dumps(child(name, int(batch), compiled == "1", int(steps), a.profile)))
        return 0
    rows = []
    for name, batch, steps in (("tudui", 64, 300), ("fast", 2000, 4)):
        if a.only and name != a.only:
            continue
        for compiled in ("0", "1"):
            for malloc in ("1", "0"):
                if compiled == "1" and malloc == "0":
                    continue
                env = {**os.environ, "CIFARKIT_MALLOC_TUNE": malloc}
                out = subprocess.run([sys.executable, __file__, "--child", name, str(batch), compiled, str(steps)]
                                     + (["--profile"] if a.profile and compiled == "0" and malloc == "1" else []),
                                     env=env, capture_output=True, text=True, check=True)
                if a.profile and out.stderr:
                    print(out.stderr[-4000:])
                rate = float(out.stdout.strip().splitlines()[-1])
                rows.append((name, batch, "compile" if compiled == "1" else "eager", malloc == "1", rate))
                print(f"{name:6} batch {batch:5}  {rows[-1][2]:8} malloc-tuned={rows[-1][3]!s:5}  {rate:8,.0f} img/s",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
