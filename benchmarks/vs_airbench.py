"""cifarkit's fast recipe side by side with airbench94, on the same split and the same machine.

airbench (KellerJordan/cifar10-airbench) is the reference for fast CIFAR-10 training. Its package
(`pip install airbench`: never a cifarkit dependency; `make bench-env` makes a `.venv-bench` with
both) ships `train94`, which is CUDA-only: it calls `.half().cuda()`, times with CUDA events and
loads its data onto GPU 0. On a CPU this script maps device and dtype *around* the package,
without editing or copying it: its network stays on the CPU in fp32 and runs its forward passes
under bf16 autocast (cifarkit's own precision there; the whitening set-up stays in fp32, as on the
GPU), tensor `.half()` becomes `.bfloat16()`, CUDA events become a wall clock, and its data loader
reads from the CPU. On a CPU without native bf16 (no AVX-512 BF16 or AMX, e.g. AMD Zen 3) bf16 is
emulated and slow, and cifarkit's `auto` precision is fp32 there: airbench then runs in fp32 too
(`--airbench-precision`, default `auto`: the same rule as cifarkit's). On a GPU it runs as shipped.

Both train on the same images and are scored on the same held-out ones: for each seed, the
`--val-size` images that `cifarkit train --seed S` holds out (stratified by class) are written in
airbench's own `cifar10/test.pt` format, the rest as `train.pt`. With `--val-size 0` both train on
everything (what a user ships) and only times are compared. Every run is a fresh process; the two
alternate, seed by seed. Counted like airbench counts itself: training plus the final
test-time-augmented evaluation (cifarkit: `train_seconds` plus the last epoch's validation);
cifarkit's whole wall time (start-up, data load, kernels, checkpoints) is reported beside it.

airbench's fastest published recipe (airbench94 with Muon, 2.59 s on an A100) is not in the
package; its time is taken as 0.68x of the package's `train94` (3.83 s on the same A100).
`--muon-record` adds a third side that estimates it on this machine instead: cifarkit itself
trains with that recipe's published settings (MUON_RECORD_CONFIG: train94's 64/256/256 network,
8 epochs at 32 px, batch 2000, every image trained; the fast recipe already shares its optimiser,
augmentation and evaluation). That is cifarkit's code, not airbench's: an estimate of the record's
time and accuracy here, reported beside the 0.68x share, never in its place.

    make bench-env
    .venv-bench/bin/python benchmarks/vs_airbench.py --data ../shared/data/cifar10-jpeg --seeds 3 [--json out.json]
    .venv-bench/bin/python benchmarks/vs_airbench.py --data DIR --seeds 1 --val-size 0
    .venv-bench/bin/python benchmarks/vs_airbench.py --data DIR --seeds 3 --cifarkit-args "--recipe sprint"
    .venv-bench/bin/python benchmarks/vs_airbench.py --data DIR --seeds 1 --cifarkit-args "--epochs 13" --muon-record
    .venv-bench/bin/python benchmarks/vs_airbench.py --flops --cifarkit-args "--epochs 13" [--muon-record]   # arithmetic only
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MUON_RECORD_SHARE = 2.59 / 3.83   # airbench94 with Muon against the package's train94, same A100

# airbench94_muon.py's settings as cifarkit config keys on top of `--recipe fast` (whose optimiser
# settings, label smoothing 0.2, alternating flip, 2 px translation and flip+translate TTA are that
# recipe's already): its network is train94's (widths 64/256/256, two convolutions per group, no
# residual), trained 8 epochs at 32 px on every image of each 2,000-image batch.
MUON_RECORD_CONFIG = {
    "model_args": {"widths": [64, 256, 256], "depths": [2, 2, 2], "residual": False},
    "epochs": 8,              # its total_train_steps: 8 epochs
    "progressive": [],        # every epoch at 32 px
    "hard_fraction": 1.0,     # every image of the batch trained
    "hard_proxy": [],         # no proxy network
}


def write_airbench_data(data: str, seed: int, val_size: int, dest: Path) -> dict:
    """cifarkit's split of ``data`` for ``seed`` in airbench's format: DEST/cifar10/{train,test}.pt."""
    import torch

    from cifarkit.data import load_data, stratified_split

    bundle = load_data(data, progress=False)
    x, y = bundle.train.x, bundle.train.y
    tr, va = stratified_split(y, val_size, seed)
    if val_size == 0:   # airbench's train() always builds a test loader: give it a few images
        va = tr[:1000]
    root = dest / "cifar10"
    root.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train.pt", tr), ("test.pt", va)):
        torch.save({"images": x[idx].permute(0, 2, 3, 1).contiguous(), "labels": y[idx],
                    "classes": list(bundle.classes)}, root / name)
    return {"n_train": len(tr), "n_val": 0 if val_size == 0 else len(va)}


@contextlib.contextmanager
def on_cpu(precision: str = "bf16"):
    """airbench's CUDA calls, mapped onto the CPU for the duration of the block (its fp16 in
    ``precision``: bf16 autocast, or fp32 throughout)."""
    import torch
    import airbench.utils as utils

    class WallClockEvent:          # stands in for torch.cuda.Event(enable_timing=True)
        def __init__(self, *a, **k):
            self.t = None

        def record(self, *a):
            self.t = time.perf_counter()

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class CpuLoader(utils.CifarLoader):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "gpu": "cpu"})

    saved = (torch.nn.Module.cuda, torch.nn.Module.half, torch.Tensor.half, torch.cuda.Event,
             torch.cuda.synchronize, utils.CifarLoader)
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.nn.Module.half = lambda self: self                  # fp32 weights (bf16: under autocast)
    if precision == "bf16":
        torch.Tensor.half = lambda self, *a, **k: self.bfloat16()   # its fp16 images: bf16
    else:
        torch.Tensor.half = lambda self, *a, **k: self.float()      # fp32 throughout
    torch.cuda.Event, torch.cuda.synchronize = WallClockEvent, lambda *a: None
    utils.CifarLoader = CpuLoader
    try:
        yield CpuLoader
    finally:
        (torch.nn.Module.cuda, torch.nn.Module.half, torch.Tensor.half, torch.cuda.Event,
         torch.cuda.synchronize, utils.CifarLoader) = saved


def make_net_bf16():
    """airbench94's network (fp32 weights on the CPU) whose forward runs under bf16 autocast."""
    import torch
    import airbench

    net = airbench.make_net94()
    forward = net.forward

    def autocast_forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(x)
    net.forward = autocast_forward   # on the instance: its layers, names and indexing unchanged
    return net


def cpu_precision(asked: str) -> str:
    """airbench's precision on the CPU: ``auto`` follows cifarkit's own rule (bf16 only where the
    CPU does it natively), so each side runs in what is fast on the machine."""
    if asked != "auto":
        return asked
    from cifarkit.device import cpu_has_fast_bf16
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def airbench_child(data_dir: Path, seed: int, score: bool, precision: str = "bf16") -> dict:
    """One airbench94 run (its package's train94 and hyper-parameters) in this process."""
    import torch
    import airbench
    from airbench.lib_airbench94 import hyp

    os.chdir(data_dir)                      # its loaders read ./cifar10/{train,test}.pt
    torch.manual_seed(seed)
    cuda = torch.cuda.is_available()
    if not cuda:
        from cifarkit.device import set_threads
        set_threads(0)
    with (contextlib.nullcontext(airbench.CifarLoader) if cuda else on_cpu(precision)) as Loader:
        loader = Loader("cifar10", train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"],
                        altflip=True)
        test = Loader("cifar10", train=False, batch_size=2000)
        if cuda:   # as airbench times itself: after a warm-up run that builds cuDNN's plans
            airbench.warmup94(train_loader=loader, verbose=False)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = airbench.train94(train_loader=loader, verbose=False,
                                 make_net=make_net_bf16 if not cuda and precision == "bf16"
                                 else airbench.make_net94)
        if cuda:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        acc = airbench.evaluate(model, test, tta_level=hyp["net"]["tta_level"]) if score else None
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
    return {"val_acc": acc, "train_seconds": t1 - t0, "eval_seconds": t2 - t1 if score else 0.0,
            "seconds": (t2 if score else t1) - t0}


def muon_record_args(tmp: str) -> list[str]:
    """cifarkit train flags for MUON_RECORD_CONFIG (model_args only exist in YAML): --config FILE."""
    import yaml

    path = Path(tmp, "muon-record.yaml")
    path.write_text(yaml.safe_dump(MUON_RECORD_CONFIG))
    return ["--config", str(path)]


def cifarkit_run(data: str, seed: int, val_size: int, extra: list[str], muon_record: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cifarkit", "train", "--recipe", "fast", "--data", data,
               "--seed", str(seed), "--val-size", str(val_size), "--out", tmp + "/run", "--quiet",
               "--no-tensorboard", *(muon_record_args(tmp) if muon_record else extra)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        s = json.loads(Path(tmp, "run", "summary.json").read_text())
        last = [json.loads(l) for l in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()][-1]
    final_eval = last.get("val_seconds", 0.0)
    return {"val_acc": s["final_val_acc"], "train_seconds": s["train_seconds"],
            "eval_seconds": final_eval, "seconds": s["train_seconds"] + final_eval,
            "all_validation_seconds": s["eval_seconds"], "wall_seconds": wall,
            "summary_wall_seconds": s["wall_seconds"], "n_train": s["n_train"], "n_val": s["n_val"]}


def airbench_run(data: str, seed: int, val_size: int, precision: str = "bf16") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sizes = write_airbench_data(data, seed, val_size, Path(tmp))
        cmd = [sys.executable, __file__, "--airbench-child", tmp, "--seed", str(seed),
               "--airbench-precision", precision]
        if val_size == 0:
            cmd.append("--no-score")
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        wall = time.perf_counter() - t0
    return {**json.loads(out.strip().splitlines()[-1]), **sizes, "wall_seconds": wall}


def training_flops(cifarkit_args: list[str], n_train: int, muon_record: bool = False) -> dict:
    """Training FLOPs of a whole run of each side on ``n_train`` images (torch.utils.flop_counter;
    the final evaluation left out): cifarkit's as `cifarkit train --recipe fast ARGS` would run it
    (fast_recipe.run_flops: each epoch at its own size, selective backprop and its proxy counted),
    airbench94's as its package's train94 runs it (its network at 32 px, forward and backward,
    hyp's train_epochs x n_train images); with ``muon_record``, also MUON_RECORD_CONFIG's run."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    import airbench
    from airbench.lib_airbench94 import hyp

    from cifarkit.cli import build_parser, train_config
    from fast_recipe import run_flops

    cfg = train_config(build_parser().parse_args(["train", "--recipe", "fast", *cifarkit_args]))
    with on_cpu("fp32"):   # its make_net94 moves the network to CUDA in fp16
        net = airbench.make_net94()
        x = torch.randn(8, 3, 32, 32)
        with FlopCounterMode(display=False) as counter:
            F.cross_entropy(net(x), torch.zeros(8, dtype=torch.long)).backward()
    per_image = counter.get_total_flops() / 8
    out = {"cifarkit": run_flops(cfg, n_train),
           "airbench94": per_image * hyp["opt"]["train_epochs"] * n_train, "n_train": n_train}
    if muon_record:
        with tempfile.TemporaryDirectory() as tmp:
            rec = train_config(build_parser().parse_args(["train", "--recipe", "fast", *muon_record_args(tmp)]))
        out["muon-record"] = run_flops(rec, n_train)
    return out


def _stats(runs: list[dict], key: str) -> tuple[float, float]:
    vals = [r[key] for r in runs if r[key] is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="a folder DIR/train/<class>/*.jpg, or cifar10")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument("--val-size", type=int, default=5000,
                    help="images held out and scored (0: train both on everything, compare times)")
    ap.add_argument("--cifarkit-args", default="", help="extra flags for cifarkit train after --recipe fast, e.g. '--epochs 2' "
                                                      "('--recipe sprint' runs that recipe instead)")
    ap.add_argument("--json", type=Path, help="write every run and the summary here")
    ap.add_argument("--muon-record", action="store_true",
                    help="add a third side: airbench94_muon's settings trained by cifarkit (an estimate "
                         "of that record on this machine; see MUON_RECORD_CONFIG)")
    ap.add_argument("--airbench-precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="airbench's precision on a CPU (auto: bf16 where the CPU has native bf16, "
                         "else fp32, as cifarkit's auto)")
    ap.add_argument("--flops", action="store_true",
                    help="print each side's training FLOPs for a run on 50,000 - val-size images, train nothing")
    ap.add_argument("--airbench-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--no-score", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.airbench_child:
        print(json.dumps(airbench_child(a.airbench_child, a.seed, not a.no_score,
                                        cpu_precision(a.airbench_precision))))
        return 0
    try:
        import airbench  # noqa: F401
    except ImportError:
        print("error: airbench is not installed here -- run this with .venv-bench/bin/python "
              "(make bench-env), or pip install airbench into a benchmark environment", file=sys.stderr)
        return 1
    if a.flops:
        sys.path.insert(0, str(Path(__file__).parent))
        f = training_flops(a.cifarkit_args.split(), 50000 - a.val_size, a.muon_record)
        for who in ("cifarkit", "airbench94", "muon-record"):
            if who in f:
                print(f"{who:11} training FLOPs on {f['n_train']:,} images: {f[who] / 1e12:6.1f} TFLOP")
        print(f"cifarkit / airbench94: {f['cifarkit'] / f['airbench94']:.3f}")
        if "muon-record" in f:
            print(f"muon-record / airbench94: {f['muon-record'] / f['airbench94']:.3f}; "
                  f"cifarkit / muon-record: {f['cifarkit'] / f['muon-record']:.3f}")
        return 0
    if not a.data:
        ap.error("--data is required")
    import torch

    from cifarkit.data import load_data
    load_data(a.data, progress=False)        # decode once (cached) before anything is timed
    sys.path.insert(0, str(Path(__file__).parent))
    from fast_recipe import _machine
    machine = _machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    precision = cpu_precision(a.airbench_precision)   # what the child uses on a CPU
    shown = "as shipped" if torch.cuda.is_available() else precision
    print(f"# {machine} | torch {torch.__version__} | val-size {a.val_size} | airbench in "
          f"{shown}", flush=True)
    report = {"machine": machine, "torch": str(torch.__version__), "val_size": a.val_size,
              "cifarkit_args": a.cifarkit_args, "airbench_precision": shown, "runs": []}
    sides = ("airbench94", "cifarkit", "muon-record") if a.muon_record else ("airbench94", "cifarkit")
    if a.muon_record:
        report["muon_record_config"] = MUON_RECORD_CONFIG
    for seed in range(a.seed_start, a.seed_start + a.seeds):
        for who in (sides if seed % 2 == 0 else sides[::-1]):   # alternate who goes first
            r = (airbench_run(a.data, seed, a.val_size, precision) if who == "airbench94"
                 else cifarkit_run(a.data, seed, a.val_size, a.cifarkit_args.split(),
                                   muon_record=who == "muon-record"))
            r.update(who=who, seed=seed)
            report["runs"].append(r)
            acc = f"val {r['val_acc']:.4f}" if r["val_acc"] is not None else "val -"
            print(f"{who:11} seed {seed}: {acc} | train {r['train_seconds']:.1f}s + final eval "
                  f"{r['eval_seconds']:.1f}s = {r['seconds']:.1f}s | wall {r['wall_seconds']:.1f}s", flush=True)
            if a.json:
                a.json.write_text(json.dumps(report, indent=2))
    ck = [r for r in report["runs"] if r["who"] == "cifarkit"]
    summary = {}
    for who in sides:
        runs = [r for r in report["runs"] if r["who"] == who]
        acc, acc_sd = _stats(runs, "val_acc")
        sec, sec_sd = _stats(runs, "seconds")
        wall, _ = _stats(runs, "wall_seconds")
        summary[who] = {"val_acc_mean": acc, "val_acc_std": acc_sd, "seconds_mean": sec,
                        "seconds_std": sec_sd, "wall_seconds_mean": wall}
        print(f"== {who:11}: val {acc:.4f} ± {acc_sd:.4f} | {sec:.1f} ± {sec_sd:.1f}s train + final eval "
              f"| wall {wall:.1f}s (n={len(runs)})")
    ratio = summary["cifarkit"]["seconds_mean"] / summary["airbench94"]["seconds_mean"]
    summary["time_ratio_vs_train94"] = ratio
    summary["time_ratio_vs_muon_record"] = ratio / MUON_RECORD_SHARE
    summary["cifarkit_wall_over_training"] = (summary["cifarkit"]["wall_seconds_mean"]
                                             / statistics.mean(r["train_seconds"] for r in ck))
    print(f"== cifarkit / airbench94 time: {ratio:.3f} (against the Muon record, taken as "
          f"{MUON_RECORD_SHARE:.2f}x of train94: {summary['time_ratio_vs_muon_record']:.3f}); "
          f"cifarkit's wall time / its training time: {summary['cifarkit_wall_over_training']:.3f}")
    if a.muon_record:
        share = summary["muon-record"]["seconds_mean"] / summary["airbench94"]["seconds_mean"]
        summary["muon_record_share_measured"] = share
        summary["time_ratio_vs_muon_record_measured"] = (summary["cifarkit"]["seconds_mean"]
                                                         / summary["muon-record"]["seconds_mean"])
        print(f"== muon-record (cifarkit) / airbench94 time: {share:.3f} (the A100's share: "
              f"{MUON_RECORD_SHARE:.2f}); cifarkit / muon-record: "
              f"{summary['time_ratio_vs_muon_record_measured']:.3f}")
    report["summary"] = summary
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
