"""oneDNN's 3x3 convolution (forward + both gradients) against the same work as matrix products
over im2col copies (`kernels.gemm_conv3x3` and its backward), per shape, in fp32 or bf16.

The matrix-product convolution is chosen per shape only in bf16 today (kernels.choose). This
measures whether it would pay in fp32 too, on a CPU without native bf16 where training runs in
fp32 (docs/benchmarks.md section 6). Medians of `--repeats`, each shape's two ways interleaved.

    python benchmarks/conv_gemm_dtype.py [--dtype fp32] [--batch 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cifarkit import kernels

# (input channels, output channels, image side): the fast network's last groups at 16-32 px
SHAPES = [(320, 320, 1), (320, 320, 2), (320, 320, 3), (224, 320, 3), (320, 320, 4), (224, 224, 6)]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    for ci, co, side in SHAPES:
        x = torch.randn(a.batch, ci, side, side, generator=g).to(dtype).contiguous(memory_format=cl)
        w = torch.randn(co, ci, 3, 3, generator=g).to(dtype)
        gy = torch.randn(a.batch, co, side, side, generator=g).to(dtype).contiguous(memory_format=cl)
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)

        def onednn():
            F.conv2d(xr, wr, padding=1).backward(gy)

        def gemm():
            kernels.gemm_conv3x3(x, w)
            kernels.gemm_conv3x3_backward(x, w, gy, True, True)
        ms = {"onednn": [], "gemm": []}
        for _ in range(2):   # interleaved: the machine's drift falls on both
            ms["onednn"].append(_median_ms(onednn, a.repeats))
            ms["gemm"].append(_median_ms(gemm, a.repeats))
        one, mat = min(ms["onednn"]), min(ms["gemm"])
        print(f"{ci}->{co} at {side}x{side}, batch {a.batch}, {a.dtype}: oneDNN {one:.1f} ms, "
              f"matrix products {mat:.1f} ms, ratio {mat / one:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
