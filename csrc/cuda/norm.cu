// CUDA kernels of residual-add + RMSNorm / LayerNorm, forward and backward.
//
// Forward, rows up to kRegRowFwd: a group of G threads (G = 32..512, a multiple of a warp) owns one row; small rows
// pack several groups into one block. Each thread holds its share of the row in registers (at most 16 values), so
// x and residual are read once and y / h written once: the bytes-roofline amount of data. Longer rows: one block
// of 1024 threads per row, which reads it three times (sum, squared deviations, output), the second and third
// from L1/L2 (a row is at most a few hundred KB) instead of keeping it in registers.
// Loads and stores are 16 bytes wide when the row length and every pointer allow it, scalar otherwise.
//
// Backward, rows up to kRegRowBwd: a block walks rows with a grid stride; its threads always own the same columns
// and keep xhat, dy * w and their dweight / dbias partials in registers, writing one partial row per block at the
// end. Longer rows: one kernel computes each row's two sums, a second walks column tiles (each thread a few
// columns down many rows, its partials in registers) and writes dx; dy and saved are read twice. Either way a
// last kernel sums the partial rows per column in a fixed order: deterministic (no atomics), run to run on the
// same GPU. No kernel spills registers or uses a stack frame (scripts/cuda_resources.py, in CI).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "pyperf/column_plan.h"
#include "pyperf/cuda_glue.cuh"
#include "pyperf/norm.h"

namespace pyperf {
namespace {

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC > 16 ? 16 : sizeof(T) * VEC) Packed {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  Packed<T, VEC> pk = *reinterpret_cast<const Packed<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = static_cast<float>(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  Packed<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Packed<T, VEC>*>(p) = pk;
}

// weight / bias are either the activation dtype or float32 (master weights): a uniform branch.
template <typename T, int VEC>
__device__ __forceinline__ void load_affine(const void* p, bool f32, int col, float* out) {
  if (f32) {
    load_vec<float, VEC>(static_cast<const float*>(p) + col, out);
  } else {
    load_vec<T, VEC>(static_cast<const T*>(p) + col, out);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of (a, b) over the G threads of this thread's row group. Every thread of the block must call it (all
// groups of a block have the same G). Fixed order: the same bits on every run.
__device__ __forceinline__ float2 group_sum2(float a, float b, int G, float2* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (G == 32) return make_float2(a, b);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = make_float2(a, b);
  __syncthreads();
  const int wpg = G >> 5, first = (warp / wpg) * wpg;
  float2 t = make_float2(0.f, 0.f);
  for (int i = 0; i < wpg; ++i) {
    t.x += smem[first + i].x;
    t.y += smem[first + i].y;
  }
  __syncthreads();  // smem is reused by the next reduction
  return t;
}

constexpr int kMaxe = 16;          // values per thread and array in the register kernels
constexpr int kRegRowFwd = 512 * kMaxe;
constexpr int kRegRowBwd = 256 * kMaxe;

template <typename T, int VEC, bool RMS>
__global__ void __launch_bounds__(512) add_norm_kernel(const T* __restrict__ x, const T* __restrict__ res,
                                                        const void* __restrict__ w, const void* __restrict__ b,
                                                        bool affine_f32, T* __restrict__ y, T* __restrict__ h,
                                                        float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                                        int64_t M, int N, int G, float eps) {
  constexpr int IT = kMaxe / VEC;
  __shared__ float2 smem[32];
  const int t = threadIdx.x % G;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / G) + threadIdx.x / G;
  const bool valid = row < M;
  const int64_t base = valid ? row * N : 0;
  float v[IT][VEC];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < IT; ++i) {
    const int col = (i * G + t) * VEC;
    if (valid && col < N) {
      load_vec<T, VEC>(x + base + col, v[i]);
      if (res != nullptr) {
        float r[VEC];
        load_vec<T, VEC>(res + base + col, r);
        // normalize the rounded h that is returned and saved, so forward and backward agree
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = static_cast<float>(static_cast<T>(v[i][j] + r[j]));
        store_vec<T, VEC>(h + base + col, v[i]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) s += RMS ? v[i][j] * v[i][j] : v[i][j];
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
    }
  }
  const float inv_n = N > 0 ? 1.f / static_cast<float>(N) : 0.f;
  float mu = 0.f, var;
  if (RMS) {
    var = group_sum2(s, 0.f, G, smem).x * inv_n;
  } else {
    mu = group_sum2(s, 0.f, G, smem).x * inv_n;
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int col = (i * G + t) * VEC;
      if (valid && col < N) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) ss += (v[i][j] - mu) * (v[i][j] - mu);
      }
    }
    var = group_sum2(ss, 0.f, G, smem).x * inv_n;
  }
  const float rs = rsqrtf(var + eps);
  if (!valid) return;  // no block-wide sync below
  if (t == 0) {
    if (mean_out != nullptr) mean_out[row] = mu;
    rstd_out[row] = rs;
  }
#pragma unroll
  for (int i = 0; i < IT; ++i) {
    const int col = (i * G + t) * VEC;
    if (col < N) {
      float o[VEC], wv[VEC], bv[VEC];
      if (w != nullptr) load_affine<T, VEC>(w, affine_f32, col, wv);
      if (b != nullptr) load_affine<T, VEC>(b, affine_f32, col, bv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float z = (v[i][j] - mu) * rs;
        if (w != nullptr) z *= wv[j];
        if (b != nullptr) z += bv[j];
        o[j] = z;
      }
      store_vec<T, VEC>(y + base + col, o);
    }
  }
}

// Rows longer than kRegRowFwd: one row per block of 1024 threads, read three times; h (x + residual, rounded to
// T) is written in the first pass and is what the later passes read, as the register kernel normalizes it.
template <typename T, int VEC, bool RMS>
__global__ void __launch_bounds__(1024) add_norm_long_kernel(const T* __restrict__ x, const T* __restrict__ res,
                                                             const void* __restrict__ w, const void* __restrict__ b,
                                                             bool affine_f32, T* __restrict__ y, T* h,
                                                             float* __restrict__ mean_out,
                                                             float* __restrict__ rstd_out, int N, float eps) {
  __shared__ float2 smem[32];
  const int G = blockDim.x, stride = G * VEC;
  const int64_t row = blockIdx.x, base = row * N;
  const T* src = res != nullptr ? h + base : x + base;
  float s = 0.f;
  for (int col = threadIdx.x * VEC; col < N; col += stride) {
    float v[VEC];
    load_vec<T, VEC>(x + base + col, v);
    if (res != nullptr) {
      float r[VEC];
      load_vec<T, VEC>(res + base + col, r);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = static_cast<float>(static_cast<T>(v[j] + r[j]));
      store_vec<T, VEC>(h + base + col, v);  // read back below by this same thread only
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) s += RMS ? v[j] * v[j] : v[j];
  }
  const float inv_n = 1.f / static_cast<float>(N);
  float mu = 0.f, var;
  if (RMS) {
    var = group_sum2(s, 0.f, G, smem).x * inv_n;
  } else {
    mu = group_sum2(s, 0.f, G, smem).x * inv_n;
    float ss = 0.f;
    for (int col = threadIdx.x * VEC; col < N; col += stride) {
      float v[VEC];
      load_vec<T, VEC>(src + col, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss += (v[j] - mu) * (v[j] - mu);
    }
    var = group_sum2(ss, 0.f, G, smem).x * inv_n;
  }
  const float rs = rsqrtf(var + eps);
  if (threadIdx.x == 0) {
    if (mean_out != nullptr) mean_out[row] = mu;
    rstd_out[row] = rs;
  }
  for (int col = threadIdx.x * VEC; col < N; col += stride) {
    float v[VEC], wv[VEC], bv[VEC];
    load_vec<T, VEC>(src + col, v);
    if (w != nullptr) load_affine<T, VEC>(w, affine_f32, col, wv);
    if (b != nullptr) load_affine<T, VEC>(b, affine_f32, col, bv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float z = (v[j] - mu) * rs;
      if (w != nullptr) z *= wv[j];
      if (b != nullptr) z += bv[j];
      v[j] = z;
    }
    store_vec<T, VEC>(y + base + col, v);
  }
}

// One element group (VEC columns at col) of the backward: xhat, g = dy * w, and the dy values.
template <typename T, int VEC, bool RMS>
__device__ __forceinline__ void bwd_load(const T* __restrict__ dy, const T* __restrict__ saved, const void* w,
                                         const void* b_out, bool affine_f32, bool from_output, int64_t base,
                                         int col, float mu, float rs, float* xh, float* g, float* d) {
  float sv[VEC], wv[VEC], bv[VEC];
  load_vec<T, VEC>(dy + base + col, d);
  load_vec<T, VEC>(saved + base + col, sv);
  if (w != nullptr) load_affine<T, VEC>(w, affine_f32, col, wv);
  if (b_out != nullptr) load_affine<T, VEC>(b_out, affine_f32, col, bv);
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    float xv;
    if (from_output) {  // y = xhat * w + b (w has no zeros: docs/norm.md)
      xv = b_out != nullptr ? sv[j] - bv[j] : sv[j];
      if (w != nullptr) xv /= wv[j];
    } else {
      xv = (sv[j] - mu) * rs;
    }
    xh[j] = xv;
    g[j] = w != nullptr ? d[j] * wv[j] : d[j];
  }
}

// Rows up to kRegRowBwd: xhat and g stay in registers between the row reduction and the dx pass, the dweight /
// dbias partials across the block's rows (256-thread bound: up to 255 registers, none spilled).
template <typename T, int VEC, bool RMS>
__global__ void __launch_bounds__(256) add_norm_backward_kernel(
    const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ saved, const void* __restrict__ w,
    const void* __restrict__ b, bool affine_f32, const float* __restrict__ mean, const float* __restrict__ rstd,
    bool from_output, T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part, int64_t M,
    int N, int G) {
  constexpr int IT = kMaxe / VEC;
  __shared__ float2 smem[32];
  // R row groups per block (R = 256 / G)
  const int R = blockDim.x / G, t = threadIdx.x % G, r = threadIdx.x / G;
  float dwa[IT][VEC], dba[IT][VEC];
#pragma unroll
  for (int i = 0; i < IT; ++i)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dwa[i][j] = dba[i][j] = 0.f;
  const float inv_n = N > 0 ? 1.f / static_cast<float>(N) : 0.f;
  const void* b_out = (from_output && !RMS) ? b : nullptr;  // the bias only matters to rebuild xhat from y

  // row0 is uniform per block, so the syncs in group_sum2 are safe
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * R; row0 < M; row0 += static_cast<int64_t>(gridDim.x) * R) {
    const int64_t row = row0 + r;
    const bool valid = row < M;
    const int64_t base = valid ? row * N : 0;
    const float rs = valid ? rstd[row] : 0.f;
    const float mu = (RMS || from_output || !valid) ? 0.f : mean[row];
    float xh[IT][VEC], g[IT][VEC];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int col = (i * G + t) * VEC;
      if (valid && col < N) {
        float d[VEC];
        bwd_load<T, VEC, RMS>(dy, saved, w, b_out, affine_f32, from_output, base, col, mu, rs, xh[i], g[i], d);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          dwa[i][j] += d[j] * xh[i][j];
          if (!RMS) dba[i][j] += d[j];
          s1 += g[i][j];
          s2 += g[i][j] * xh[i][j];
        }
      }
    }
    const float2 sums = group_sum2(RMS ? 0.f : s1, s2, G, smem);
    const float c1 = sums.x * inv_n, c2 = sums.y * inv_n;
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int col = (i * G + t) * VEC;
      if (valid && col < N) {
        float o[VEC], e[VEC];
        if (dh != nullptr) load_vec<T, VEC>(dh + base + col, e);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          o[j] = rs * (g[i][j] - c1 - xh[i][j] * c2);
          if (dh != nullptr) o[j] += e[j];
        }
        store_vec<T, VEC>(dx + base + col, o);
      }
    }
  }
  if (R == 1) {
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int col = (i * G + t) * VEC;
      if (col < N) {
        float* pw = dw_part != nullptr ? dw_part + static_cast<int64_t>(blockIdx.x) * N + col : nullptr;
        float* pb = db_part != nullptr ? db_part + static_cast<int64_t>(blockIdx.x) * N + col : nullptr;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          if (pw != nullptr) pw[j] = dwa[i][j];
          if (!RMS && pb != nullptr) pb[j] = dba[i][j];
        }
      }
    }
    return;
  }
  // Several row groups: sum their partials in shared memory (fixed order) so each block writes one row.
  // R > 1 only when G <= 128, and G * kMaxe >= N: R * N <= 256 * kMaxe floats (16 KiB).
  __shared__ float red[256 * kMaxe];
  for (int which = 0; which < (RMS ? 1 : 2); ++which) {
    float* part = which == 0 ? dw_part : db_part;
    if (part == nullptr) continue;  // uniform
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int col = (i * G + t) * VEC;
      if (col < N) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) red[r * N + col + j] = which == 0 ? dwa[i][j] : dba[i][j];
      }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < N; c += blockDim.x) {
      float acc = 0.f;
      for (int q = 0; q < R; ++q) acc += red[q * N + c];
      part[static_cast<int64_t>(blockIdx.x) * N + c] = acc;
    }
    __syncthreads();
  }
}

// Rows longer than kRegRowBwd, first kernel: per row, c = (sum(g) / N, sum(g * xhat) / N) with g = dy * w (the
// first is 0 for RMSNorm). One row per block of up to 1024 threads, streamed.
template <typename T, int VEC, bool RMS>
__global__ void __launch_bounds__(1024) norm_row_sums_kernel(const T* __restrict__ dy, const T* __restrict__ saved,
                                                             const void* __restrict__ w, const void* __restrict__ b,
                                                             bool affine_f32, const float* __restrict__ mean,
                                                             const float* __restrict__ rstd, bool from_output,
                                                             float2* __restrict__ c, int N) {
  __shared__ float2 smem[32];
  const int64_t row = blockIdx.x, base = row * N;
  const float rs = rstd[row];
  const float mu = (RMS || from_output) ? 0.f : mean[row];
  const void* b_out = (from_output && !RMS) ? b : nullptr;
  float s1 = 0.f, s2 = 0.f;
  for (int col = threadIdx.x * VEC; col < N; col += blockDim.x * VEC) {
    float xh[VEC], g[VEC], d[VEC];
    bwd_load<T, VEC, RMS>(dy, saved, w, b_out, affine_f32, from_output, base, col, mu, rs, xh, g, d);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s1 += g[j];
      s2 += g[j] * xh[j];
    }
  }
  const float2 sums = group_sum2(RMS ? 0.f : s1, s2, blockDim.x, smem);
  const float inv_n = 1.f / static_cast<float>(N);
  if (threadIdx.x == 0) c[row] = make_float2(sums.x * inv_n, sums.y * inv_n);
}

// Rows longer than kRegRowBwd, second kernel: column tiles (pyperf/column_plan.h). A thread owns VEC columns and
// walks rows with a grid stride: dx from the row's sums, and its columns' dweight / dbias partials in registers,
// written to row `lane` of the partials.
template <typename T, int VEC, bool RMS>
__global__ void __launch_bounds__(256) add_norm_backward_cols_kernel(
    const T* __restrict__ dy, const T* __restrict__ dh, const T* __restrict__ saved, const void* __restrict__ w,
    const void* __restrict__ b, bool affine_f32, const float* __restrict__ mean, const float* __restrict__ rstd,
    const float2* __restrict__ c, bool from_output, T* __restrict__ dx, float* __restrict__ dw_part,
    float* __restrict__ db_part, int64_t M, int N) {
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (col >= N) return;  // no barrier in this kernel
  const void* b_out = (from_output && !RMS) ? b : nullptr;
  float dwa[VEC], dba[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) dwa[j] = dba[j] = 0.f;
  const int64_t lane = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row = lane; row < M; row += stride) {
    const int64_t base = row * N;
    const float rs = rstd[row];
    const float mu = (RMS || from_output) ? 0.f : mean[row];
    const float2 cr = c[row];
    float xh[VEC], g[VEC], d[VEC], o[VEC], e[VEC];
    bwd_load<T, VEC, RMS>(dy, saved, w, b_out, affine_f32, from_output, base, col, mu, rs, xh, g, d);
    if (dh != nullptr) load_vec<T, VEC>(dh + base + col, e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dwa[j] += d[j] * xh[j];
      if (!RMS) dba[j] += d[j];
      o[j] = rs * (g[j] - cr.x - xh[j] * cr.y);
      if (dh != nullptr) o[j] += e[j];
    }
    store_vec<T, VEC>(dx + base + col, o);
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (dw_part != nullptr) dw_part[lane * N + col + j] = dwa[j];
    if (!RMS && db_part != nullptr) db_part[lane * N + col + j] = dba[j];
  }
}

// out_k[col] = sum over p of part_k[p][col], in order of p (k = blockIdx.y: dweight, then dbias if any).
template <typename T>
__global__ void __launch_bounds__(256) norm_affine_grad_kernel(const float* __restrict__ part0, void* out0, const float* __restrict__ part1,
                                        void* out1, int P, int N, bool out_f32) {
  __shared__ float red[8][33];
  const float* part = blockIdx.y == 0 ? part0 : part1;
  void* out = blockIdx.y == 0 ? out0 : out1;
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < N)
    for (int p = threadIdx.y; p < P; p += 8) s += part[static_cast<int64_t>(p) * N + col];
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    float tot = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) tot += red[k][threadIdx.x];
    if (out_f32) {
      static_cast<float*>(out)[col] = tot;
    } else {
      static_cast<T*>(out)[col] = static_cast<T>(tot);
    }
  }
}

// ---- launch planning ---------------------------------------------------------------------------------------

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16 bytes / element size, or 1 when the row length or a pointer does not allow 16-byte accesses.
int vec_for(int64_t N, int64_t elem_size, bool pointers_aligned) {
  return (pointers_aligned && N % (16 / elem_size) == 0) ? static_cast<int>(16 / elem_size) : 1;
}

// The fewest threads per row (a power of two from 32) that keep at most kMaxe values per thread.
int group_for(int64_t N) {
  int G = 32;
  while (static_cast<int64_t>(G) * kMaxe < N) G *= 2;
  return G;
}

int checked_n(int64_t N, const char* name) {
  TORCH_CHECK(N <= 0x7fffffff, name, ": expected a last dim below 2^31, got ", N);
  return static_cast<int>(N);
}

const void* opt_ptr(const c10::optional<at::Tensor>& t) { return norm::present(t) ? t->data_ptr() : nullptr; }

bool affine_is_f32(const c10::optional<at::Tensor>& w, const c10::optional<at::Tensor>& b,
                   c10::ScalarType x_dtype) {
  // check_affine allows x's dtype or float32 for each and check_affine_pair makes both agree (norm.h), so one
  // flag covers both.
  const bool wf = norm::present(w) && w->scalar_type() == c10::kFloat && x_dtype != c10::kFloat;
  const bool bf = norm::present(b) && b->scalar_type() == c10::kFloat && x_dtype != c10::kFloat;
  return wf || bf;
}

template <typename T, bool RMS>
void launch_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                at::Tensor& y, at::Tensor& h, at::Tensor* mean, at::Tensor& rstd, norm::Rows rows) {
  if (rows.M == 0) return;
  const T* xp = static_cast<const T*>(x.data_ptr());
  const T* rp = norm::present(residual) ? static_cast<const T*>(residual->data_ptr()) : nullptr;
  const void* wp = opt_ptr(weight);
  const void* bp = opt_ptr(bias);
  T* yp = static_cast<T*>(y.data_ptr());
  T* hp = rp ? static_cast<T*>(h.data_ptr()) : nullptr;
  const bool f32 = affine_is_f32(weight, bias, x.scalar_type());
  const bool al = aligned16(xp) && aligned16(rp) && aligned16(wp) && aligned16(bp) && aligned16(yp) && aligned16(hp);
  const bool vec = vec_for(rows.N, sizeof(T), al) > 1;
  float* mp = mean ? mean->data_ptr<float>() : nullptr;
  float* sp = rstd.data_ptr<float>();
  const int N = checked_n(rows.N, "x");
  const float e = static_cast<float>(eps);
  const cudaStream_t stream = cuda::current_stream();
  constexpr int V = 16 / sizeof(T);
  if (rows.N > kRegRowFwd) {  // one row per block
    TORCH_CHECK(rows.M <= 0x7fffffff, "x: too many rows (", rows.M, ")");
    auto run = [&](auto kernel) {
      cuda::launch(kernel, static_cast<unsigned>(rows.M), 1024, stream, xp, rp, wp, bp, f32, yp, hp, mp, sp, N, e);
    };
    if (vec) {
      run(add_norm_long_kernel<T, V, RMS>);
    } else {
      run(add_norm_long_kernel<T, 1, RMS>);
    }
    return;
  }
  const int G = group_for(rows.N);
  const int threads = std::max(G, 128);
  const int64_t rows_per_block = threads / G;
  const int64_t blocks = (rows.M + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= 0x7fffffff, "x: too many rows (", rows.M, ")");
  auto run = [&](auto kernel) {
    cuda::launch(kernel, static_cast<unsigned>(blocks), threads, stream, xp, rp, wp, bp, f32, yp, hp, mp, sp, rows.M,
                 N, G, e);
  };
  if (vec) {
    run(add_norm_kernel<T, V, RMS>);
  } else {
    run(add_norm_kernel<T, 1, RMS>);
  }
}

template <typename T, bool RMS>
void launch_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh, const at::Tensor& saved,
                const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool saved_is_output, at::Tensor& dx,
                at::Tensor& dweight, at::Tensor& dbias, norm::Rows rows) {
  if (rows.M == 0) return;  // dweight / dbias were allocated as zeros
  const T* dyp = static_cast<const T*>(dy.data_ptr());
  const T* dhp = norm::present(dh) ? static_cast<const T*>(dh->data_ptr()) : nullptr;
  const T* sp = static_cast<const T*>(saved.data_ptr());
  const void* wp = opt_ptr(weight);
  const void* bp = RMS ? nullptr : opt_ptr(bias);
  T* dxp = static_cast<T*>(dx.data_ptr());
  const bool f32 = affine_is_f32(weight, RMS ? c10::nullopt : bias, saved.scalar_type());
  const bool al = aligned16(dyp) && aligned16(dhp) && aligned16(sp) && aligned16(wp) && aligned16(bp) &&
                  aligned16(dxp);
  const bool vec = vec_for(rows.N, sizeof(T), al) > 1;
  const bool want_dw = wp != nullptr, want_db = bp != nullptr;
  const float* mp = (norm::present(mean) && !RMS) ? mean->data_ptr<float>() : nullptr;
  const float* rp = rstd.data_ptr<float>();
  const int N = checked_n(rows.N, "saved");
  const cudaStream_t stream = cuda::current_stream();
  constexpr int V = 16 / sizeof(T);
  at::Tensor dw_part, db_part;
  float *dwp = nullptr, *dbp = nullptr;
  auto partials = [&](int64_t P) {  // P rows of dweight / dbias partials
    if (want_dw) dw_part = at::empty({P, rows.N}, saved.options().dtype(at::kFloat));
    if (want_db) db_part = at::empty({P, rows.N}, saved.options().dtype(at::kFloat));
    dwp = want_dw ? dw_part.data_ptr<float>() : nullptr;
    dbp = want_db ? db_part.data_ptr<float>() : nullptr;
  };
  int64_t P = 0;
  if (rows.N <= kRegRowBwd) {
    // 256-thread blocks of R = 256 / G row groups; one wave of resident blocks walking the rows with a grid
    // stride: every block writes one partial row, so P (and the extra P x N floats) is as small as a full GPU
    // allows.
    const int G = group_for(rows.N);
    const int64_t R = 256 / G;
    auto run = [&](auto kernel) {
      const int per_sm = cuda::max_active_blocks(kernel, 256);
      P = std::max<int64_t>(1, std::min<int64_t>((rows.M + R - 1) / R,
                                                 static_cast<int64_t>(cuda::sm_count(saved.get_device())) *
                                                     std::max(per_sm, 1)));
      partials(P);
      cuda::launch(kernel, static_cast<unsigned>(P), 256, stream, dyp, dhp, sp, wp, bp, f32, mp, rp, saved_is_output,
                   dxp, dwp, dbp, rows.M, N, G);
    };
    if (vec) {
      run(add_norm_backward_kernel<T, V, RMS>);
    } else {
      run(add_norm_backward_kernel<T, 1, RMS>);
    }
  } else {
    // The rows' sums first, then column tiles.
    TORCH_CHECK(rows.M <= 0x7fffffff, "saved: too many rows (", rows.M, ")");
    at::Tensor c = at::empty({rows.M, 2}, saved.options().dtype(at::kFloat));
    float2* cp = reinterpret_cast<float2*>(c.data_ptr<float>());
    const int vw = vec ? V : 1;
    const ColumnPlan cpl = column_plan(rows.M, (rows.N + vw - 1) / vw, want_dw || want_db,
                                       cuda::sm_count(saved.get_device()));
    P = cpl.slots;
    partials(P);
    auto run = [&](auto sums_kernel, auto cols_kernel) {
      cuda::launch(sums_kernel, static_cast<unsigned>(rows.M), 1024, stream, dyp, sp, wp, bp, f32, mp, rp,
                   saved_is_output, cp, N);
      cuda::launch(cols_kernel, dim3(cpl.gx, cpl.gy), dim3(cpl.bx, cpl.by), stream, dyp, dhp, sp, wp, bp, f32, mp,
                   rp, cp, saved_is_output, dxp, dwp, dbp, rows.M, N);
    };
    if (vec) {
      run(norm_row_sums_kernel<T, V, RMS>, add_norm_backward_cols_kernel<T, V, RMS>);
    } else {
      run(norm_row_sums_kernel<T, 1, RMS>, add_norm_backward_cols_kernel<T, 1, RMS>);
    }
  }
  if ((want_dw || want_db) && rows.N > 0) {
    at::Tensor& out0 = want_dw ? dweight : dbias;
    const dim3 grid(static_cast<unsigned>((rows.N + 31) / 32), (want_dw && want_db) ? 2 : 1);
    cuda::launch(norm_affine_grad_kernel<T>, grid, dim3(32, 8), stream, want_dw ? dwp : dbp, out0.data_ptr(), dbp,
                 want_db ? dbias.data_ptr() : nullptr, static_cast<int>(P), N, out0.scalar_type() == c10::kFloat);
  }
}

template <typename F>
void dispatch_cuda(c10::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case c10::kFloat:
      f(float{});
      break;
    case c10::kBFloat16:
      f(c10::BFloat16{});
      break;
    case c10::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, name, ": expected dtype float32, bfloat16 or float16, got ", t);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_cuda(const at::Tensor& x,
                                                                 const c10::optional<at::Tensor>& residual,
                                                                 const c10::optional<at::Tensor>& weight, double eps,
                                                                 bool save_output) {
  (void)save_output;
  const norm::Rows rows = norm::check_fwd(x, residual, weight, c10::nullopt, eps, /*allow_double=*/false);
  cuda::DeviceGuard guard(x.device());
  at::Tensor y = norm::empty_like_x(x);
  at::Tensor h = norm::present(residual) ? norm::empty_like_x(x) : norm::empty_none(x);
  at::Tensor rstd = norm::empty_stat(x);
  dispatch_cuda(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    launch_fwd<T, true>(x, residual, weight, c10::nullopt, eps, y, h, nullptr, rstd, rows);
  });
  return {y, h, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_cuda(
    const at::Tensor& x, const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, bool save_output) {
  (void)save_output;
  const norm::Rows rows = norm::check_fwd(x, residual, weight, bias, eps, /*allow_double=*/false);
  cuda::DeviceGuard guard(x.device());
  at::Tensor y = norm::empty_like_x(x);
  at::Tensor h = norm::present(residual) ? norm::empty_like_x(x) : norm::empty_none(x);
  at::Tensor mean = norm::empty_stat(x);
  at::Tensor rstd = norm::empty_stat(x);
  dispatch_cuda(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    launch_fwd<T, false>(x, residual, weight, bias, eps, y, h, &mean, rstd, rows);
  });
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm_backward_cuda(const at::Tensor& dy,
                                                              const c10::optional<at::Tensor>& dh,
                                                              const at::Tensor& saved,
                                                              const c10::optional<at::Tensor>& weight,
                                                              const at::Tensor& rstd, bool saved_is_output) {
  const norm::Rows rows = norm::check_bwd(dy, dh, saved, weight, c10::nullopt, c10::nullopt, rstd, saved_is_output,
                                          /*layer_norm=*/false, /*allow_double=*/false);
  cuda::DeviceGuard guard(saved.device());
  at::Tensor dx = norm::empty_like_x(saved);
  at::Tensor dweight = norm::affine_grad_out(weight, saved, rows.M);
  at::Tensor dbias_unused;
  dispatch_cuda(saved.scalar_type(), "saved", [&](auto tag) {
    using T = decltype(tag);
    launch_bwd<T, true>(dy, dh, saved, weight, c10::nullopt, c10::nullopt, rstd, saved_is_output, dx, dweight,
                        dbias_unused, rows);
  });
  return {dx, dweight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layer_norm_backward_cuda(
    const at::Tensor& dy, const c10::optional<at::Tensor>& dh, const at::Tensor& saved,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool saved_is_output) {
  const norm::Rows rows = norm::check_bwd(dy, dh, saved, weight, bias, mean, rstd, saved_is_output,
                                          /*layer_norm=*/true, /*allow_double=*/false);
  cuda::DeviceGuard guard(saved.device());
  at::Tensor dx = norm::empty_like_x(saved);
  at::Tensor dweight = norm::affine_grad_out(weight, saved, rows.M);
  at::Tensor dbias = norm::affine_grad_out(bias, saved, rows.M);
  dispatch_cuda(saved.scalar_type(), "saved", [&](auto tag) {
    using T = decltype(tag);
    launch_bwd<T, false>(dy, dh, saved, weight, bias, mean, rstd, saved_is_output, dx, dweight, dbias, rows);
  });
  return {dx, dweight, dbias};
}

PYPERF_CUDA_KERNELS(m) {
  m.impl("add_rms_norm", &add_rms_norm_cuda);
  m.impl("add_layer_norm", &add_layer_norm_cuda);
  m.impl("add_rms_norm_backward", &add_rms_norm_backward_cuda);
  m.impl("add_layer_norm_backward", &add_layer_norm_backward_cuda);
}

}  // namespace pyperf
