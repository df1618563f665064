"""What a fresh machine's first `cifarkit train --recipe fast` spends before training: building the
native kernels, then timing them against PyTorch's ops on the recipe's shapes (kernels.choose).
Both are once per machine (cached beside the build), so they count in the first run's wall time only.

    python benchmarks/kernel_setup.py                       # build from scratch, then time the shapes
    python benchmarks/kernel_setup.py --source old.cpp --source src/cifarkit/csrc/native.cpp --repeats 2
    git worktree add /tmp/old d8d132c   # a build through torch.utils.cpp_extension against this one:
    python benchmarks/kernel_setup.py --tree /tmp/old --tree . --repeats 2
    python benchmarks/kernel_setup.py --no-build --drop inf --drop 1.5   # the chooser with and without dropping
    python benchmarks/kernel_setup.py --no-build --grads --screen inf --screen 3
    git worktree add /tmp/old 8a0fdcb   # then this chooser against that older one:
    python benchmarks/kernel_setup.py --no-build --repeats 2 --tree /tmp/old --tree .
    python benchmarks/kernel_setup.py --no-build --reference 12 --timings 5 --timings 3   # picks judged

Each build runs in a fresh process with an empty TORCH_EXTENSIONS_DIR (trees and sources alternate;
a `--source` must suit the tree's way of building it), and then
times a few of the built kernels (a faster build must not give slower code); each
chooser timing runs in a fresh process (the variants alternating, `--repeats` rounds with
`--no-build`) and writes to an empty cache file. `--drop` sets kernels.DROP (inf: every
implementation timed `repeats` times, as before 2026-12-06), `--screen` kernels.SCREEN (inf: none
left out after its warm-up, as at commit 8a0fdcb).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BUILD = """
import os, sys, tempfile, time
from pathlib import Path
os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp()
sys.path.insert(0, sys.argv[1])
import torch
from cifarkit import kernels
if sys.argv[2]:
    kernels.SOURCE = Path(sys.argv[2]).resolve()
t = time.perf_counter()
reason = kernels.load()
if reason is not None:
    sys.exit("failed: " + reason)
line = f"{time.perf_counter() - t:.1f} s"
# the built kernels' speed, so that a faster build is seen not to give slower code: the cases of
# benchmarks/native_ab.py (which times two builds in one process), the fastest of 15 each (this
# machine's stalls only add)
sys.path.insert(0, sys.argv[3])
from native_ab import cases
m = kernels._state["module"]
def fastest_ms(fn):
    fn(m)
    ts = []
    for _ in range(15):
        t = time.perf_counter(); fn(m); ts.append(time.perf_counter() - t)
    return min(ts) * 1e3
ops = [(name, fastest_ms(fn)) for name, fn in cases(m)]
print(line + " | " + ", ".join(f"{k} {v:.2f} ms" for k, v in ops))
"""


GRADS = """
import sys, time
import torch
sys.path.insert(0, sys.argv[1])
from cifarkit import kernels
from cifarkit.config import resolve
from cifarkit.models import create_model
cfg = resolve("fast", overrides={"epochs": int(sys.argv[2])})
models = [create_model(cfg.model, 10, **cfg.model_args)]
shapes = sorted({v[1:] for v in kernels._shapes(models, sorted(set(cfg.progressive) | {cfg.image_size})).values()
                 if v[0] == "wgrad"}, key=lambda s: (-s[2], s[0], s[1]))
g, cl, batch = torch.Generator().manual_seed(0), torch.channels_last, min(cfg.batch_size, 256)
def fastest_ms(fns, rounds=15):
    # in turns, the fastest of each (as kernels.choose times): this 2-core machine's stalls only add
    ts = [[] for _ in fns]
    for r in range(rounds + 1):
        for t, fn in zip(ts, fns):
            t0 = time.perf_counter(); fn(); t.append(time.perf_counter() - t0)
    return [min(t[1:]) * 1e3 for t in ts]
for ci, co, h, w in shapes[::max(1, len(shapes) // 7)]:
    x = torch.randn(batch, ci, h, w, generator=g).bfloat16().contiguous(memory_format=cl)
    wt = torch.randn(co, ci, 3, 3, generator=g).bfloat16().contiguous(memory_format=cl)
    gy = torch.randn(batch, co, h, w, generator=g).bfloat16().contiguous(memory_format=cl)
    def bwd(mask):
        return lambda: kernels._pytorch_conv3x3_backward(x, wt, gy, mask)
    both, gx, gw = fastest_ms([bwd([True, True, False]), bwd([True, False, False]), bwd([False, True, False])])
    print(f"grads {ci}->{co} {h}x{w}px: both in one call {both:.2f} ms, input {gx:.2f} + weight {gw:.2f} ms, "
          f"ratio {both / (gx + gw):.3f}", flush=True)
"""


CHOOSE = """
import json, sys, tempfile, time
from pathlib import Path
src, drop, screen, epochs, repeats = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, src)
from cifarkit import kernels
from cifarkit.config import resolve
from cifarkit.models import create_model
if kernels.load() is not None:
    sys.exit(f"native kernels unavailable: {kernels.load()}")
cfg = resolve("fast", overrides={"epochs": epochs})
models = [create_model(cfg.model, 10, **cfg.model_args),
          create_model(cfg.model, 10, **cfg.proxy_model_args())]
sizes = sorted(set(cfg.progressive) | {cfg.image_size})
screened = hasattr(kernels, "SCREEN")           # (a tree from before SCREEN has none)
kernels.DROP, kernels.SCREEN = drop, screen
cache = Path(tempfile.mkdtemp()) / "choices.json"
t = time.perf_counter()
extra = {"repeats": int(repeats)} if repeats else {}   # else the chooser's own default
got = kernels.choose(models, sizes, batch=min(cfg.batch_size, 256), cache=cache, **extra)
seconds = time.perf_counter() - t
# per shape, each implementation's time (ms) as the cache keeps it
impls = ("pytorch", "native", "matmul", "gemm")
cached = json.loads(cache.read_text())
entries = {key: {k: v for k, v in e.items() if k in impls} for key, e in cached.items()}
# how many of the timings were of an implementation over 1.5x its shape's fastest
slow = sum(t > 1.5 * min(ms.values()) for ms in entries.values() for t in ms.values())
# the whole convolution as matrix products against its shape's fastest, by image side
gemm = {}
for key, ms in entries.items():
    if "gemm" in ms:
        side = int(key.rsplit(" ", 1)[1].split("x")[0])
        gemm.setdefault(side, []).append(ms["gemm"] / min(ms.values()))
print(json.dumps({"seconds": seconds, "got": got, "slow": slow, "total": sum(map(len, entries.values())),
                  "gemm": {s: (min(r), max(r)) for s, r in sorted(gemm.items())},
                  "screen": screen if screened else None,
                  "entries": entries, "use": {k: e["use"] for k, e in cached.items()}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="append", type=Path,
                    help="a native.cpp to build (repeat to compare; default: the package's)")
    ap.add_argument("--repeats", type=int, default=1, help="builds of each source, alternating")
    ap.add_argument("--no-build", action="store_true", help="only time the chooser")
    ap.add_argument("--drop", action="append", type=float,
                    help="kernels.DROP for a chooser timing (repeat to compare; default: the package's)")
    ap.add_argument("--screen", action="append", type=float,
                    help="kernels.SCREEN for a chooser timing (repeat to compare; inf: no screening)")
    ap.add_argument("--tree", action="append", type=Path,
                    help="a cifarkit checkout whose chooser to time (repeat to compare, e.g. a "
                         "`git worktree` of an older commit; default: this one)")
    ap.add_argument("--grads", action="store_true",
                    help="also time PyTorch's convolution backward with both gradients in one call "
                         "against each alone (what the chooser's shared timing assumes)")
    ap.add_argument("--epochs", type=int, default=13, help="the recipe's --epochs (sets its image sizes)")
    ap.add_argument("--timings", action="append", type=int,
                    help="the chooser's timed runs per implementation (`repeats`; repeat to compare)")
    ap.add_argument("--reference", type=int, default=0,
                    help="first time every implementation this many times (no dropping or screening), "
                         "then judge each chooser's picks by those times: how much slower than the "
                         "fastest picks (summed over the shapes)")
    args = ap.parse_args()

    import torch
    from cifarkit import kernels
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fast_recipe import _machine   # the same CPU line as the recipe runs report
    print(f"# {_machine(torch.device('cpu'))} | torch {torch.__version__} | {torch.get_num_threads()} threads")
    trees = [t.resolve() for t in args.tree or [Path(__file__).resolve().parents[1]]]
    if not args.no_build:
        for r in range(args.repeats):
            for tree in trees:
                for src in args.source or [None]:
                    out = subprocess.run([sys.executable, "-c", BUILD, str(tree / "src"), str(src or ""),
                                          str(Path(__file__).resolve().parent)], capture_output=True, text=True)
                    print(f"build ({tree.name}) {src or 'its native.cpp'}: "
                          f"{out.stdout.strip() or out.stderr.strip()[-300:]}", flush=True)
    if args.grads:
        out = subprocess.run([sys.executable, "-c", GRADS, str(Path(__file__).resolve().parents[1] / "src"),
                              str(args.epochs)], capture_output=True, text=True)
        print(out.stdout.strip() or out.stderr.strip()[-300:], flush=True)
    # each chooser timing in a fresh process, as a first run times it; the variants alternate
    variants = [(tree, drop, screen, timings) for tree in trees for drop in args.drop or [kernels.DROP]
                for screen in args.screen or [kernels.SCREEN] for timings in args.timings or [None]]
    reference = None
    if args.reference:
        out = subprocess.run([sys.executable, "-c", CHOOSE, str(trees[-1] / "src"), "inf", "inf", str(args.epochs),
                              str(args.reference)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"reference timing failed: {out.stderr.strip()[-300:]}")
        reference = json.loads(out.stdout.strip().splitlines()[-1])["entries"]
        best = sum(min(ms.values()) for ms in reference.values())
        print(f"reference: every implementation timed {args.reference} times; the fastest of each shape "
              f"add up to {best:.0f} ms", flush=True)
    for r in range(args.repeats if args.no_build else 1):
        for tree, drop, screen, timings in variants:
            out = subprocess.run([sys.executable, "-c", CHOOSE, str(tree / "src"), str(drop), str(screen),
                                  str(args.epochs), str(timings or "")], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"choose {tree}: failed: {out.stderr.strip()[-300:]}", flush=True)
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            got = res["got"]
            by = ", ".join(f"{k} {v}" for k, v in sorted(got.get("wgrad_by", {}).items()))
            print(f"choose ({tree.name}, DROP {drop}, SCREEN {res['screen'] or 'none'}, "
                  f"{timings or 'default'} timed runs): {res['seconds']:.1f} s for "
                  f"{got['timed']} shapes | pool native {got['pool'][0]}/{got['pool'][1]}, bn+gelu native "
                  f"{got['bngelu'][0]}/{got['bngelu'][1]}, conv weight gradient: {by} | {res['slow']} of "
                  f"{res['total']} timings over 1.5x their shape's fastest", flush=True)
            print("  whole convolution as matrix products / the fastest, by image side: " + ", ".join(
                f"{s} px {lo:.2f}-{hi:.2f}" for s, (lo, hi) in res["gemm"].items()), flush=True)
            if reference is not None:   # the picks, timed by the reference: the cost of a wrong one
                judged = {k: use for k, use in res["use"].items() if use in reference.get(k, {})}
                picked = sum(reference[k][use] for k, use in judged.items())
                best = sum(min(reference[k].values()) for k in judged)
                worst = max((reference[k][use] / min(reference[k].values()), k) for k, use in judged.items())
                print(f"  by the reference's times the picks ({len(judged)} shapes) take {picked / best:.4f}x the fastest picks; "
                      f"the worst pick: {worst[0]:.3f}x on {worst[1]}", flush=True)

if __name__ == "__main__":
    main()
