// cifarkit's native CPU kernels (built by src/cifarkit/kernels.py with torch.utils.cpp_extension).
// Read kernels.py's docstring first: what each kernel is for, where it is used, and the fallback.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

// bf16 is the top half of a float32: widen by shifting the bits.
static inline float bf(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kBFloat16 && t.dim() == 4 &&
              t.is_contiguous(at::MemoryFormat::ChannelsLast),
              name, " must be a 4-D bf16 channels_last CPU tensor");
}

// 2x2, stride 2, floor mode: out[n, i, j, c] = max of its window; code = which pixel (0..3).
std::vector<torch::Tensor> pool_fwd(torch::Tensor x, bool want_code) {
  check(x, "x");
  int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), h = H / 2, w = W / 2;
  TORCH_CHECK(h > 0 && w > 0, "x must be at least 2x2");
  auto out = torch::empty({N, C, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto code = torch::empty({want_code ? N : 0, h, w, C}, x.options().dtype(torch::kUInt8));
  const uint16_t* X = (const uint16_t*)x.data_ptr();
  uint16_t* O = (uint16_t*)out.data_ptr();
  uint8_t* K = want_code ? code.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, N * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / h, i = r % h;
      const uint16_t* top = X + (n * H + 2 * i) * W * C;
      const uint16_t* bottom = top + W * C;
      for (int64_t j = 0; j < w; ++j) {
        const uint16_t *p0 = top + 2 * j * C, *p1 = p0 + C, *p2 = bottom + 2 * j * C, *p3 = p2 + C;
        uint16_t* o = O + (r * w + j) * C;
        uint8_t* k = K ? K + (r * w + j) * C : nullptr;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          // as max_pool2d: a strictly larger value wins (so the first maximum), and so does a NaN
          float m = bf(p0[c]), v; uint8_t id = 0; uint16_t mv = p0[c];
          v = bf(p1[c]); if (v > m || v != v) { m = v; id = 1; mv = p1[c]; }
          v = bf(p2[c]); if (v > m || v != v) { m = v; id = 2; mv = p2[c]; }
          v = bf(p3[c]); if (v > m || v != v) { id = 3; mv = p3[c]; }
          o[c] = mv;
          if (k) k[c] = id;
        }
      }
    }
  });
  return {out, code};
}

// Every input-gradient element is written once: the output gradient where the code points, else 0.
torch::Tensor pool_bwd(torch::Tensor g, torch::Tensor code, int64_t H, int64_t W) {
  check(g, "grad");
  int64_t N = g.size(0), C = g.size(1), h = g.size(2), w = g.size(3);
  TORCH_CHECK(code.scalar_type() == torch::kUInt8 && code.is_contiguous() &&
              code.sizes() == torch::IntArrayRef({N, h, w, C}) && H / 2 == h && W / 2 == w,
              "pool_bwd: code and shapes do not match the forward");
  auto gi = torch::empty({N, C, H, W}, g.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint16_t* G = (const uint16_t*)g.data_ptr();
  const uint8_t* K = code.data_ptr<uint8_t>();
  uint16_t* I = (uint16_t*)gi.data_ptr();
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / H, y = r % H;
      uint16_t* row = I + r * W * C;
      if (y >= 2 * h) {  // an odd last row is outside every window
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

// ---- Weight gradient of a 3x3, stride-1, padding-1 convolution (bf16 in, fp32 out) ----
// On CPUs with AVX-512 BF16 but no AMX (AMD Zen 4/5), oneDNN computes it at about two thirds of
// the bf16 peak (its forward and input-gradient convolutions run near the peak), and at under half
// of it for 3x3-pixel inputs. With AMX (Intel Sapphire Rapids and later) oneDNN's is faster than
// this one: kernels.py times both on the network's shapes and keeps the faster.
// Here the sum over images, rows and columns is the reduction of AVX-512 BF16 dot products
// (vdpbf16ps, two products per fp32 lane): two images are interleaved channel by channel, so
// one 32-bit broadcast of an input pixel pair meets a vector of 16 output channels' gradient pairs.
#ifdef __AVX512BF16__
#include <immintrin.h>

// dwt[kh][kw][ci][co] += sum over pairs p, rows h, columns w of gs(p, h, w, co) . xs(p, h+kh-1, w+kw, ci)
// gs: [P][H][W][Co][2]; xs: [P][H][W+2][Ci][2], with zero columns 0 and W+1 (the padding).
// Accumulators: CV vectors of 16 output channels x CI input channels x the 3 kernel columns.
template <int CV, int CI>
static void wgrad_tile(const uint16_t* gs, const uint16_t* xs, int64_t P, int64_t H, int64_t W,
                       int64_t Co, int64_t Ci, int64_t co0, int64_t ci0, int kh, float* dwt) {
  __m512 acc[3][CI][CV];
  for (int a = 0; a < 3; ++a)
    for (int c = 0; c < CI; ++c)
      for (int v = 0; v < CV; ++v) acc[a][c][v] = _mm512_setzero_ps();
  const int64_t hlo = kh == 0 ? 1 : 0, hhi = kh == 2 ? H - 1 : H;   // rows whose input row exists
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t h = hlo; h < hhi; ++h) {
      const uint16_t* gp = gs + (p * H + h) * W * Co * 2 + co0 * 2;
      const uint16_t* xp = xs + (p * H + h + kh - 1) * (W + 2) * Ci * 2 + ci0 * 2;
      for (int64_t w = 0; w < W; ++w) {
        __m512bh gv[CV];
        for (int v = 0; v < CV; ++v)
          gv[v] = (__m512bh)_mm512_loadu_si512((const void*)(gp + w * Co * 2 + v * 32));
        for (int a = 0; a < 3; ++a) {
          const uint16_t* xq = xp + (w + a) * Ci * 2;
          for (int c = 0; c < CI; ++c) {
            int32_t bits;
            std::memcpy(&bits, xq + c * 2, 4);
            __m512bh b = (__m512bh)_mm512_set1_epi32(bits);
            for (int v = 0; v < CV; ++v) acc[a][c][v] = _mm512_dpbf16_ps(acc[a][c][v], gv[v], b);
          }
        }
      }
    }
  }
  for (int a = 0; a < 3; ++a)
    for (int c = 0; c < CI; ++c)
      for (int v = 0; v < CV; ++v) {
        float* o = dwt + ((kh * 3 + a) * Ci + ci0 + c) * Co + co0 + v * 16;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[a][c][v]));
      }
}

bool has_conv3x3_wgrad() { return true; }

// o[2c] = a0[c], o[2c+1] = a1[c] (or 0 without a second image): two images, channel by channel.
static inline void interleave(uint16_t* o, const uint16_t* a0, const uint16_t* a1, int64_t C) {
  if (a1) for (int64_t c = 0; c < C; ++c) { o[2 * c] = a0[c]; o[2 * c + 1] = a1[c]; }
  else for (int64_t c = 0; c < C; ++c) { o[2 * c] = a0[c]; o[2 * c + 1] = 0; }
}

// x: [N, Ci, H, W], g: [N, Co, H, W], both bf16 channels_last; returns dW [Co, Ci, 3, 3] fp32
// (channels_last). Deterministic for a given thread count: each thread sums a fixed range of
// images into its own buffer, and the buffers are added in thread order.
torch::Tensor conv3x3_wgrad(torch::Tensor x, torch::Tensor g) {
  check(x, "x");
  check(g, "grad");
  int64_t N = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3), Co = g.size(1);
  TORCH_CHECK(g.size(0) == N && g.size(2) == H && g.size(3) == W, "conv3x3_wgrad: shapes differ");
  TORCH_CHECK(Co % 16 == 0 && Ci % 4 == 0, "conv3x3_wgrad: needs Co % 16 == 0 and Ci % 4 == 0");
  const uint16_t* X = (const uint16_t*)x.data_ptr();
  const uint16_t* G = (const uint16_t*)g.data_ptr();
  const int64_t NP = (N + 1) / 2;   // image pairs; an odd last image is paired with zeros
  // Pairs per chunk: its repacked gradient and input (about 256 KB) stay in the core's L2 cache
  // while every tile of the weight gradient reads them.
  const int64_t PC = std::max<int64_t>(1, (int64_t)(256 * 1024) / ((H * W * Co + H * (W + 2) * Ci) * 4));
  const int64_t chunks = (NP + PC - 1) / PC, DW = 9 * Ci * Co;
  const int T = at::get_num_threads();
  std::vector<float> bufs((size_t)T * DW, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    float* dwt = bufs.data() + (size_t)at::get_thread_num() * DW;
    std::vector<uint16_t> gs((size_t)PC * H * W * Co * 2), xs((size_t)PC * H * (W + 2) * Ci * 2);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t p0 = chunk * PC, P = std::min(PC, NP - p0);
      for (int64_t p = 0; p < P; ++p) {   // repack: two images interleaved channel by channel
        const int64_t n0 = 2 * (p0 + p), n1 = n0 + 1;
        for (int64_t hw = 0; hw < H * W; ++hw)
          interleave(gs.data() + (p * H * W + hw) * Co * 2, G + (n0 * H * W + hw) * Co,
                     n1 < N ? G + (n1 * H * W + hw) * Co : nullptr, Co);
        for (int64_t h = 0; h < H; ++h) {
          uint16_t* row = xs.data() + (p * H + h) * (W + 2) * Ci * 2;
          std::memset(row, 0, Ci * 4);
          std::memset(row + (W + 1) * Ci * 2, 0, Ci * 4);
          for (int64_t w = 0; w < W; ++w)
            interleave(row + (w + 1) * Ci * 2, X + ((n0 * H + h) * W + w) * Ci,
                       n1 < N ? X + ((n1 * H + h) * W + w) * Ci : nullptr, Ci);
        }
      }
      for (int64_t co0 = 0; co0 < Co; co0 += (Co - co0 >= 32 ? 32 : 16))
        for (int kh = 0; kh < 3; ++kh) {
          if (Co - co0 >= 32)
            for (int64_t ci0 = 0; ci0 < Ci; ci0 += 4) wgrad_tile<2, 4>(gs.data(), xs.data(), P, H, W, Co, Ci, co0, ci0, kh, dwt);
          else if (Ci % 8 == 0)
            for (int64_t ci0 = 0; ci0 < Ci; ci0 += 8) wgrad_tile<1, 8>(gs.data(), xs.data(), P, H, W, Co, Ci, co0, ci0, kh, dwt);
          else
            for (int64_t ci0 = 0; ci0 < Ci; ci0 += 4) wgrad_tile<1, 4>(gs.data(), xs.data(), P, H, W, Co, Ci, co0, ci0, kh, dwt);
        }
    }
  });
  auto out = torch::empty({Co, Ci, 3, 3}, torch::dtype(torch::kFloat32).memory_format(at::MemoryFormat::ChannelsLast));
  float* O = out.data_ptr<float>();   // [Co][kh][kw][Ci] in memory
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t k = 0; k < 9; ++k)
      for (int64_t ci = 0; ci < Ci; ++ci) {
        float s = 0.f;
        for (int t = 0; t < T; ++t) s += bufs[(size_t)t * DW + (k * Ci + ci) * Co + co];
        O[(co * 9 + k) * Ci + ci] = s;
      }
  return out;
}
#else
bool has_conv3x3_wgrad() { return false; }
torch::Tensor conv3x3_wgrad(torch::Tensor x, torch::Tensor g) {
  TORCH_CHECK(false, "conv3x3_wgrad: built without AVX-512 BF16");
  return x;
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pool_fwd", &pool_fwd, "2x2 bf16 channels_last max-pool: output and 1-byte argmax code");
  m.def("pool_bwd", &pool_bwd, "its backward: every input-gradient element written once");
  m.def("conv3x3_wgrad", &conv3x3_wgrad, "3x3 stride-1 padding-1 convolution weight gradient (fp32 sums)");
  m.def("has_conv3x3_wgrad", &has_conv3x3_wgrad, "whether conv3x3_wgrad was built (AVX-512 BF16)");
}
