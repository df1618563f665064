"""cifarkit's fused batch norm + GELU (src/cifarkit/kernels.py ``bn_gelu``: training-mode batch
statistics, exact GELU, bf16 or fp32 channels_last CPU tensors) against PyTorch's two ops on the shapes of
the fast recipe's network and proxy, forward and backward, interleaved in one process (medians),
with the largest difference from a float64 reference for both. The whole-step effect:
`python benchmarks/step_variants.py --native --size S` (chosen-no-bngelu against chosen).

    python benchmarks/bn_gelu_kernel.py [--batch 1000] [--dtype fp32] [--trapping-math]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (channels, side) of the batch norms at 32 and 16 px: the recipe's network (64/224/320 channels
# after each group's pool) and its 16/64/64 proxy
SHAPES = [(64, 15), (224, 7), (320, 3), (64, 7), (224, 3), (320, 1), (16, 15), (64, 3)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1000, help="images (default 1000: the trained half of a 2000 batch)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="fp32: what training runs in on a CPU without native bf16")
    ap.add_argument("--trapping-math", action="store_true",
                    help="build the kernels without -fno-trapping-math (in a temporary folder): what the flag is worth")
    args = ap.parse_args()
    from cifarkit.device import set_threads
    set_threads(0)
    from cifarkit import kernels
    if args.trapping_math:
        import os
        import tempfile
        os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="cifarkit-trapping-")
        kernels.CXXFLAGS = tuple(f for f in kernels.CXXFLAGS if f != "-fno-trapping-math")
    reason = kernels.load()
    if reason is not None:
        raise SystemExit(f"native kernels unavailable: {reason}")
    cl = torch.channels_last
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16

    def pytorch(x, w, b):
        return F.gelu(F.batch_norm(x, None, None, w, b, True, 0.4, 1e-12))

    def native(x, w, b):
        return kernels._BNGELU.apply(x, w, b, 1e-12)[0]

    print(f"batch {args.batch}, {args.dtype} channels_last, {torch.get_num_threads()} threads, medians of {args.repeats} "
          f"interleaved (forward + backward to the input and the shift); built with {' '.join(kernels.CXXFLAGS)}")
    totals = {"pytorch": 0.0, "native": 0.0}
    for c, s in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, c, s, s, generator=g).to(dtype).contiguous(memory_format=cl)
        gy = torch.randn(args.batch, c, s, s, generator=g).to(dtype).contiguous(memory_format=cl)
        w, b = torch.ones(c), torch.zeros(c)
        x64 = x.double().requires_grad_()
        b64 = b.double().requires_grad_()
        ref = torch.autograd.grad(pytorch(x64, w.double(), b64), x64, gy.double())[0]
        fns = {}
        for name, fn in (("pytorch", pytorch), ("native", native)):
            xr, br = x.clone().requires_grad_(), b.clone().requires_grad_()
            fns[name] = lambda fn=fn, xr=xr, br=br: torch.autograd.grad(fn(xr, w, br), (xr, br), gy)
        times = {k: [] for k in fns}
        errs = {k: float((f()[0].double() - ref).abs().max() / ref.abs().max()) for k, f in fns.items()}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        for k in totals:
            totals[k] += med[k]
        print(f"{c:4d} x {s:2d} x {s:2d}: PyTorch {med['pytorch']:7.1f} ms | fused {med['native']:7.1f} ms "
              f"({med['pytorch'] / med['native']:.2f}x) | input-gradient error vs float64: PyTorch "
              f"{errs['pytorch']:.1e}, fused {errs['native']:.1e}")
    print(f"all shapes: PyTorch {totals['pytorch']:.1f} ms, fused {totals['native']:.1f} ms "
          f"({totals['pytorch'] / totals['native']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
