// Winograd F(m x m, 3 x 3) convolution for CPUs, with the transforms fused around the products.
//
// Lavin & Gray (CVPR 2016): Y = A^T [ (G g G^T) . (B^T d B) ] A. Input tiles are transformed into V[xi][t][c]
// (xi: the (m+2)^2 tile positions), each position's [tiles x C] slab is multiplied by the transformed filters
// U[xi][c][k] with oneDNN's batch-reduce GEMM micro-kernel (the one PyTorch exports as
// at::native::cpublas::brgemm: AVX2, AVX-512 or AMX code chosen at run time), and M[xi][t][k] is inverse-
// transformed straight into the output. Two ways to split the work over the threads:
//   - by tiles (large maps): each work item is a block of T output tiles, whose V and M stay in the core's
//     cache; the unfused formulation's whole transformed input and products (2.25x-4x the activation each)
//     never reach memory;
//   - by channels (small maps, large filters: the UNet's 8x8-32x32 layers): V of every tile is computed once
//     (a few MB), and each work item is a chunk of Kc output channels, so each filter byte is read once per
//     call and no two threads stream the same filters.
// Filters are either kept pre-transformed (U, fp32 [A*A][C][K], or bf16 VNNI pairs [A*A][C/2][K][2]) or
// transformed inside the call from the layer's weight: by channels, slab by slab of input channels right before
// their products (the slab stays in L2); by tiles, once per call. That costs about 324 * K * C flops against the
// convolution's 18 * K * C * pixels and holds no memory between calls.
//
// NCHW and NHWC inputs and outputs are read and written directly: work is cut into runs of tiles along one tile
// row, whose input rows are staged channel-minor in a small buffer (a transpose for NCHW) and whose output rows
// are staged the same way before the store.
//
// bf16 products (bf16=true): V and U are rounded to bf16, the products accumulate in fp32, the transforms stay
// fp32. The transforms amplify the rounding: about 3e-3 relative error for F(2,3) and 2e-2 to 9e-2 for
// F(4,3)/F(6,3), against 1e-5 to 4e-5 in fp32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

namespace {

template <int M>
struct Mats;
template <>
struct Mats<2> {  // points 0, 1, -1, inf
  static constexpr int A = 4;
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float G[4][3] = {{1, 0, 0}, {0.5f, 0.5f, 0.5f}, {0.5f, -0.5f, 0.5f}, {0, 0, 1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};
template <>
struct Mats<4> {  // points 0, 1, -1, 2, -2, inf
  static constexpr int A = 6;
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                     {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float G[6][3] = {{1.f / 4, 0, 0},
                                    {-1.f / 6, -1.f / 6, -1.f / 6},
                                    {-1.f / 6, 1.f / 6, -1.f / 6},
                                    {1.f / 24, 1.f / 12, 1.f / 6},
                                    {1.f / 24, -1.f / 12, 1.f / 6},
                                    {0, 0, 1}};
  static constexpr float AT[4][6] = {
      {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};
template <>
struct Mats<6> {  // points 0, 1, -1, 1/2, -1/2, 2, -2, inf
  static constexpr int A = 8;
  static constexpr float BT[8][8] = {{1, 0, -21.f / 4, 0, 21.f / 4, 0, -1, 0},
                                     {0, 1, 1, -17.f / 4, -17.f / 4, 1, 1, 0},
                                     {0, -1, 1, 17.f / 4, -17.f / 4, -1, 1, 0},
                                     {0, 0.5f, 0.25f, -2.5f, -1.25f, 2, 1, 0},
                                     {0, -0.5f, 0.25f, 2.5f, -1.25f, -2, 1, 0},
                                     {0, 2, 4, -2.5f, -5, 0.5f, 1, 0},
                                     {0, -2, 4, 2.5f, -5, -0.5f, 1, 0},
                                     {0, -1, 0, 21.f / 4, 0, -21.f / 4, 0, 1}};
  static constexpr float G[8][3] = {{1, 0, 0},
                                    {-2.f / 9, -2.f / 9, -2.f / 9},
                                    {-2.f / 9, 2.f / 9, -2.f / 9},
                                    {1.f / 90, 1.f / 45, 2.f / 45},
                                    {1.f / 90, -1.f / 45, 2.f / 45},
                                    {32.f / 45, 16.f / 45, 8.f / 45},
                                    {32.f / 45, -16.f / 45, 8.f / 45},
                                    {0, 0, 1}};
  static constexpr float AT[6][8] = {{1, 1, 1, 1, 1, 1, 1, 0},
                                     {0, 1, -1, 2, -2, 0.5f, -0.5f, 0},
                                     {0, 1, 1, 4, 4, 0.25f, 0.25f, 0},
                                     {0, 1, -1, 8, -8, 0.125f, -0.125f, 0},
                                     {0, 1, 1, 16, 16, 0.0625f, 0.0625f, 0},
                                     {0, 1, -1, 32, -32, 0.03125f, -0.03125f, 1}};
};

constexpr int64_t CB = 64;   // channels staged per pass (a few vector registers wide)
constexpr int64_t RUN = 32;  // tiles per staged run (bounds the staging buffers to a few hundred KB)

struct Geometry {
  int64_t N, C, H, W, K, Ho, Wo, th, tw, pad;
  int64_t sn, sc, sh, sw;  // input strides (elements)
  int64_t on, oc, oh, ow;  // output strides
};

// A piece of a block: tiles [ta, tb) of tile row ty in image n, stored at rows [t_off, t_off + tb - ta) of V / M.
struct Run {
  int64_t n, ty, ta, tb, t_off;
};

template <typename F>
inline void for_each_run(const Geometry& g, int64_t p0, int64_t count, F&& fn) {
  const int64_t per_image = g.th * g.tw;
  int64_t p = p0, end = p0 + count;
  while (p < end) {
    const int64_t n = p / per_image, r = p % per_image;
    const int64_t ty = r / g.tw, ta = r % g.tw;
    const int64_t tb = std::min({g.tw, ta + (end - p), ta + RUN});
    fn(Run{n, ty, ta, tb, p - p0});
    p += tb - ta;
  }
}

inline void store(float* dst, float v) { *dst = v; }

// o[c] += coef * s[c] for c < n: the one vector step every transform is made of (a row of a transform matrix
// applied to a channel-minor slab).
inline void axpy(float* o, float coef, const float* s, int64_t n) {
  for (int64_t c = 0; c < n; ++c) o[c] += coef * s[c];
}
inline void store(c10::BFloat16* dst, float v) { *dst = c10::BFloat16(v); }

// V[xi][t][c] = (B^T d B)[xi] for the run's tiles, channels [c0, c0 + cb); V rows are `ldv` apart.
template <int M, typename VT>
void input_run(const float* x, const Geometry& g, const Run& run, int64_t tiles_in_block, int64_t c0, int64_t cb,
               float* stage, VT* V, int64_t ldv) {
  using Mt = Mats<M>;
  constexpr int A = Mt::A;
  const int64_t X = (run.tb - run.ta) * M + (A - M);
  const int64_t xs = run.ta * M - g.pad, y0 = run.ty * M - g.pad;
  const float* base = x + run.n * g.sn + c0 * g.sc;
  // stage[i][xx][c]: the run's input rows, channel-minor, zero outside the image
  for (int i = 0; i < A; ++i) {
    float* srow = stage + (int64_t)i * X * CB;
    const int64_t y = y0 + i;
    if (y < 0 || y >= g.H) {
      std::memset(srow, 0, sizeof(float) * X * CB);
      continue;
    }
    if (g.sc == 1) {
      for (int64_t xx = 0; xx < X; ++xx) {
        const int64_t xi = xs + xx;
        float* d = srow + xx * CB;
        if (xi < 0 || xi >= g.W) std::memset(d, 0, sizeof(float) * cb);
        else std::memcpy(d, base + y * g.sh + xi * g.sw, sizeof(float) * cb);
      }
    } else {
      const int64_t lo = std::max<int64_t>(0, -xs), hi = std::min<int64_t>(X, g.W - xs);
      for (int64_t c = 0; c < cb; ++c) {
        const float* row = base + c * g.sc + y * g.sh;
        for (int64_t xx = 0; xx < lo; ++xx) srow[xx * CB + c] = 0.f;
        for (int64_t xx = lo; xx < hi; ++xx) srow[xx * CB + c] = row[(xs + xx) * g.sw];
        for (int64_t xx = std::max(lo, hi); xx < X; ++xx) srow[xx * CB + c] = 0.f;
      }
    }
  }
  alignas(64) float rows[A][A][CB];
  for (int64_t t = run.ta; t < run.tb; ++t) {
    const int64_t off = (t - run.ta) * M;
    // rows[i][j] = sum_k BT[i][k] d[k][j]
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        float* o = rows[i][j];
        for (int64_t c = 0; c < cb; ++c) o[c] = 0.f;
#pragma GCC unroll 8
        for (int k = 0; k < A; ++k) {
          const float coef = Mt::BT[i][k];
          if (coef == 0.f) continue;
          const float* s = stage + ((int64_t)k * X + off + j) * CB;
          axpy(o, coef, s, cb);
        }
      }
    }
    const int64_t trow = run.t_off + (t - run.ta);
    // V[i][j] = sum_k rows[i][k] BT[j][k]
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        alignas(64) float acc[CB];
        for (int64_t c = 0; c < cb; ++c) acc[c] = 0.f;
#pragma GCC unroll 8
        for (int k = 0; k < A; ++k) {
          const float coef = Mt::BT[j][k];
          if (coef == 0.f) continue;
          const float* s = rows[i][k];
          axpy(acc, coef, s, cb);
        }
        VT* o = V + ((int64_t)(i * A + j) * tiles_in_block + trow) * ldv + c0;
        for (int64_t c = 0; c < cb; ++c) store(o + c, acc[c]);
      }
    }
  }
}

// out = (A^T M A)[tile] + bias for the run's tiles, output channels [k0, k0 + kb).
// Mm holds [A*A][tiles_in_block][ldm] products; its column mk0 is output channel k0.
template <int M>
void output_run(const float* Mm, int64_t ldm, int64_t mk0, const Geometry& g, const Run& run, int64_t tiles_in_block,
                int64_t k0, int64_t kb, const float* bias, float* stage, float* out) {
  using Mt = Mats<M>;
  constexpr int A = Mt::A;
  const int64_t X = (run.tb - run.ta) * M;
  const int64_t step = (int64_t)tiles_in_block * ldm;  // between consecutive tile positions in M
  alignas(64) float cols[M][A][CB];
  for (int64_t t = run.ta; t < run.tb; ++t) {
    const float* src = Mm + (run.t_off + (t - run.ta)) * ldm + mk0;
    // cols[p][j] = sum_i AT[p][i] M[i][j]
#pragma GCC unroll 8
    for (int p = 0; p < M; ++p) {
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        float* o = cols[p][j];
        for (int64_t k = 0; k < kb; ++k) o[k] = 0.f;
#pragma GCC unroll 8
        for (int i = 0; i < A; ++i) {
          const float coef = Mt::AT[p][i];
          if (coef == 0.f) continue;
          const float* s = src + (int64_t)(i * A + j) * step;
          axpy(o, coef, s, kb);
        }
      }
    }
    const int64_t xoff = (t - run.ta) * M;
#pragma GCC unroll 8
    for (int p = 0; p < M; ++p) {
#pragma GCC unroll 8
      for (int q = 0; q < M; ++q) {
        float* o = stage + ((int64_t)p * X + xoff + q) * CB;
        if (bias) for (int64_t k = 0; k < kb; ++k) o[k] = bias[k0 + k];
        else for (int64_t k = 0; k < kb; ++k) o[k] = 0.f;
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          const float coef = Mt::AT[q][j];
          if (coef == 0.f) continue;
          const float* s = cols[p][j];
          axpy(o, coef, s, kb);
        }
      }
    }
  }
  const int64_t oy0 = run.ty * M, ox0 = run.ta * M;
  const int64_t rows = std::min<int64_t>(M, g.Ho - oy0), width = std::min<int64_t>(X, g.Wo - ox0);
  float* ob = out + run.n * g.on + k0 * g.oc;
  for (int64_t p = 0; p < rows; ++p) {
    const float* srow = stage + p * X * CB;
    if (g.oc == 1) {
      for (int64_t xx = 0; xx < width; ++xx)
        std::memcpy(ob + (oy0 + p) * g.oh + (ox0 + xx) * g.ow, srow + xx * CB, sizeof(float) * kb);
    } else {
      for (int64_t k = 0; k < kb; ++k) {
        float* row = ob + k * g.oc + (oy0 + p) * g.oh + ox0 * g.ow;
        for (int64_t xx = 0; xx < width; ++xx) row[xx * g.ow] = srow[xx * CB + k];
      }
    }
  }
}

constexpr int64_t FKB = 16;  // output channels per filter-transform pass

// Scratch memory kept per thread and grown to the largest request: allocating tens of MB afresh per call costs
// page faults and zeroing comparable to a small layer's whole convolution. Kept in one registry so that
// `release_scratch` can give all of it back (when the last Winograd patch goes).
enum Slot { V_ALL, U_ALL, V_BLOCK, U_BLOCK, M_BLOCK, STAGE_IN, STAGE_OUT, SLOTS };

struct Scratch {
  std::vector<float> slot[SLOTS];
};

std::mutex scratch_mutex;
std::unordered_map<std::thread::id, std::shared_ptr<Scratch>> scratch_by_thread;
uint64_t scratch_generation = 1;  // bumped by release_scratch: threads then start afresh

Scratch& thread_scratch() {
  thread_local std::shared_ptr<Scratch> mine;
  thread_local uint64_t generation = 0;
  std::lock_guard<std::mutex> lock(scratch_mutex);
  if (!mine || generation != scratch_generation) {
    mine = std::make_shared<Scratch>();
    scratch_by_thread[std::this_thread::get_id()] = mine;
    generation = scratch_generation;
  }
  return *mine;
}

template <typename T>
T* take(Slot slot, size_t n) {
  std::vector<float>& buf = thread_scratch().slot[slot];
  const size_t floats = (n * sizeof(T) + sizeof(float) - 1) / sizeof(float);
  if (buf.size() < floats) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(floats);
  }
  return reinterpret_cast<T*>(buf.data());
}

template <int M, typename VT>
void run_blocks(const float* x, const VT* U, const float* bias, float* out, const Geometry& g, int64_t T) {
  constexpr int A = Mats<M>::A;
  constexpr bool half = std::is_same<VT, c10::BFloat16>::value;
  const int64_t P = g.N * g.th * g.tw;
  const int64_t blocks = (P + T - 1) / T;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    VT* V = take<VT>(V_BLOCK, (size_t)A * A * T * g.C);
    float* Mm = take<float>(M_BLOCK, (size_t)A * A * T * g.K);
    float* sin = take<float>(STAGE_IN, (size_t)A * (RUN * M + A) * CB);
    float* sout = take<float>(STAGE_OUT, (size_t)M * RUN * M * CB);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t p0 = b * T, tb = std::min(T, P - p0);
      for_each_run(g, p0, tb, [&](const Run& run) {
        for (int64_t c0 = 0; c0 < g.C; c0 += CB)
          input_run<M, VT>(x, g, run, tb, c0, std::min(CB, g.C - c0), sin, V, g.C);
      });
      for (int xi = 0; xi < A * A; ++xi) {
        at::native::cpublas::brgemm(tb, g.K, g.C, g.C, g.K, g.K, false, V + (int64_t)xi * tb * g.C,
                                    U + (int64_t)xi * g.C * g.K, Mm + (int64_t)xi * tb * g.K, half);
      }
      for_each_run(g, p0, tb, [&](const Run& run) {
        for (int64_t k0 = 0; k0 < g.K; k0 += CB)
          output_run<M>(Mm, g.K, k0, g, run, tb, k0, std::min(CB, g.K - k0), bias, sout, out);
      });
    }
    if (half) at::native::cpublas::brgemm_release(true);
  });
}

template <int M, typename UT>
void filters_chunk(const float* w, const int64_t* ws, int64_t c0, int64_t cn, int64_t k0, int64_t kn, UT* dst,
                   int64_t ld, int64_t xi_stride);

constexpr int64_t FCC = 128;  // input channels per on-the-fly filter slab (keeps the slab in L2)

// Small maps with large filters (the UNet's 8x8-32x32 layers): every tile's transformed input is computed once
// (V for all P tiles, a few MB), then the output channels are split into chunks of Kc across the threads; each
// chunk's filters are read (stored U) or transformed from the weight into a cache-sized slab right before its
// products, so each filter byte crosses the memory bus once per call and no thread waits on another's.
template <int M, typename VT>
void run_channels(const float* x, const VT* U, const float* w, const int64_t* ws, const float* bias, float* out,
                  const Geometry& g, int64_t Kc) {
  constexpr int A = Mats<M>::A;
  constexpr bool half = std::is_same<VT, c10::BFloat16>::value;
  constexpr int64_t pair = half ? 2 : 1;
  const int64_t P = g.N * g.th * g.tw;
  VT* V = take<VT>(V_ALL, (size_t)A * A * P * g.C);
  std::vector<Run> runs;
  for_each_run(g, 0, P, [&](const Run& run) { runs.push_back(run); });
  at::parallel_for(0, (int64_t)runs.size(), 1, [&](int64_t r0, int64_t r1) {
    float* sin = take<float>(STAGE_IN, (size_t)A * (RUN * M + A) * CB);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t c0 = 0; c0 < g.C; c0 += CB) input_run<M, VT>(x, g, runs[r], P, c0, std::min(CB, g.C - c0), sin, V, g.C);
  });
  at::parallel_for(0, (g.K + Kc - 1) / Kc, 1, [&](int64_t q0, int64_t q1) {
    float* Mm = take<float>(M_BLOCK, (size_t)A * A * P * Kc);
    float* sout = take<float>(STAGE_OUT, (size_t)M * RUN * M * CB);
    VT* Uc = U ? nullptr : take<VT>(U_BLOCK, (size_t)A * A * FCC * Kc);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t k0 = q * Kc, kn = std::min(Kc, g.K - k0);
      const VT* B;
      int64_t ldb, xi_stride;
      if (U) {
        B = U + pair * k0;
        ldb = g.K;
        xi_stride = g.C * g.K;
        for (int xi = 0; xi < A * A; ++xi)
          at::native::cpublas::brgemm(P, kn, g.C, g.C, ldb, Kc, false, V + (int64_t)xi * P * g.C,
                                      B + xi * xi_stride, Mm + (int64_t)xi * P * Kc, half);
      } else {  // filters transformed slab by slab of input channels, each used while it is in cache
        for (int64_t c0 = 0; c0 < g.C; c0 += FCC) {
          const int64_t cn = std::min(FCC, g.C - c0);
          for (int64_t f = 0; f < kn; f += FKB)
            filters_chunk<M, VT>(w, ws, c0, cn, k0 + f, std::min(FKB, kn - f), Uc + pair * f, Kc, cn * Kc);
          for (int xi = 0; xi < A * A; ++xi)
            at::native::cpublas::brgemm(P, kn, cn, g.C, Kc, Kc, c0 > 0, V + (int64_t)xi * P * g.C + c0,
                                        Uc + xi * cn * Kc, Mm + (int64_t)xi * P * Kc, half);
        }
      }
      for (const Run& run : runs)
        for (int64_t kk = 0; kk < kn; kk += CB)
          output_run<M>(Mm, Kc, kk, g, run, P, k0 + kk, std::min(CB, kn - kk), bias, sout, out);
    }
    if (half) at::native::cpublas::brgemm_release(true);
  });
}

// Transformed filters of output channels [k0, k0 + kn) (kn <= FKB) for input channels [c0, c0 + cn) (c0 even),
// written to dst[xi * xi_stride + (c - c0) * ld + kk] (fp32) or, for bf16, in VNNI pairs dst[xi * xi_stride + (c / 2) * 2 * ld +
// 2 * kk + c % 2]. Vectorised over the output channels.

template <int M, typename UT>
void filters_chunk(const float* w, const int64_t* ws, int64_t c0, int64_t cn, int64_t k0, int64_t kn, UT* dst,
                   int64_t ld, int64_t xi_stride) {
  using Mt = Mats<M>;
  constexpr int A = Mt::A;
  constexpr bool vnni = std::is_same<UT, c10::BFloat16>::value;
  alignas(64) float gl[9][FKB];
  alignas(64) float gr[A][3][FKB];
  alignas(64) float u[FKB];
  for (int64_t c = 0; c < cn; ++c) {
    for (int64_t kk = 0; kk < kn; ++kk) {
      const float* g = w + (k0 + kk) * ws[0] + (c0 + c) * ws[1];
      for (int r = 0; r < 3; ++r)
        for (int q = 0; q < 3; ++q) gl[r * 3 + q][kk] = g[r * ws[2] + q * ws[3]];
    }
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
      for (int q = 0; q < 3; ++q)
        for (int64_t kk = 0; kk < FKB; ++kk)
          gr[i][q][kk] = Mt::G[i][0] * gl[q][kk] + Mt::G[i][1] * gl[3 + q][kk] + Mt::G[i][2] * gl[6 + q][kk];
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        for (int64_t kk = 0; kk < FKB; ++kk)
          u[kk] = gr[i][0][kk] * Mt::G[j][0] + gr[i][1][kk] * Mt::G[j][1] + gr[i][2][kk] * Mt::G[j][2];
        UT* o = dst + (int64_t)(i * A + j) * xi_stride;
        if (vnni) {
          o += (c / 2) * 2 * ld + (c % 2);
          for (int64_t kk = 0; kk < kn; ++kk) store(o + 2 * kk, u[kk]);
        } else {
          o += c * ld;
          for (int64_t kk = 0; kk < kn; ++kk) store(o + kk, u[kk]);
        }
      }
    }
  }
}

template <int M, typename UT>
void filters_into(const float* w, int64_t K, int64_t C, const int64_t* ws, UT* U) {
  at::parallel_for(0, (K + FKB - 1) / FKB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t k0 = b * FKB;
      filters_chunk<M, UT>(w, ws, 0, C, k0, std::min(FKB, K - k0),
                           U + (std::is_same<UT, c10::BFloat16>::value ? 2 : 1) * k0, K, C * K);
    }
  });
}

template <typename UT>
void filters_dispatch(const float* w, int64_t K, int64_t C, const int64_t* ws, int64_t m, UT* U) {
  if (m == 2) filters_into<2, UT>(w, K, C, ws, U);
  else if (m == 4) filters_into<4, UT>(w, K, C, ws, U);
  else filters_into<6, UT>(w, K, C, ws, U);
}

void check_tile(int64_t m) { TORCH_CHECK(m == 2 || m == 4 || m == 6, "winograd: tile m must be 2, 4 or 6, got ", m); }


template <int M, typename VT>
void dispatch_run(const float* x, const VT* U, const float* w, const int64_t* ws, const float* bias, float* out,
                  const Geometry& g, int64_t block, bool by_channels) {
  if (by_channels) {
    run_channels<M, VT>(x, U, w, ws, bias, out, g, block);
    return;
  }
  if (!U) {  // whole-filter transform once for this call, shared by every block
    constexpr int A = Mats<M>::A;
    VT* scratch = take<VT>(U_ALL, (size_t)A * A * g.C * g.K);
    filters_into<M, VT>(w, g.K, g.C, ws, scratch);
    U = scratch;
  }
  run_blocks<M, VT>(x, U, bias, out, g, block);
}

template <typename VT>
void dispatch_tile(int64_t m, const float* x, const VT* U, const float* w, const int64_t* ws, const float* bias,
                   float* out, const Geometry& g, int64_t block, bool by_channels) {
  if (m == 2) dispatch_run<2, VT>(x, U, w, ws, bias, out, g, block, by_channels);
  else if (m == 4) dispatch_run<4, VT>(x, U, w, ws, bias, out, g, block, by_channels);
  else dispatch_run<6, VT>(x, U, w, ws, bias, out, g, block, by_channels);
}

}  // namespace

// Transformed filters for tile m from a [K, C, 3, 3] fp32 weight: fp32 [A*A, C, K], or with bf16=true bf16 in
// VNNI pairs [A*A, C/2, K, 2] (C must be even).
at::Tensor transform_filters(const at::Tensor& weight, int64_t m, bool bf16) {
  check_tile(m);
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.scalar_type() == at::kFloat,
              "winograd: weight must be a float32 [K, C, 3, 3] tensor");
  const int64_t K = weight.size(0), C = weight.size(1), A = m + 2;
  TORCH_CHECK(!bf16 || C % 2 == 0, "winograd: bf16 filters need an even channel count, got ", C);
  const int64_t ws[4] = {weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3)};
  if (bf16) {
    auto U = at::empty({A * A, C / 2, K, 2}, weight.options().dtype(at::kBFloat16));
    filters_dispatch(weight.data_ptr<float>(), K, C, ws, m, U.data_ptr<c10::BFloat16>());
    return U;
  }
  auto U = at::empty({A * A, C, K}, weight.options());
  filters_dispatch(weight.data_ptr<float>(), K, C, ws, m, U.data_ptr<float>());
  return U;
}

// 3x3 stride-1 convolution of x [N, C, H, W] (fp32, NCHW or channels-last strides), zero padding `pad` (0 or 1).
// `filters` is either transform_filters' output for tile m (fp32 products, or bf16 ones for bf16 filters), or
// the layer's own fp32 weight [K, C, 3, 3], transformed during the call (then `bf16` picks the products' type).
// by_channels=false: work items are blocks of `block` output tiles (large maps); true: all tiles at once, work
// items are chunks of `block` output channels (small maps, large filters). The output has x's memory layout.
at::Tensor conv2d(const at::Tensor& x, const at::Tensor& filters, const std::optional<at::Tensor>& bias,
                     int64_t m, int64_t pad, int64_t block, bool bf16, bool by_channels) {
  check_tile(m);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "winograd: input must be a float32 CPU tensor [N, C, H, W]");
  TORCH_CHECK(pad == 0 || pad == 1, "winograd: padding must be 0 or 1");
  const int64_t A = m + 2;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const bool raw = filters.dim() == 4 && filters.size(2) == 3 && filters.size(3) == 3;
  int64_t K;
  if (raw) {
    TORCH_CHECK(filters.scalar_type() == at::kFloat && filters.size(1) == C,
                "winograd: weight must be float32 [K, ", C, ", 3, 3], got ", filters.sizes());
    TORCH_CHECK(!bf16 || C % 2 == 0, "winograd: bf16 products need an even channel count, got ", C);
    K = filters.size(0);
  } else {
    bf16 = filters.scalar_type() == at::kBFloat16;
    const bool shape_ok = bf16 ? (filters.dim() == 4 && filters.size(0) == A * A && filters.size(1) * 2 == C &&
                                  filters.size(3) == 2)
                               : (filters.dim() == 3 && filters.size(0) == A * A && filters.size(1) == C &&
                                  filters.scalar_type() == at::kFloat);
    TORCH_CHECK(shape_ok && filters.is_contiguous(), "winograd: filters ", filters.sizes(), " do not match C=", C,
                " and tile ", m);
    K = filters.size(2);
  }
  const int64_t Ho = H + 2 * pad - 2, Wo = W + 2 * pad - 2;
  TORCH_CHECK(Ho > 0 && Wo > 0, "winograd: input smaller than the filter");
  const bool nhwc = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor xin = nhwc || x.is_contiguous() ? x : x.contiguous();
  auto out = at::empty({N, K, Ho, Wo}, x.options().memory_format(nhwc ? at::MemoryFormat::ChannelsLast
                                                                           : at::MemoryFormat::Contiguous));
  Geometry g{N, C, H, W, K, Ho, Wo, (Ho + m - 1) / m, (Wo + m - 1) / m, pad,
             xin.stride(0), xin.stride(1), xin.stride(2), xin.stride(3),
             out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(bias_c.numel() == K, "winograd: bias has ", bias_c.numel(), " values for ", K, " channels");
    b = bias_c.data_ptr<float>();
  }
  const int64_t ws[4] = {raw ? filters.stride(0) : 0, raw ? filters.stride(1) : 0, raw ? filters.stride(2) : 0,
                         raw ? filters.stride(3) : 0};
  const float* w = raw ? filters.data_ptr<float>() : nullptr;
  const int64_t blk = std::max<int64_t>(1, block);
  const float* xp = xin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (bf16) {
    const auto* u = raw ? nullptr : filters.data_ptr<c10::BFloat16>();
    dispatch_tile<c10::BFloat16>(m, xp, u, w, ws, b, op, g, blk, by_channels);
  } else {
    const auto* u = raw ? nullptr : filters.data_ptr<float>();
    dispatch_tile<float>(m, xp, u, w, ws, b, op, g, blk, by_channels);
  }
  return out;
}

// Whether the bf16 products run on this CPU's native instructions (oneDNN brgemm on AVX-512 or AMX).
bool bf16_native() {
  static const bool ok = [] {
    try {
      std::vector<c10::BFloat16> a(2, c10::BFloat16(1.f)), b(2, c10::BFloat16(1.f));
      float c = 0.f;
      at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, false, a.data(), b.data(), &c, true);
      at::native::cpublas::brgemm_release(true);
      return c == 2.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return ok;
}

// Bytes of scratch memory every thread keeps between calls.
int64_t scratch_bytes() {
  std::lock_guard<std::mutex> lock(scratch_mutex);
  int64_t total = 0;
  for (auto& kv : scratch_by_thread)
    for (auto& buf : kv.second->slot) total += (int64_t)buf.capacity() * sizeof(float);
  return total;
}

// Give every thread's scratch back. Only while no convolution runs (the caller makes sure).
void release_scratch() {
  std::lock_guard<std::mutex> lock(scratch_mutex);
  for (auto& kv : scratch_by_thread)
    for (auto& buf : kv.second->slot) {
      buf.clear();
      buf.shrink_to_fit();
    }
  scratch_by_thread.clear();
  ++scratch_generation;
}

// Registered as torch.ops.sdaccel_winograd.* (no Python binding code to compile: the library is loaded with
// torch.ops.load_library).
TORCH_LIBRARY(sdaccel_winograd, lib) {
  lib.def("transform_filters(Tensor weight, int m, bool bf16) -> Tensor", &transform_filters);
  lib.def("conv2d(Tensor x, Tensor filters, Tensor? bias, int m, int pad, int block, bool bf16, bool by_channels) -> Tensor",
          &conv2d);
  lib.def("bf16_native() -> bool", &bf16_native);
  lib.def("scratch_bytes() -> int", &scratch_bytes);
  lib.def("release_scratch() -> ()", &release_scratch);
}
