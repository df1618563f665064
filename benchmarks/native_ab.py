"""The native kernels as cifarkit builds them now (csrc/native.cpp compiled on its own and called
through ctypes) against an older native.cpp built as a PyTorch extension (torch.utils.cpp_extension,
as cifarkit did until 2026-12-06), in one process, calls in turns: a faster build must not give
slower kernels.

    git show d8d132c:src/cifarkit/csrc/native.cpp > /tmp/old_native.cpp
    python benchmarks/native_ab.py --old-source /tmp/old_native.cpp

Prints, per kernel and shape, the fastest of `--rounds` calls of each (this 2-core machine's stalls
only add time) and their ratio (now / before). Needs ninja for the old build.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def cases(module) -> list:
    """[(name, fn(kernels))]: the weight gradient on three of the fast recipe's layers (batch 256,
    as the chooser times), the fused batch norm + GELU and the max-pool forward and backward at
    three sizes (batch 1000), inputs built with ``module`` (either build will do)."""
    import torch
    g, cl = torch.Generator().manual_seed(0), torch.channels_last

    def rand(*shape):
        return torch.randn(*shape, generator=g).bfloat16().contiguous(memory_format=cl)
    found = []
    if module.has_conv3x3_wgrad():
        for ci, co, h in ((64, 224, 15), (224, 224, 7), (320, 320, 3)):
            x, gy = rand(256, ci, h, h), rand(256, co, h, h)
            found.append((f"wgrad {ci}->{co} {h}px", lambda m, x=x, gy=gy: m.conv3x3_wgrad(x, gy)))
    for c, h in ((64, 32), (224, 16), (320, 8)):
        x, w, b = rand(1000, c, h, h), torch.ones(c), torch.zeros(c)
        y, mean, _, rstd = module.bn_gelu_fwd(x, w, b, 1e-12)
        out, code = module.pool_fwd(x, True)
        found += [(f"bn+gelu fwd {c}ch {h}px", lambda m, x=x, w=w, b=b: m.bn_gelu_fwd(x, w, b, 1e-12)),
                  (f"bn+gelu bwd {c}ch {h}px",
                   lambda m, x=x, w=w, b=b, y=y, mean=mean, rstd=rstd: m.bn_gelu_bwd(y, x, mean, rstd, w, b)),
                  (f"pool fwd {c}ch {h}px", lambda m, x=x: m.pool_fwd(x, True)),
                  (f"pool bwd {c}ch {h}px", lambda m, out=out, code=code, h=h: m.pool_bwd(out, code, h, h))]
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-source", type=Path, required=True, help="a native.cpp written for torch.utils.cpp_extension")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()

    import torch
    from torch.utils.cpp_extension import load as build
    from cifarkit import kernels
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fast_recipe import _machine
    print(f"# {_machine(torch.device('cpu'))} | torch {torch.__version__} | {torch.get_num_threads()} threads")
    old = build("cifarkit_native_old_ab", sources=[str(args.old_source.resolve())], build_directory=tempfile.mkdtemp(),
                extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    if kernels.load() is not None:
        sys.exit(f"native kernels unavailable: {kernels.load()}")
    new = kernels._state["module"]
    for name, fn in cases(new):
        ts = {"before": [], "now": []}
        for _ in range(args.rounds + 1):
            for k, m in (("before", old), ("now", new)):
                t = time.perf_counter()
                fn(m)
                ts[k].append(time.perf_counter() - t)
        before, now = (min(ts[k][1:]) * 1e3 for k in ("before", "now"))
        print(f"{name}: before {before:.2f} ms, now {now:.2f} ms, ratio {now / before:.3f}", flush=True)


if __name__ == "__main__":
    main()
