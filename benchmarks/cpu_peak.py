"""This CPU's arithmetic peak per core, from the instructions the kernels use, against a bf16
matrix product through PyTorch -- the yardstick for "how far from the peak is a kernel".

A large bf16 matrix product is not the peak: on a Zen 4 EPYC it reached 85 % of what the
AVX-512 BF16 dot-product instruction does in a loop with nothing else in it. This script times
that loop (vdpbf16ps on 512-bit registers, 64 FLOP each: 16 lanes x 2 products x multiply-add)
and fp32 FMA (32 FLOP each at 512 bits; 16 at 256 bits on an AVX2-only CPU such as Zen 2 or 3,
where the bf16 loop is not built) on one core, then a bf16 and an fp32 matrix product on all cores.

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
from pathlib import Path

import torch

# 24 independent accumulators: more than latency x throughput on any current core, so the loop is
# bound by issue rate alone. The empty asm keeps the compiler from hoisting the products out.
LOOP = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
// The widest fp32 vector this CPU has: 512-bit with AVX-512, else 256-bit (AVX2 + FMA: Zen 2/3).
#ifdef __AVX512F__
typedef __m512 VF;
static VF set1(float x) { return _mm512_set1_ps(x); }
static VF fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
static float hsum(VF v) { return _mm512_reduce_add_ps(v); }
static const char* WIDTH = "512";
#else
typedef __m256 VF;
static VF set1(float x) { return _mm256_set1_ps(x); }
static VF fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
static float hsum(VF v) { float t[8]; _mm256_storeu_ps(t, v); float s = 0; for (float x : t) s += x; return s; }
static const char* WIDTH = "256";
#endif
// GFLOP/s of n rounds of `step` on 24 accumulators (acc = step(acc, a, b)), flop per step.
template <class V, class Step> static double rate(V a, V b, Step step, double flop, float& sink) {
  const long n = 200000000 / 24;
  VF acc[24]; for (int i = 0; i < 24; ++i) acc[i] = set1((float)i);
  auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
    asm volatile("" : "+x"(a));
#pragma GCC unroll 24
    for (int k = 0; k < 24; ++k) acc[k] = step(acc[k], a, b);
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (int i = 0; i < 24; ++i) sink += hsum(acc[i]);
  return n * 24 * flop / s / 1e9;
}
int main() {
  float sink = 0;
  printf("fp32_fma %.1f %s\n", rate(set1(1.0f), set1(1e-9f),
         [](VF c, VF a, VF b) { return fma(a, b, c); }, sizeof(VF) / 4 * 2.0, sink), WIDTH);
#ifdef __AVX512BF16__
  __m512bh one = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  printf("bf16_dot %.1f 512\n", rate(one, one,
         [](__m512 c, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(c, a, b); }, 64.0, sink));
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
            sys.exit(f"error: building the timing loop failed (needs AVX2 and FMA, x86-64): {built.stderr.strip()[:300]}")
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    # "name GFLOP/s width"
    return {k: (float(v), w) for k, v, w in (line.split() for line in out.splitlines())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="matrix side for the matrix products")
    a = ap.parse_args()
    if platform.machine() not in ("x86_64", "AMD64"):
        sys.exit("error: this script times x86-64 vector instructions; this machine is " + platform.machine())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # the same CPU line (model, family, bf16 units) and matrix-product peak as the recipe runs report
    from fast_recipe import _machine, matmul_peak_gflops

    cores = torch.get_num_threads()
    loops = _loop_rates()
    cpu = torch.device("cpu")
    print(f"{_machine(cpu)} | torch {torch.__version__} | {cores} threads | matrix products: mean of 10")
    for key, label in (("bf16_dot", "bf16 dot product (vdpbf16ps, "), ("fp32_fma", "fp32 FMA (")):
        if key in loops:
            rate, width = loops[key]
            label = f"{label}{width}-bit)"
            print(f"{label:40s} {rate:7.1f} GFLOP/s per core, x{cores} = {rate * cores:7.1f}")
        else:
            print(f"{label.split(' (')[0]:40s} not built: this CPU has no AVX-512 BF16")
    from cifarkit.device import cpu_has_fast_bf16
    for dtype, key in ((torch.bfloat16, "bf16_dot"), (torch.float32, "fp32_fma")):
        if dtype == torch.bfloat16 and not cpu_has_fast_bf16():
            # emulated bf16 runs at a few per cent of fp32 here: ten 4096^2 products take many minutes
            print(f"bf16 matrix product {'':25s} not timed: this CPU has no native bf16 (emulated)")
            continue
        g = matmul_peak_gflops(cpu, dtype, a.size)
        share = f" = {100 * g / (loops[key][0] * cores):.0f} % of the loop peak" if key in loops else ""
        print(f"{str(dtype).split('.')[-1]} matrix product {a.size}^2 {'':17s} {g:7.1f} GFLOP/s{share}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
