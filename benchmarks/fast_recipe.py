"""Time-to-accuracy of `--recipe fast`, airbench-style: mean ± std over seeds.

Counted like airbench: training seconds plus the final (test-time-augmented) evaluation; the
one-time JPEG decode, data load and native-kernel build are reported separately. FLOPs of one training step are
counted with torch.utils.flop_counter and scaled to the whole run; on the CPU a bf16 matmul peak
is measured in the same run for comparison.

    python benchmarks/fast_recipe.py --data ../shared/data/cifar10-jpeg --seeds 3 [--json out.json]
    python benchmarks/fast_recipe.py --data DIR --grid '[{"epochs": 8}, {"epochs": 10}]' --seeds 2
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def matmul_peak_gflops(device: torch.device, dtype=torch.bfloat16, n: int = 4096, reps: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def train_step_flops(cfg, size: int | None = None, bias_frozen: bool = False,
                     first_group_frozen: bool = False) -> float:
    """FLOPs of one forward+backward of one image of the recipe's model (flop_counter).

    ``bias_frozen``: the whitening bias has stopped training, so (as in cifarkit.optim.freeze_stopped) it gets no
    gradient and the first convolution's gradient to its input is not computed or counted.
    ``first_group_frozen``: so has the first conv group (optimizer_args' first_group_epochs): no
    weight gradients there, and no gradient to the second group's input.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from cifarkit import create_model, kernels
    model = create_model(cfg.model, 10, **cfg.model_args)
    if bias_frozen:
        model.whiten.bias.requires_grad_(False)
    if first_group_frozen:
        for p in model.parameter_roles()["first_group"]:
            p.requires_grad_(False)
    size = size or cfg.image_size
    x = torch.randn(8, 3, size, size)
    # PyTorch's ops only: the counter sees no C++ kernel (an fp32 weight gradient computed by one,
    # where built, would go uncounted), and the arithmetic is the same whichever computes it
    with kernels.disabled(), FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    return counter.get_total_flops() / 8


def forward_flops(cfg, size: int | None = None) -> float:
    """FLOPs of one no-grad forward pass of one image (selective backprop's scoring pass)."""
    from torch.utils.flop_counter import FlopCounterMode

    from cifarkit import create_model
    model = create_model(cfg.model, 10, **cfg.model_args)
    size = size or cfg.image_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(8, 3, size, size))
    return counter.get_total_flops() / 8


def epoch_flops(cfg, n_train: int) -> list[float]:
    """Training FLOPs of each epoch of a run (its own image size, progressive resizing); with
    selective backprop (hard_fraction < 1), a scoring forward of every image (or a training step
    of the proxy network, --hard-proxy; nothing with --hard-stale, whose ranking is a table look-up)
    plus a training step on the selected share (--hard-fraction-small's in the epochs of smaller
    images: the training loop's own rule, selective.trained_share). Each distinct
    kind of epoch is counted once (a FlopCounterMode pass), then repeated."""
    from cifarkit.optim import first_group_epochs, whiten_bias_epochs
    from cifarkit.training import epoch_size
    from cifarkit.training.selective import selecting, trained_share
    stop = whiten_bias_epochs(cfg) if cfg.model == "fast" else None   # frozen from this epoch on
    group_stop = first_group_epochs(cfg) if cfg.model == "fast" else None
    kinds = [(epoch_size(cfg, e), stop is not None and e >= stop,
              group_stop is not None and e >= group_stop,
              selecting(cfg, e), trained_share(cfg, e)) for e in range(cfg.epochs)]
    proxy = dataclasses.replace(cfg, model_args=cfg.proxy_model_args()) if cfg.hard_proxy else None
    per_kind = {}
    for kind in dict.fromkeys(kinds):
        size, frozen, group_frozen, ranked, share = kind
        step = train_step_flops(cfg, size, frozen, group_frozen)
        if ranked:   # a proxy or the stale table ranks instead of the network's own forward pass
            step = share * step + (0 if proxy or cfg.hard_stale else forward_flops(cfg, size))
        if proxy is not None:   # trained on every whole batch
            step += train_step_flops(proxy, size, frozen)   # its first group trains to the end
        per_kind[kind] = step * n_train
    return [per_kind[k] for k in kinds]


def run_flops(cfg, n_train: int) -> float:
    """Training FLOPs of a whole run: the sum of epoch_flops."""
    return sum(epoch_flops(cfg, n_train))


def run_once(data: str, seed: int, overrides: dict, extra_tta: tuple = ()) -> dict:
    from cifarkit import evaluate, load_checkpoint, resolve_config, train
    from cifarkit.evaluate import split_for_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        base = {"data": data, "seed": seed, "out": tmp, "tensorboard": False}
        cfg = resolve_config("fast", overrides={**base, **overrides, "eval_every": 10_000})
        t0 = time.perf_counter()
        s = train(cfg, progress=False, log=lambda *a: None)
        wall = time.perf_counter() - t0
        ck = load_checkpoint(Path(tmp) / "last.ckpt")
        # Time only the final evaluation (with the recipe's TTA), not re-reading the data.
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        split, classes = split_for_checkpoint(ck, None, "val", progress=False)
        split = split.to(dev)
        model = ck.build_model(dev).to(memory_format=torch.channels_last)
        t1 = time.perf_counter()
        r = evaluate(model, split, classes, ck.preprocess["mean"], ck.preprocess["std"], dev,
                     s["precision"], tta=cfg.tta)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        eval_s = time.perf_counter() - t1
        # Other test-time augmentations of the same trained model (for comparing TTA levels).
        also = {m: evaluate(model, split, classes, ck.preprocess["mean"], ck.preprocess["std"], dev,
                            s["precision"], tta=m).accuracy for m in extra_tta}
    return {"seed": seed, "val_acc": r.accuracy, "train_seconds": s["train_seconds"],
            "eval_seconds": eval_s, "seconds": s["train_seconds"] + eval_s,
            "images_per_s": s["train_images_per_s"], "wall_seconds": wall,
            "n_train": s["n_train"], "epochs": s["epochs"], "device": s["device"],
            "precision": s["precision"], "val_acc_other_tta": also, "cfg": cfg}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-start", type=int, default=0, help="first seed (runs seeds start .. start+seeds-1)")
    ap.add_argument("--grid", default="[{}]", help="JSON list of override dicts to compare")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--extra-tta", default="", help="comma-separated TTA modes to also evaluate, e.g. multi")
    a = ap.parse_args()
    grid = json.loads(a.grid)

    import cifarkit.data
    import cifarkit.training.prep
    from cifarkit.data import load_data
    t0 = time.perf_counter()
    load_data(a.data, progress=False)          # decode once (cached); reported, not counted
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_data(a.data, progress=False)
    load_s = time.perf_counter() - t0
    # Keep the decoded data in memory between runs: loading is not timed, only repeated, and
    # reading the disk cache again costs seconds per run on some machines.
    memo = functools.lru_cache(maxsize=2)(load_data)
    cifarkit.training.prep.load_data = cifarkit.data.load_data = memo   # where prepare() looks it up
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        from cifarkit.device import set_threads
        set_threads(0)
    native = "not on a GPU"
    if device.type == "cpu":   # built (or loaded from its cache) once: reported, not counted
        from cifarkit import kernels
        t0 = time.perf_counter()
        reason = kernels.load()
        native = (f"C++ max-pool{' and conv weight gradient' if kernels.conv_wgrad_available() else ''} ready in "
                  f"{time.perf_counter() - t0:.1f}s" if reason is None else f"unused: {reason}")
    peak = matmul_peak_gflops(device)
    report = {"machine": _machine(device), "torch": str(torch.__version__),
              "threads": torch.get_num_threads(), "bf16_matmul_peak_gflops": peak,
              "decode_seconds_once": decode_s, "cached_load_seconds": load_s, "native_kernels": native,
              "configs": []}
    print(f"# {report['machine']} | torch {report['torch']} | bf16 matmul peak {peak:,.0f} GFLOP/s | "
          f"first decode {decode_s:.1f}s, cached load {load_s:.1f}s | native kernels: {native}", flush=True)
    for overrides in grid:
        runs = []
        flops = None   # the same for every seed of a config; counting it costs seconds on a GPU box
        for seed in range(a.seed_start, a.seed_start + a.seeds):
            r = run_once(a.data, seed, overrides, tuple(m for m in a.extra_tta.split(",") if m))
            cfg = r.pop("cfg")
            flops = flops or run_flops(cfg, r["n_train"])
            r["achieved_gflops"] = flops / r["train_seconds"] / 1e9
            runs.append(r)
            print(f"{json.dumps(overrides)} seed {seed}: val {r['val_acc']:.4f} | train {r['train_seconds']:.1f}s "
                  f"+ eval {r['eval_seconds']:.1f}s | {r['images_per_s']:,.0f} img/s | "
                  f"{r['achieved_gflops']:,.0f} GFLOP/s"
                  + "".join(f" | {m} {v:.4f}" for m, v in r["val_acc_other_tta"].items()), flush=True)
        accs = [r["val_acc"] for r in runs]
        secs = [r["seconds"] for r in runs]
        summary = {"overrides": overrides, "runs": runs,
                   "val_acc_mean": statistics.mean(accs),
                   "val_acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                   "seconds_mean": statistics.mean(secs),
                   "seconds_median": statistics.median(secs),
                   "achieved_gflops_median": statistics.median(r["achieved_gflops"] for r in runs),
                   "val_acc_mean_other_tta": {m: statistics.mean(r["val_acc_other_tta"][m] for r in runs)
                                              for m in runs[0]["val_acc_other_tta"]}}
        report["configs"].append(summary)
        if a.json:  # after every config, so a run cut short still leaves its results
            a.json.write_text(json.dumps(report, indent=2))
        print(f"== {json.dumps(overrides)}: val acc {summary['val_acc_mean']:.4f} ± {summary['val_acc_std']:.4f} "
              f"(n={len(runs)}) | {summary['seconds_mean']:.1f}s train+eval | "
              f"{summary['achieved_gflops_median']:,.0f} GFLOP/s"
              + "".join(f" | {m} {v:.4f}" for m, v in summary["val_acc_mean_other_tta"].items()), flush=True)
    return 0


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # A virtual machine's model name can be as bare as "AMD EPYC": family and model tell Zen 3
    # (25/1) from Zen 4 (25/17) and Zen 5 (26/...), and the bf16 units say which precision is fast.
    info = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
            if line.strip() == "":
                break
    except OSError:
        return platform.processor()
    flags = info.get("flags", "").split()
    bf16 = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags
            else "AVX-512, no bf16" if "avx512f" in flags else "AVX2, no bf16" if "avx2" in flags
            else "no AVX2")
    return (f"{info.get('model name', platform.processor())} (family {info.get('cpu family', '?')} "
            f"model {info.get('model', '?')}, {bf16}; {len(os.sched_getaffinity(0))} cores)")


if __name__ == "__main__":
    sys.exit(main())
