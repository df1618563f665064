// cifarkit's native CPU kernels (built by src/cifarkit/kernels.py with the machine's C++ compiler).
// Read kernels.py's docstring first: what each kernel is for, where it is used, and the fallback.
// Plain C functions on raw pointers, called through ctypes; kernels.py checks the tensors and
// allocates the outputs. No PyTorch header: built with ATen and PyTorch's pybind11 casters
// (torch.utils.cpp_extension) a build from scratch, which a user's first training run waits for,
// took 15.8-18.6 s on a Zen 4, on its own 1.6-1.9 s (`benchmarks/kernel_setup.py`), and the
// kernels run as fast (`benchmarks/native_ab.py`; docs/benchmarks.md section 7). Threads are
// OpenMP's, in the runtime PyTorch itself loaded (libgomp.so.1: one pool of threads).
#include <omp.h>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <cmath>
#include <vector>

// As at::parallel_for with OpenMP: [begin, end) split into one contiguous range per thread, at
// most T threads and none with fewer than `grain` items; f(range begin, range end, thread index).
// Each thread gets the same range for the same T, so per-thread sums are deterministic.
template <class F>
static void parallel_for(int64_t begin, int64_t end, int64_t grain, int T, const F& f) {
  if (begin >= end) return;
  const int64_t range = end - begin;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(T, (range + grain - 1) / grain));
  if (nt == 1) { f(begin, end, 0); return; }
  #pragma omp parallel num_threads((int)nt)
  {
    const int64_t tid = omp_get_thread_num(), chunk = (range + omp_get_num_threads() - 1) / omp_get_num_threads();
    const int64_t b = begin + tid * chunk;
    if (b < end) f(b, std::min(end, b + chunk), (int)tid);
  }
}

// Reinterpret the bits of a float and a uint32 (gcc/clang builtin; what C++20 std::bit_cast does).
static inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
static inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

// bf16 is the top half of a float32: widen by shifting the bits.
static inline float bf(uint16_t v) { return bits_to_float((uint32_t)v << 16); }

// The element types the max-pool and the fused batch norm + GELU read: bf16 (as uint16_t, widened)
// and fp32.
static inline float val(uint16_t v) { return bf(v); }
static inline float val(float v) { return v; }

// All tensors below are bf16 (as uint16_t) or fp32, channels_last: [N][H][W][C] in memory.
// 2x2, stride 2, floor mode: O[n, i, j, c] = max of its window; K (or null) = which pixel (0..3).
template <class E>
static void pool_fwd(const E* X, E* O, uint8_t* K, int64_t N, int64_t C, int64_t H, int64_t W, int T) {
  const int64_t h = H / 2, w = W / 2;
  parallel_for(0, N * h, 1, T, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / h, i = r % h;
      const E* top = X + (n * H + 2 * i) * W * C;
      const E* bottom = top + W * C;
      for (int64_t j = 0; j < w; ++j) {
        const E *p0 = top + 2 * j * C, *p1 = p0 + C, *p2 = bottom + 2 * j * C, *p3 = p2 + C;
        E* o = O + (r * w + j) * C;
        uint8_t* k = K ? K + (r * w + j) * C : nullptr;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          // as max_pool2d: a strictly larger value wins (so the first maximum), and so does a NaN
          float m = val(p0[c]), v; uint8_t id = 0; E mv = p0[c];
          v = val(p1[c]); if (v > m || v != v) { m = v; id = 1; mv = p1[c]; }
          v = val(p2[c]); if (v > m || v != v) { m = v; id = 2; mv = p2[c]; }
          v = val(p3[c]); if (v > m || v != v) { id = 3; mv = p3[c]; }
          o[c] = mv;
          if (k) k[c] = id;
        }
      }
    }
  });
}

// Every input-gradient element is written once: the output gradient where the code points, else 0.
// G: [N][H/2][W/2][C], K: the forward's codes, I: [N][H][W][C].
template <class E>
static void pool_bwd(const E* G, const uint8_t* K, E* I, int64_t N, int64_t C, int64_t H, int64_t W, int T) {
  const int64_t h = H / 2, w = W / 2;
  parallel_for(0, N * H, 1, T, [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t n = r / H, y = r % H;
      E* row = I + r * W * C;
      if (y >= 2 * h) {  // an odd last row is outside every window
        std::memset(row, 0, W * C * sizeof(E));
        continue;
      }
      int64_t i = y / 2;
      const E* grow = G + (n * h + i) * w * C;
      const uint8_t* krow = K + (n * h + i) * w * C;
      for (int64_t x = 0; x < 2 * w; ++x) {
        uint8_t want = (y & 1) * 2 + (x & 1);
        const E* gj = grow + (x / 2) * C;
        const uint8_t* kj = krow + (x / 2) * C;
        E* o = row + x * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = kj[c] == want ? gj[c] : (E)0;
      }
      if (W > 2 * w) std::memset(row + 2 * w * C, 0, (W - 2 * w) * C * sizeof(E));  // odd last column
    }
  });
}

extern "C" void ck_pool_fwd(const uint16_t* X, uint16_t* O, uint8_t* K, int64_t N, int64_t C, int64_t H,
                            int64_t W, int T) { pool_fwd(X, O, K, N, C, H, W, T); }
extern "C" void ck_pool_bwd(const uint16_t* G, const uint8_t* K, uint16_t* I, int64_t N, int64_t C,
                            int64_t H, int64_t W, int T) { pool_bwd(G, K, I, N, C, H, W, T); }
// The same in fp32, for CPUs without native bf16, where training runs in fp32. PyTorch's fp32
// max-pool has the bf16 one's costs: int64 indices and a zero-filled input gradient (`fill_` was
// 3 % of a 32 px step on a Zen 2, its pool backward 4 %; docs/benchmarks.md section 6).
extern "C" void ck_pool_fwd32(const float* X, float* O, uint8_t* K, int64_t N, int64_t C, int64_t H,
                              int64_t W, int T) { pool_fwd(X, O, K, N, C, H, W, T); }
extern "C" void ck_pool_bwd32(const float* G, const uint8_t* K, float* I, int64_t N, int64_t C,
                              int64_t H, int64_t W, int T) { pool_bwd(G, K, I, N, C, H, W, T); }

// The weight gradient kernels below (bf16 and fp32) each sum a fixed range of images per thread
// into its own buffer, laid out [T][kh][kw][Ci][Co]; this adds the buffers in thread order (so the
// result is deterministic for a given thread count) into O = dW [Co][3][3][Ci] (channels_last).
static inline void add_thread_sums(const std::vector<float>& bufs, int T, int64_t Ci, int64_t Co, float* O) {
  const int64_t DW = 9 * Ci * Co;
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t k = 0; k < 9; ++k)
      for (int64_t ci = 0; ci < Ci; ++ci) {
        float s = 0.f;
        for (int t = 0; t < T; ++t) s += bufs[(size_t)t * DW + (k * Ci + ci) * Co + co];
        O[(co * 9 + k) * Ci + ci] = s;
      }
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

// One gradient column w of one row: acc[a] += gs(w) . xs(w + a) for the kernel columns a in [A0, A1).
// The first column skips a = 0 and the last a = 2, whose input is the zero padding: on the 3-pixel
// rows of the last group that is 2 of 9 products per row (on a Zen 4, `benchmarks/step_variants.py
// --layers`: those layers' gradient 74 -> 61 ms, the 7-pixel ones' 7-11 % faster), and the sums are
// bit for bit the same (the skipped products are zeros).
template <int CV, int CI, int A0, int A1>
static inline void wgrad_column(const uint16_t* gp, const uint16_t* xp, int64_t w, int64_t Co, int64_t Ci,
                                __m512 (&acc)[3][CI][CV]) {
  __m512bh gv[CV];
  for (int v = 0; v < CV; ++v)
    gv[v] = (__m512bh)_mm512_loadu_si512((const void*)(gp + w * Co * 2 + v * 32));
  for (int a = A0; a < A1; ++a) {
    const uint16_t* xq = xp + (w + a) * Ci * 2;
    for (int c = 0; c < CI; ++c) {
      int32_t bits;
      std::memcpy(&bits, xq + c * 2, 4);
      __m512bh b = (__m512bh)_mm512_set1_epi32(bits);
      for (int v = 0; v < CV; ++v) acc[a][c][v] = _mm512_dpbf16_ps(acc[a][c][v], gv[v], b);
    }
  }
}

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
      if (W == 1) {   // one column: only the kernel's middle column meets an input pixel
        wgrad_column<CV, CI, 1, 2>(gp, xp, 0, Co, Ci, acc);
        continue;
      }
      wgrad_column<CV, CI, 1, 3>(gp, xp, 0, Co, Ci, acc);
      for (int64_t w = 1; w < W - 1; ++w) wgrad_column<CV, CI, 0, 3>(gp, xp, w, Co, Ci, acc);
      wgrad_column<CV, CI, 0, 2>(gp, xp, W - 1, Co, Ci, acc);
    }
  }
  for (int a = 0; a < 3; ++a)
    for (int c = 0; c < CI; ++c)
      for (int v = 0; v < CV; ++v) {
        float* o = dwt + ((kh * 3 + a) * Ci + ci0 + c) * Co + co0 + v * 16;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), acc[a][c][v]));
      }
}

extern "C" int ck_has_conv3x3_wgrad() { return 1; }

// o[2c] = a0[c], o[2c+1] = a1[c] (or 0 without a second image): two images, channel by channel.
static inline void interleave(uint16_t* o, const uint16_t* a0, const uint16_t* a1, int64_t C) {
  if (a1) for (int64_t c = 0; c < C; ++c) { o[2 * c] = a0[c]; o[2 * c + 1] = a1[c]; }
  else for (int64_t c = 0; c < C; ++c) { o[2 * c] = a0[c]; o[2 * c + 1] = 0; }
}

// X: [N, Ci, H, W], G: [N, Co, H, W] (bf16, channels_last; Co % 16 == 0, Ci % 4 == 0); writes
// O = dW [Co, Ci, 3, 3] fp32 channels_last ([Co][3][3][Ci] in memory). Deterministic for a given
// thread count: each thread sums a fixed range of images into its own buffer, and the buffers
// are added in thread order.
extern "C" void ck_conv3x3_wgrad(const uint16_t* X, const uint16_t* G, float* O, int64_t N, int64_t Ci,
                                 int64_t Co, int64_t H, int64_t W, int T) {
  const int64_t NP = (N + 1) / 2;   // image pairs; an odd last image is paired with zeros
  // Pairs per chunk: its repacked gradient and input (about 256 KB) stay in the core's L2 cache
  // while every tile of the weight gradient reads them.
  const int64_t PC = std::max<int64_t>(1, (int64_t)(256 * 1024) / ((H * W * Co + H * (W + 2) * Ci) * 4));
  const int64_t chunks = (NP + PC - 1) / PC, DW = 9 * Ci * Co;
  std::vector<float> bufs((size_t)T * DW, 0.f);
  parallel_for(0, chunks, 1, T, [&](int64_t begin, int64_t end, int tid) {
    float* dwt = bufs.data() + (size_t)tid * DW;
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
  add_thread_sums(bufs, T, Ci, Co, O);
}
#else
extern "C" int ck_has_conv3x3_wgrad() { return 0; }   // kernels.py never calls ck_conv3x3_wgrad then
extern "C" void ck_conv3x3_wgrad(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t,
                                 int64_t, int64_t, int) {}
#endif

// ---- The same weight gradient in fp32, with AVX2 and FMA (CPUs without native bf16) ----
// Where the CPU has no bf16 instructions (AMD Zen 2 and 3), training runs in fp32, and oneDNN's
// fp32 weight gradient ran at 0.5-0.75 of its own forward convolution's rate on the fast network's
// layers on a Zen 2 (109 GFLOP/s at 3x3 pixels against 238; docs/benchmarks.md section 6).
// Here each 16 output channels x 2 input channels x 3 kernel columns of one kernel row are 12
// 256-bit accumulators, which a column of the output gradient (two vectors) and six broadcast
// input values update with 12 FMAs; taps that meet the zero padding are skipped, as in the bf16
// kernel. Per shape `choose` keeps oneDNN's where it is faster.
//
// Each chunk of images is first copied into two packed buffers, so that a tile's pass reads
// memory in order: the gradient as [Co/16][column][16] (64 contiguous bytes a column, where
// channels_last spreads a tile's 16 channels over a 4*Co-byte stride, one cache line of each
// of which the pass used) and the input as [Ci/2][column][2]. Copying costs one read and write
// of the chunk; the tiles then read it (Co/16) x 3 x (Ci/2) times. On a Zen 3 the fast network's
// 32 px weight gradients at batch 1000 took 0.63-0.87 of the unpacked kernel's time, 0.74 in all
// (benchmarks/wgrad32_ab.py, docs/benchmarks.md section 6), with bit-identical results: the same
// chunks, tiles and order of the sums.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

// The 12 accumulators are named variables: as an array, GCC 12 kept some of them on the stack.
#define CK_TAP(xq, r0, r1, r2, r3) { \
    const __m256 b0 = _mm256_broadcast_ss(xq), b1 = _mm256_broadcast_ss((xq) + 1); \
    r0 = _mm256_fmadd_ps(g0, b0, r0); r1 = _mm256_fmadd_ps(g1, b0, r1); \
    r2 = _mm256_fmadd_ps(g0, b1, r2); r3 = _mm256_fmadd_ps(g1, b1, r3); }
// Output column w: kernel column 0 reads input column w-1 (skipped at w = 0), 2 reads w+1 (skipped
// at the last column).
#define CK_COLUMN(w, LEFT, RIGHT) { \
    const float* gq = gp + (w) * 16; \
    const __m256 g0 = _mm256_loadu_ps(gq), g1 = _mm256_loadu_ps(gq + 8); \
    const float* xq = xp + (w) * 2; \
    if (LEFT) CK_TAP(xq - 2, a00, a01, a02, a03) \
    CK_TAP(xq, a10, a11, a12, a13) \
    if (RIGHT) CK_TAP(xq + 2, a20, a21, a22, a23) }

// dwt[kh][kw][ci][co] += sum over images p < P, rows h in [h0, h1), columns w of
// g(p, h, w, co) * x(p, h+kh-1, w+kw-1, ci), for co in [co0, co0+16), ci in [ci0, ci0+2), kw 0..2.
// gb: the chunk's gradient of these 16 channels, [P][h1-h0][W][16]; xb: its input of these 2
// channels, [P][h1-h0+2][W][2], whose row r is the image's row h0-1+r (rows outside the image are
// never read).
static void wgrad32_tile(const float* gb, const float* xb, int64_t P, int64_t H, int64_t W, int64_t h0,
                         int64_t h1, int64_t Co, int64_t Ci, int64_t co0, int64_t ci0, int kh, float* dwt) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00,
         a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
  const int64_t R = h1 - h0;
  // rows whose input row exists
  const int64_t hlo = std::max<int64_t>(h0, kh == 0 ? 1 : 0), hhi = std::min<int64_t>(h1, kh == 2 ? H - 1 : H);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t h = hlo; h < hhi; ++h) {
      const float* gp = gb + (p * R + h - h0) * W * 16;
      const float* xp = xb + (p * (R + 2) + h - h0 + kh) * W * 2;
      if (W == 1) { CK_COLUMN(0, false, false); continue; }
      CK_COLUMN(0, false, true);
      for (int64_t w = 1; w < W - 1; ++w) CK_COLUMN(w, true, true);
      CK_COLUMN(W - 1, true, false);
    }
  const __m256 acc[12] = {a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23};
  for (int a = 0; a < 3; ++a)
    for (int c = 0; c < 2; ++c)
      for (int v = 0; v < 2; ++v) {
        float* o = dwt + ((kh * 3 + a) * Ci + ci0 + c) * Co + co0 + 8 * v;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[a * 4 + c * 2 + v]));
      }
}
#undef CK_COLUMN
#undef CK_TAP

extern "C" int ck_has_conv3x3_wgrad32() { return 1; }

// X: [N, Ci, H, W], G: [N, Co, H, W] (fp32, channels_last; Co % 16 == 0, Ci % 2 == 0); writes
// O = dW [Co, Ci, 3, 3] fp32 channels_last ([Co][3][3][Ci] in memory). Deterministic for a given
// thread count, as the bf16 one: per-thread sums over fixed ranges, added in thread order.
extern "C" void ck_conv3x3_wgrad32(const float* X, const float* G, float* O, int64_t N, int64_t Ci,
                                   int64_t Co, int64_t H, int64_t W, int T) {
  // A chunk's gradient and input (about 256 KB: half a Zen 2 core's L2 cache) are read by every
  // tile. On a Zen 2 a prototype of this kernel with chunks of 64 and 128 KB was slower on the
  // fast network's layers (more tiles, each adding its sums into dwt), and one of 1 MB too
  // (docs/benchmarks.md section 6); packed, in a prototype timed on a Zen 3 (a scratch script, not
  // kept), 64 and 128 KB were slower again and 384 KB-1 MB no faster.
  const int64_t budget = 256 * 1024, row = W * (Co + Ci) * 4;
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(H, budget / row));   // rows per chunk
  const int64_t PC = R < H ? 1 : std::max<int64_t>(1, budget / (row * H));       // images per chunk
  const int64_t blocks = (H + R - 1) / R;                                        // row blocks per image
  const int64_t chunks = R < H ? N * blocks : (N + PC - 1) / PC, DW = 9 * Ci * Co;
  std::vector<float> bufs((size_t)T * DW, 0.f);
  parallel_for(0, chunks, 1, T, [&](int64_t begin, int64_t end, int tid) {
    float* dwt = bufs.data() + (size_t)tid * DW;
    std::vector<float> gpk((size_t)PC * R * W * Co), xpk((size_t)PC * (R + 2) * W * Ci);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      int64_t n0, P, h0 = 0, h1 = H;
      if (R < H) { n0 = chunk / blocks; P = 1; h0 = (chunk % blocks) * R; h1 = std::min(H, h0 + R); }
      else { n0 = chunk * PC; P = std::min(PC, N - n0); }
      const int64_t rows = h1 - h0, gcols = P * rows * W, xcols = P * (rows + 2) * W;
      // the gradient's rows [h0, h1) as [Co/16][P][rows][W][16]
      for (int64_t p = 0; p < P; ++p)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t w = 0; w < W; ++w) {
            const float* src = G + (((n0 + p) * H + h0 + r) * W + w) * Co;
            float* dst = gpk.data() + ((p * rows + r) * W + w) * 16;
            for (int64_t cb = 0; cb < Co / 16; ++cb)
              std::memcpy(dst + cb * gcols * 16, src + cb * 16, 16 * sizeof(float));
          }
      // the input's rows [h0-1, h1+1) that exist, as [Ci/2][P][rows+2][W][2]
      for (int64_t p = 0; p < P; ++p)
        for (int64_t r = 0; r < rows + 2; ++r) {
          const int64_t hin = h0 - 1 + r;
          if (hin < 0 || hin >= H) continue;
          for (int64_t w = 0; w < W; ++w) {
            const float* src = X + (((n0 + p) * H + hin) * W + w) * Ci;
            float* dst = xpk.data() + ((p * (rows + 2) + r) * W + w) * 2;
            for (int64_t cp = 0; cp < Ci / 2; ++cp) {
              dst[cp * xcols * 2] = src[2 * cp];
              dst[cp * xcols * 2 + 1] = src[2 * cp + 1];
            }
          }
        }
      for (int64_t co0 = 0; co0 < Co; co0 += 16)
        for (int kh = 0; kh < 3; ++kh)
          for (int64_t ci0 = 0; ci0 < Ci; ci0 += 2)
            wgrad32_tile(gpk.data() + co0 * gcols, xpk.data() + ci0 * xcols, P, H, W, h0, h1, Co, Ci, co0,
                         ci0, kh, dwt);
    }
  });
  add_thread_sums(bufs, T, Ci, Co, O);
}
#else
extern "C" int ck_has_conv3x3_wgrad32() { return 0; }   // kernels.py never calls ck_conv3x3_wgrad32 then
extern "C" void ck_conv3x3_wgrad32(const float*, const float*, float*, int64_t, int64_t, int64_t,
                                   int64_t, int64_t, int) {}
#endif

// ---- Batch norm (batch statistics) followed by GELU, fused (bf16 or fp32 channels_last) ----
// PyTorch runs them as two ops, and each of their four kernels (two forward, two backward) reads
// and writes a whole activation tensor; on a CPU these passes are bound by memory, not by
// arithmetic, and took about a fifth of a fast-recipe step (two fifths of its proxy network's).
// Here the forward reads x twice (statistics, then output) and writes y once; the backward reads
// the output gradient and x, writes dz (rounded to bf16, as PyTorch's GELU backward hands it to
// the batch norm's), then reads dz and x and writes dx over dz. The batch-norm output is never
// stored: the backward recomputes it from x.
// GELU is the exact (erf) one: erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), whose
// exp(-z^2/2) is also the normal density the derivative needs, so one exp per element serves both.
// Plain C++ loops over channels that the compiler vectorises for the machine it is built on.
// In fp32 (CPUs without native bf16) the same code runs on floats, with nothing rounded.
// kernels.py builds with -fno-trapping-math: without it GCC 12 does not vectorise the GELU loops
// for AVX2 (the selects below "could trap"; with AVX-512 it can use masked ops), and the fp32 fused
// op took 1.9-4.6x PyTorch's two ops on a Zen 2 (docs/benchmarks.md section 6).

// Round to nearest even, as PyTorch's float -> bf16 conversion does (NaN stays NaN).
static inline uint16_t to_bf(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? (uint16_t)0x7FC0 : (uint16_t)r;
}

// e^x for x <= 0 (here x = -z^2/2): 2^n e^r with |r| <= ln2/2, e^r by its degree-6 Taylor
// polynomial (relative error < 2e-7); below -87 the result is flushed to 0.
static inline float exp_neg(float x) {
  float xc = x < -87.f ? -87.f : x;
  // n = round(xc / ln2) by the 1.5 * 2^23 trick (floorf does not vectorise without -ffast-math)
  float n = (xc * 1.44269504f + 12582912.f) - 12582912.f;
  float r = xc - n * 0.693145751953125f - n * 1.4286068203094172e-06f;
  float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
  float s = bits_to_float((uint32_t)((int32_t)n + 127) << 23);
  return x < -87.f ? 0.f : p * s;
}

// Phi(z), the normal CDF, given e = exp(-z^2/2) (which is also sqrt(2 pi) times the density).
static inline float normal_cdf(float z, float e) {
  float t = 1.f / (1.f + 0.3275911f * 0.70710678f * std::fabs(z));   // A&S's t for |z| / sqrt(2)
  float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  float q = 0.5f * poly * e;                                          // 0.5 * erfc(|z| / sqrt(2))
  return z >= 0.f ? 1.f - q : q;
}

// An fp32 value as the element type: rounded to bf16, or as it is.
template <class E> static inline E as_elem(float f);
template <> inline uint16_t as_elem<uint16_t>(float f) { return to_bf(f); }
template <> inline float as_elem<float>(float f) { return f; }

// The per-row loops, with restrict-qualified pointers so that the compiler vectorises them, and
// always inlined: left to gcc, the forward's were called per row and it took 1.09-1.14x as long
// (this file built on its own, where <ATen/ATen.h> around it had tipped the inlining the other way;
// a Zen 4, batch 1000 at 64 channels x 32 px and 224 x 16).
#define ROW static inline __attribute__((always_inline)) void
template <class E>
ROW stats_row(const E* __restrict x, const float* __restrict shift, float* __restrict s1,
              float* __restrict s2, int64_t C) {
  #pragma omp simd
  for (int64_t c = 0; c < C; ++c) { float d = val(x[c]) - shift[c]; s1[c] += d; s2[c] += d * d; }
}

template <class E>
ROW gelu_row(const E* __restrict x, E* __restrict y, const float* __restrict a,
             const float* __restrict b, int64_t C) {
  #pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float z = val(x[c]) * a[c] + b[c];
    y[c] = as_elem<E>(z * normal_cdf(z, exp_neg(-0.5f * z * z)));
  }
}

template <class E>
ROW dz_row(const E* __restrict x, const E* __restrict g, E* __restrict dz_out,
           const float* __restrict a, const float* __restrict b, const float* __restrict mu,
           const float* __restrict rs, float* __restrict s1, float* __restrict s2, int64_t C) {
  #pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float xv = val(x[c]), z = xv * a[c] + b[c], e = exp_neg(-0.5f * z * z);
    E dze = as_elem<E>(val(g[c]) * (normal_cdf(z, e) + z * e * 0.3989422804f));   // 1/sqrt(2 pi)
    float dz = val(dze);
    dz_out[c] = dze;
    s1[c] += dz;
    s2[c] += dz * (xv - mu[c]) * rs[c];
  }
}

template <class E>
ROW dx_row(const E* __restrict x, E* __restrict d, const float* __restrict a,
           const float* __restrict mu, const float* __restrict rs, const float* __restrict k1,
           const float* __restrict k2, int64_t C) {
  #pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    float xhat = (val(x[c]) - mu[c]) * rs[c];
    d[c] = as_elem<E>(a[c] * (val(d[c]) - k1[c] - xhat * k2[c]));
  }
}

// Per-channel sums over the rows of an (M x C) matrix, each thread into its own slice of
// `bufs` (T x K x C doubles): f(row pointer, float sums[K][C]) adds one row into fp32 sums, which
// are moved into the doubles every 64 rows (so long sums keep their precision). Deterministic for
// a given thread count: OpenMP gives each thread a fixed range of rows.
template <int K, class F>
static std::vector<double> channel_sums(int64_t M, int64_t C, int T, F f) {
  std::vector<double> bufs((size_t)T * K * C, 0.0);
  parallel_for(0, M, 256, T, [&](int64_t begin, int64_t end, int tid) {
    double* acc = bufs.data() + (size_t)tid * K * C;
    std::vector<float> part((size_t)K * C);
    for (int64_t r0 = begin; r0 < end; r0 += 64) {
      std::fill(part.begin(), part.end(), 0.f);
      for (int64_t r = r0; r < std::min(end, r0 + 64); ++r) f(r, part.data());
      for (int64_t i = 0; i < K * C; ++i) acc[i] += part[i];
    }
  });
  std::vector<double> total((size_t)K * C, 0.0);
  for (int t = 0; t < T; ++t)
    for (int64_t i = 0; i < K * C; ++i) total[i] += bufs[(size_t)t * K * C + i];
  return total;
}

// Training forward over M = N*H*W rows of C channels (M > 0): writes Y = gelu(Wt * (X - mean) /
// sqrt(var + eps) + B) (X's element type), and the batch mean, biased variance and
// 1/sqrt(var + eps) per channel (fp32 vectors of C).
template <class E>
static void bn_gelu_fwd(const E* X, const float* Wt, const float* B, double eps, E* Y,
                        float* mean, float* var, float* rstd, int64_t M, int64_t C, int T) {
  // Sums of (x - shift) and its square, shift = the first row: no cancellation when |mean| >> std.
  std::vector<float> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = val(X[c]);
  const float* S = shift.data();
  auto sums = channel_sums<2>(M, C, T, [=](int64_t r, float* part) {
    stats_row(X + r * C, S, part, part + C, C);
  });
  std::vector<float> scale(C), shift2(C);
  for (int64_t c = 0; c < C; ++c) {
    double m1 = sums[c] / M, v = std::max(sums[C + c] / M - m1 * m1, 0.0);
    double mu = S[c] + m1, rs = 1.0 / std::sqrt(v + eps);
    mean[c] = (float)mu;
    var[c] = (float)v;
    rstd[c] = (float)rs;
    scale[c] = (float)(Wt[c] * rs);                   // z = x * scale + shift2
    shift2[c] = (float)(B[c] - mu * Wt[c] * rs);
  }
  const float *A = scale.data(), *Bs = shift2.data();
  parallel_for(0, M, 256, T, [=](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) gelu_row(X + r * C, Y + r * C, A, Bs, C);
  });
}

// Backward: from DY (X's element type and shape) and what the forward saved, writes D = dx and
// the gradients of the batch norm's weight and bias, GW and GB (fp32 sums over the batch).
template <class E>
static void bn_gelu_bwd(const E* DY, const E* X, const float* MU, const float* RS,
                        const float* Wt, const float* B, E* D, float* GW, float* GB,
                        int64_t M, int64_t C, int T) {
  std::vector<float> scale(C), shift2(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = Wt[c] * RS[c];
    shift2[c] = B[c] - MU[c] * scale[c];
  }
  const float *A = scale.data(), *Bs = shift2.data();
  // Pass 1: dz = dy * gelu'(z), rounded to X's type (bf16 or fp32) and kept in dx; sums of dz and
  // dz * xhat.
  auto sums = channel_sums<2>(M, C, T, [=](int64_t r, float* part) {
    dz_row(X + r * C, DY + r * C, D + r * C, A, Bs, MU, RS, part, part + C, C);
  });
  std::vector<float> k1(C), k2(C);
  for (int64_t c = 0; c < C; ++c) {
    GB[c] = (float)sums[c];
    GW[c] = (float)sums[C + c];
    k1[c] = (float)(sums[c] / M);
    k2[c] = (float)(sums[C + c] / M);
  }
  const float *K1 = k1.data(), *K2 = k2.data();
  // Pass 2: dx = weight * rstd * (dz - mean(dz) - xhat * mean(dz * xhat)), over dz.
  parallel_for(0, M, 256, T, [=](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) dx_row(X + r * C, D + r * C, A, MU, RS, K1, K2, C);
  });
}

extern "C" void ck_bn_gelu_fwd(const uint16_t* X, const float* Wt, const float* B, double eps, uint16_t* Y,
                               float* mean, float* var, float* rstd, int64_t M, int64_t C, int T) {
  bn_gelu_fwd(X, Wt, B, eps, Y, mean, var, rstd, M, C, T);
}
extern "C" void ck_bn_gelu_bwd(const uint16_t* DY, const uint16_t* X, const float* MU, const float* RS,
                               const float* Wt, const float* B, uint16_t* D, float* GW, float* GB,
                               int64_t M, int64_t C, int T) {
  bn_gelu_bwd(DY, X, MU, RS, Wt, B, D, GW, GB, M, C, T);
}
// The same in fp32, for CPUs without native bf16, where training runs in fp32.
extern "C" void ck_bn_gelu_fwd32(const float* X, const float* Wt, const float* B, double eps, float* Y,
                                 float* mean, float* var, float* rstd, int64_t M, int64_t C, int T) {
  bn_gelu_fwd(X, Wt, B, eps, Y, mean, var, rstd, M, C, T);
}
extern "C" void ck_bn_gelu_bwd32(const float* DY, const float* X, const float* MU, const float* RS,
                                 const float* Wt, const float* B, float* D, float* GW, float* GB,
                                 int64_t M, int64_t C, int T) {
  bn_gelu_bwd(DY, X, MU, RS, Wt, B, D, GW, GB, M, C, T);
}
