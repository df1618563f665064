"""What a fresh machine's first `cifarkit train --recipe fast` spends before training: building the
native kernels, then timing them against PyTorch's ops on the recipe's shapes (kernels.choose).
Both are once per machine (cached beside the build), so they count in the first run's wall time only.

    python benchmarks/kernel_setup.py                       # build from scratch, then time the shapes
    python benchmarks/kernel_setup.py --source old.cpp --source src/cifarkit/csrc/native.cpp --repeats 2
    python benchmarks/kernel_setup.py --no-build --drop inf --drop 1.5   # the chooser with and without dropping

Each build runs in a fresh process with an empty TORCH_EXTENSIONS_DIR (sources alternate), and then
times a few of the built kernels (a faster build must not give slower code); each
chooser timing writes to an empty cache file. `--drop` sets kernels.DROP (inf: every implementation
timed `repeats` times, as before 2026-12-06).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD = """
import os, sys, tempfile, time
from pathlib import Path
os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp()
import torch
from cifarkit import kernels
kernels.SOURCE = Path(sys.argv[1])
t = time.perf_counter()
reason = kernels.load()
if reason is not None:
    sys.exit("failed: " + reason)
line = f"{time.perf_counter() - t:.1f} s"
# the built kernels' speed, so that a faster build is seen not to give slower code: the weight
# gradient on three of the recipe's layers (batch 256) and the fused batch norm + GELU, medians of 7
m, g, cl = kernels._state["module"], torch.Generator().manual_seed(0), torch.channels_last
def median_ms(fn):
    fn()
    ts = []
    for _ in range(7):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return sorted(ts)[3] * 1e3
ops = []
if m.has_conv3x3_wgrad():
    for ci, co, h in ((64, 224, 15), (224, 224, 7), (320, 320, 3)):
        x = torch.randn(256, ci, h, h, generator=g).bfloat16().contiguous(memory_format=cl)
        gy = torch.randn(256, co, h, h, generator=g).bfloat16().contiguous(memory_format=cl)
        ops.append((f"wgrad {ci}->{co} {h}px", median_ms(lambda: m.conv3x3_wgrad(x, gy))))
x = torch.randn(1000, 64, 16, 16, generator=g).bfloat16().contiguous(memory_format=cl)
w, b = torch.ones(64), torch.zeros(64)
ops.append(("bn+gelu 64ch 16px", median_ms(lambda: m.bn_gelu_fwd(x, w, b, 1e-12))))
print(line + " | " + ", ".join(f"{k} {v:.2f} ms" for k, v in ops))
"""


def time_choose(drop: float, epochs: int) -> tuple[float, dict, tuple[int, int]]:
    from cifarkit import kernels
    from cifarkit.config import resolve
    from cifarkit.models import create_model
    if kernels.load() is not None:
        raise SystemExit(f"native kernels unavailable: {kernels.load()}")
    cfg = resolve("fast", overrides={"epochs": epochs})
    models = [create_model(cfg.model, 10, **cfg.model_args),
              create_model(cfg.model, 10, **cfg.proxy_model_args())]
    sizes = sorted(set(cfg.progressive) | {cfg.image_size})
    kernels.DROP = drop
    cache = Path(tempfile.mkdtemp()) / "choices.json"
    t = time.perf_counter()
    got = kernels.choose(models, sizes, batch=min(cfg.batch_size, 256), cache=cache)
    seconds = time.perf_counter() - t
    # how many of the timings were of an implementation over 1.5x its shape's fastest
    timings = [[v for k, v in e.items() if k in ("pytorch", "native", "matmul", "gemm")]
               for e in json.loads(cache.read_text()).values()]
    slow = sum(t > 1.5 * min(ms) for ms in timings for t in ms)
    return seconds, got, (slow, sum(map(len, timings)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", action="append", type=Path,
                    help="a native.cpp to build (repeat to compare; default: the package's)")
    ap.add_argument("--repeats", type=int, default=1, help="builds of each source, alternating")
    ap.add_argument("--no-build", action="store_true", help="only time the chooser")
    ap.add_argument("--drop", action="append", type=float,
                    help="kernels.DROP for a chooser timing (repeat to compare; default: the package's)")
    ap.add_argument("--epochs", type=int, default=13, help="the recipe's --epochs (sets its image sizes)")
    args = ap.parse_args()

    import torch
    from cifarkit import kernels
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fast_recipe import _machine   # the same CPU line as the recipe runs report
    print(f"# {_machine(torch.device('cpu'))} | torch {torch.__version__} | {torch.get_num_threads()} threads")
    if not args.no_build:
        sources = args.source or [kernels.SOURCE]
        for r in range(args.repeats):
            for src in sources:
                out = subprocess.run([sys.executable, "-c", BUILD, str(src)], capture_output=True,
                                     text=True)
                print(f"build {src}: {out.stdout.strip() or out.stderr.strip()[-300:]}", flush=True)
    for drop in args.drop or [kernels.DROP]:
        seconds, got, (slow, total) = time_choose(drop, args.epochs)
        by = ", ".join(f"{k} {v}" for k, v in sorted(got.get("wgrad_by", {}).items()))
        print(f"choose (DROP {drop}): {seconds:.1f} s for {got['timed']} shapes | "
              f"pool native {got['pool'][0]}/{got['pool'][1]}, bn+gelu native {got['bngelu'][0]}/"
              f"{got['bngelu'][1]}, conv weight gradient: {by} | {slow} of {total} timings over "
              f"1.5x their shape's fastest", flush=True)


if __name__ == "__main__":
    main()
