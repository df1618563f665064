"""The fp32 C++ weight gradient of this checkout against the one of an older native.cpp, and
against PyTorch's (oneDNN's), on the fast network's 3x3 convolutions at 32 px, in one process,
calls in turns; checks that both C++ builds give bit-identical results.

    git show c04f556:src/cifarkit/csrc/native.cpp > /tmp/old_native.cpp
    python benchmarks/wgrad32_ab.py --old-source /tmp/old_native.cpp [--batch 1000] [--rounds 7]

Both sources are compiled as cifarkit compiles its own (kernels.CXXFLAGS, called through ctypes).
Prints per layer the median and the fastest of `--rounds` calls of each (this 2-core machine's
stalls only add time), their GFLOP/s and the ratio new / old. Needs a CPU with AVX2 and FMA.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def build(source: Path, out: Path):
    from cifarkit import kernels
    cmd = [os.environ.get("CXX", "c++"), *kernels.CXXFLAGS, str(source), "-o", str(out)]
    subprocess.run(cmd, check=True)
    module = kernels._Native(out)
    if not module.has_conv3x3_wgrad32():
        sys.exit(f"{source}: built without the fp32 weight gradient (this CPU has no AVX2 and FMA)")
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-source", required=True, type=Path, help="an older csrc/native.cpp")
    ap.add_argument("--batch", type=int, default=1000, help="images (sprint trains 1000 of 2000 at 32 px)")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torch

    from cifarkit import kernels
    from cifarkit.device import set_threads
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fast_recipe import _machine   # the CPU line (model, family, bf16 units) the recipe runs report
    from winograd_probe import LAYERS  # the fast recipe's 3x3 convolutions at 32 px
    set_threads()
    with tempfile.TemporaryDirectory() as tmp:
        new = build(kernels.SOURCE, Path(tmp) / "new.so")
        old = build(args.old_source, Path(tmp) / "old.so")
        print(f"# python benchmarks/wgrad32_ab.py --old-source {args.old_source} --batch {args.batch} "
              f"--rounds {args.rounds}")
        print(f"# {_machine(torch.device('cpu'))}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; ms per call: median / fastest of {args.rounds}, GFLOP/s of the median")
        gen = torch.Generator().manual_seed(0)
        totals = {"pytorch": 0.0, "old": 0.0, "new": 0.0}
        for ci, co, side in LAYERS:
            x = torch.randn(args.batch, ci, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
            g = torch.randn(args.batch, co, side, side, generator=gen).contiguous(memory_format=torch.channels_last)
            w = torch.zeros(co, ci, 3, 3).contiguous(memory_format=torch.channels_last)
            fns = {"pytorch": lambda: kernels._pytorch_wgrad(x, w, g),
                   "old": lambda: old.conv3x3_wgrad32(x, g), "new": lambda: new.conv3x3_wgrad32(x, g)}
            same = torch.equal(fns["old"](), fns["new"]())
            times = {k: [] for k in fns}
            for k in fns:   # warm-up
                fns[k]()
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append((time.perf_counter() - t0) * 1e3)
            flop = 2 * args.batch * side * side * ci * co * 9
            med = {k: statistics.median(v) for k, v in times.items()}
            for k in totals:
                totals[k] += med[k]
            cells = " | ".join(f"{k} {med[k]:7.1f} / {min(times[k]):7.1f} ms ({flop / med[k] / 1e6:4.0f})" for k in fns)
            print(f"{ci:3d}->{co:3d} {side:2d}x{side:<2d} {cells} | new/old {med['new'] / med['old']:.2f} "
                  f"| bit-identical {same}", flush=True)
        print("all layers (sum of medians): " + " | ".join(f"{k} {v:.1f} ms" for k, v in totals.items())
              + f" | new/old {totals['new'] / totals['old']:.2f} | new/pytorch {totals['new'] / totals['pytorch']:.2f}")


if __name__ == "__main__":
    main()
