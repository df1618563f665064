"""cifarkit's native 2x2 max-pool (src/cifarkit/kernels.py: bf16 channels_last CPU tensors, a
1-byte argmax code instead of int64 indices, a one-pass backward) against PyTorch's max_pool2d
on the fast network's three pool shapes (batch 2000), forward and backward, with outputs and
gradients checked equal. The whole-step effect: `python benchmarks/step_variants.py --native`.

    python benchmarks/pool_kernel.py
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def main() -> int:
    from cifarkit.device import set_threads
    set_threads(0)
    from cifarkit import kernels
    t = time.perf_counter()
    reason = kernels.load()
    if reason is not None:
        raise SystemExit(f"native kernels unavailable: {reason}")
    print(f"build (or load from cache): {time.perf_counter() - t:.1f} s")

    def bench(fn, x, g, reps=8):
        tf, tb = [], []
        for _ in range(reps + 2):
            xx = x.detach().requires_grad_()
            t0 = time.perf_counter()
            y = fn(xx)
            t1 = time.perf_counter()
            y.backward(g)
            tf.append(t1 - t0)
            tb.append(time.perf_counter() - t1)
        return statistics.median(tf[2:]) * 1e3, statistics.median(tb[2:]) * 1e3, y, xx.grad

    total = [0.0, 0.0]
    for c, s in ((64, 31), (256, 15), (256, 7)):
        cl = torch.channels_last
        x = torch.randn(2000, c, s, s).to(torch.bfloat16).contiguous(memory_format=cl)
        g = torch.randn(2000, c, s // 2, s // 2).to(torch.bfloat16).contiguous(memory_format=cl)
        a = bench(lambda v: F.max_pool2d(v, 2), x, g)
        b = bench(kernels.max_pool2x2, x, g)
        total[0] += a[0] + a[1]
        total[1] += b[0] + b[1]
        print(f"pool {c}x{s}x{s}: torch fwd {a[0]:5.1f} + bwd {a[1]:5.1f} ms | native fwd {b[0]:5.1f} + "
              f"bwd {b[1]:5.1f} ms | same output {torch.equal(a[2], b[2])}, same gradient {torch.equal(a[3], b[3])}")
    print(f"all three pools, forward + backward: torch {total[0]:.1f} ms, native {total[1]:.1f} ms per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
