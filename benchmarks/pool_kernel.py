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
static inline float bf(uint16_t v){ uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f,&u,4); return f; }
std::vector<torch::Tensor> fwd(torch::Tensor x) {
  int64_t N=x.size(0), C=x.size(1), H=x.size(2), W=x.size(3), h=H/2, w=W/2;
  auto out = torch::empty({N,C,h,w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto code = torch::empty({N,h,w,C}, x.options().dtype(torch::kUInt8));
  const uint16_t* X = (const uint16_t*)x.data_ptr(); uint16_t* O=(uint16_t*)out.data_ptr(); uint8_t* K=code.data_ptr<uint8_t>();
  at::parallel_for(0, N*h, 1, [&](int64_t b, int64_t e){
    for (int64_t r=b; r<e; ++r){ int64_t n=r/h, i=r%h;
      const uint16_t* row0 = X + ((n*H + 2*i)*W)*C; const uint16_t* row1 = row0 + W*C;
      uint16_t* o = O + ((n*h + i)*w)*C; uint8_t* k = K + ((n*h + i)*w)*C;
      for (int64_t j=0;j<w;++j){ const uint16_t* a=row0+2*j*C; const uint16_t* b2=a+C; const uint16_t* c=row1+2*j*C; const uint16_t* d=c+C;
        uint16_t* oo=o+j*C; uint8_t* kk=k+j*C;
        #pragma omp simd
        for (int64_t ch=0; ch<C; ++ch){ float va=bf(a[ch]), vb=bf(b2[ch]), vc=bf(c[ch]), vd=bf(d[ch]);
          float m=va; uint8_t id=0; uint16_t mv=a[ch];
          if (vb>m){m=vb;id=1;mv=b2[ch];} if (vc>m){m=vc;id=2;mv=c[ch];} if (vd>m){m=vd;id=3;mv=d[ch];}
          oo[ch]=mv; kk[ch]=id; } } } });
  return {out, code};
}
torch::Tensor bwd(torch::Tensor g, torch::Tensor code, int64_t H, int64_t W) {
  int64_t N=g.size(0), C=g.size(1), h=g.size(2), w=g.size(3);
  auto gi = torch::empty({N,C,H,W}, g.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint16_t* G=(const uint16_t*)g.data_ptr(); const uint8_t* K=code.data_ptr<uint8_t>(); uint16_t* I=(uint16_t*)gi.data_ptr();
  at::parallel_for(0, N*H, 1, [&](int64_t b, int64_t e){
    for (int64_t r=b; r<e; ++r){ int64_t n=r/H, y=r%H; uint16_t* row = I + r*W*C;
      if (y >= 2*h){ std::memset(row, 0, W*C*2); continue; }
      int64_t i=y/2; int dy=(y&1)*2;
      const uint16_t* gg = G + ((n*h+i)*w)*C; const uint8_t* kk = K + ((n*h+i)*w)*C;
      for (int64_t x=0; x<2*w; ++x){ int64_t j=x/2; uint8_t want=dy+(x&1); uint16_t* o=row+x*C; const uint16_t* gj=gg+j*C; const uint8_t* kj=kk+j*C;
        #pragma omp simd
        for (int64_t ch=0; ch<C; ++ch) o[ch] = (kj[ch]==want) ? gj[ch] : (uint16_t)0; }
      if (W > 2*w) std::memset(row + 2*w*C, 0, (W-2*w)*C*2);
    } });
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
