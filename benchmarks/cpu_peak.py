"""This CPU's arithmetic peak per core, from the instructions the kernels use, against a bf16
matrix product through PyTorch -- the yardstick for "how far from the peak is a kernel".

A large bf16 matrix product is not the peak: on a Zen 4 EPYC it reached 86-90 % of what the
AVX-512 BF16 dot-product instruction does in a loop with nothing else in it. This script times
that loop (vdpbf16ps on 512-bit registers, 64 FLOP each: 16 lanes x 2 products x multiply-add)
and fp32 FMA (32 FLOP each) on one core, then a bf16 and an fp32 matrix product on all cores.

The loops are written in C++ and built with the system compiler (`-O3 -march=native`): no
library exposes a single instruction's throughput, and a Python loop would time the interpreter.

    python benchmarks/cpu_peak.py [--size 4096]
"""
from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# 24 independent accumulators: more than latency x throughput on any current core, so the loop is
# bound by issue rate alone. The empty asm keeps the compiler from hoisting the products out.
LOOP = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
template <class F> static double rate(F body, long n, double flop_per_iter) {
  auto t0 = std::chrono::steady_clock::now();
  body(n);
  return n * flop_per_iter / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9;
}
int main() {
  const long n = 200000000 / 24;
  float sink = 0;
  double fma = rate([&](long m) {
    __m512 acc[24]; for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps((float)i);
    __m512 a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1e-9f);
    for (long i = 0; i < m; ++i) {
      asm volatile("" : "+v"(a));
#pragma GCC unroll 24
      for (int k = 0; k < 24; ++k) acc[k] = _mm512_fmadd_ps(a, b, acc[k]);
    }
    for (int i = 0; i < 24; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  }, n, 24 * 32.0);
  printf("fp32_fma %.1f\n", fma);
#ifdef __AVX512BF16__
  double dp = rate([&](long m) {
    __m512 acc[24]; for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps((float)i);
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x3f803f80);
    for (long i = 0; i < m; ++i) {
      asm volatile("" : "+v"(a));
#pragma GCC unroll 24
      for (int k = 0; k < 24; ++k) acc[k] = _mm512_dpbf16_ps(acc[k], a, b);
    }
    for (int i = 0; i < 24; ++i) sink += _mm512_reduce_add_ps(acc[i]);
  }, n, 24 * 64.0);
  printf("bf16_dot %.1f\n", dp);
#endif
  fprintf(stderr, "%g\n", sink);
}
"""


def _loop_rates() -> dict[str, float]:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        sys.exit("error: no C++ compiler (c++ or g++) on PATH -- install one (e.g. apt install g++)")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.cpp", Path(tmp) / "peak"
        src.write_text(LOOP)
        built = subprocess.run([cxx, "-O3", "-march=native", "-o", str(exe), str(src)],
                               capture_output=True, text=True)
        if built.returncode != 0:
            sys.exit(f"error: building the timing loop failed (needs AVX-512, x86-64): {built.stderr.strip()[:300]}")
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: float(v) for k, v in (line.split() for line in out.splitlines())}


def _matmul_gflops(n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / sorted(times)[repeats // 2] / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="matrix side for the matrix products")
    a = ap.parse_args()
    if platform.machine() not in ("x86_64", "AMD64"):
        sys.exit("error: this script times x86-64 AVX-512 instructions; this machine is " + platform.machine())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fast_recipe import _machine   # the same CPU line (model, family, bf16 units) as the recipe runs

    cores = torch.get_num_threads()
    loops = _loop_rates()
    print(f"{_machine(torch.device('cpu'))} | torch {torch.__version__} | {cores} threads | medians of 5 (matrix products)")
    for key, label in (("bf16_dot", "bf16 dot product (vdpbf16ps, 512-bit)"), ("fp32_fma", "fp32 FMA (512-bit)")):
        if key in loops:
            print(f"{label:40s} {loops[key]:7.1f} GFLOP/s per core, x{cores} = {loops[key] * cores:7.1f}")
        else:
            print(f"{label:40s} not built: this CPU has no AVX-512 BF16")
    for dtype, key in ((torch.bfloat16, "bf16_dot"), (torch.float32, "fp32_fma")):
        g = _matmul_gflops(a.size, dtype)
        share = f" = {100 * g / (loops[key] * cores):.0f} % of the loop peak" if key in loops else ""
        print(f"{str(dtype).split('.')[-1]} matrix product {a.size}^2 {'':17s} {g:7.1f} GFLOP/s{share}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
