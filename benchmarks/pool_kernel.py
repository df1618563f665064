"""Prototype: a 2x2 max-pool for bf16 channels_last CPU tensors that keeps a 1-byte argmax code
instead of int64 indices and writes its backward in one pass (no zero-fill, no scatter), timed
against PyTorch's max_pool2d on the fast network's three pool shapes (batch 2000), with outputs
and gradients checked equal. Not used by cifarkit yet: it is the measurement for deciding whether
a fused CPU kernel is worth shipping (it needs a C++ compiler and ninja at run time).

    python benchmarks/pool_kernel.py
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

# Hand-written because PyTorch's CPU max-pool stores int64 indices (4x the bf16 output) and its
# backward zero-fills the whole input gradient before scattering into it.
CPP = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>

// bf16 is the top half of a float32: widen by shifting the bits.
static inline float bf(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16 && t.dim() == 4 &&
              t.is_contiguous(at::MemoryFormat::ChannelsLast), name, ": a 4-D bf16 channels_last CPU tensor");
}

// 2x2, stride 2, floor: out[n, i, j, c] = max of the window; code = which of its 4 pixels (0..3).
std::vector<torch::Tensor> fwd(torch::Tensor x) {
  check(x, "x");
  int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), h = H / 2, w = W / 2;
  auto out = torch::empty({N, C, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto code = torch::empty({N, h, w, C}, x.options().dtype(torch::kUInt8));
  const uint16_t* X = (const uint16_t*)x.data_ptr();
  uint16_t* O = (uint16_t*)out.data_ptr();
  uint8_t* K = code.data_ptr<uint8_t>();
  at::parallel_for(0, N * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / h, i = r % h;
      const uint16_t* top = X + (n * H + 2 * i) * W * C;
      const uint16_t* bottom = top + W * C;
      for (int64_t j = 0; j < w; ++j) {
        const uint16_t *p0 = top + 2 * j * C, *p1 = p0 + C, *p2 = bottom + 2 * j * C, *p3 = p2 + C;
        uint16_t* o = O + (r * w + j) * C;
        uint8_t* k = K + (r * w + j) * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          // strict > keeps the first maximum, as PyTorch's max_pool2d does
          float m = bf(p0[c]); uint8_t id = 0; uint16_t mv = p0[c];
          if (bf(p1[c]) > m) { m = bf(p1[c]); id = 1; mv = p1[c]; }
          if (bf(p2[c]) > m) { m = bf(p2[c]); id = 2; mv = p2[c]; }
          if (bf(p3[c]) > m) { id = 3; mv = p3[c]; }
          o[c] = mv;
          k[c] = id;
        }
      }
    }
  });
  return {out, code};
}

// Every input-gradient element written once: the output gradient where the code points, else 0.
torch::Tensor bwd(torch::Tensor g, torch::Tensor code, int64_t H, int64_t W) {
  check(g, "grad");
  int64_t N = g.size(0), C = g.size(1), h = g.size(2), w = g.size(3);
  TORCH_CHECK(code.sizes() == torch::IntArrayRef({N, h, w, C}) && H / 2 == h && W / 2 == w, "code/shape mismatch");
  auto gi = torch::empty({N, C, H, W}, g.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint16_t* G = (const uint16_t*)g.data_ptr();
  const uint8_t* K = code.data_ptr<uint8_t>();
  uint16_t* I = (uint16_t*)gi.data_ptr();
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / H, y = r % H;
      uint16_t* row = I + r * W * C;
      if (y >= 2 * h) {  // the odd last row is never a maximum
        std::memset(row, 0, W * C * 2);
        continue;
      }
      int64_t i = y / 2;
      const uint16_t* grow = G + (n * h + i) * w * C;
      const uint8_t* krow = K + (n * h + i) * w * C;
      for (int64_t x = 0; x < 2 * w; ++x) {
        uint8_t want = (y & 1) * 2 + (x & 1);
        const uint16_t* gj = grow + (x / 2) * C;
        const uint8_t* kj = krow + (x / 2) * C;
        uint16_t* o = row + x * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = kj[c] == want ? gj[c] : (uint16_t)0;
      }
      if (W > 2 * w) std::memset(row + 2 * w * C, 0, (W - 2 * w) * C * 2);  // odd last column
    }
  });
  return gi;
}
'''


def build():
    from torch.utils.cpp_extension import load_inline
    return load_inline("cifarkit_pool_proto", cpp_sources=CPP, functions=["fwd", "bwd"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], verbose=False)


def main() -> int:
    from cifarkit.device import set_threads
    set_threads(0)
    t = time.perf_counter()
    mod = build()
    print(f"build (or load from cache): {time.perf_counter() - t:.1f} s")

    class Pool(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            out, code = mod.fwd(x.contiguous(memory_format=torch.channels_last))
            ctx.save_for_backward(code)
            ctx.hw = x.shape[2:]
            return out

        @staticmethod
        def backward(ctx, g):
            code, = ctx.saved_tensors
            return mod.bwd(g.contiguous(memory_format=torch.channels_last), code, *ctx.hw)

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
        b = bench(Pool.apply, x, g)
        total[0] += a[0] + a[1]
        total[1] += b[0] + b[1]
        print(f"pool {c}x{s}x{s}: torch fwd {a[0]:5.1f} + bwd {a[1]:5.1f} ms | prototype fwd {b[0]:5.1f} + "
              f"bwd {b[1]:5.1f} ms | same output {torch.equal(a[2], b[2])}, same gradient {torch.equal(a[3], b[3])}")
    print(f"all three pools, forward + backward: torch {total[0]:.1f} ms, prototype {total[1]:.1f} ms per step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
