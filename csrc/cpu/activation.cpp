// CPU kernels of the fused activations: bias + GeLU, bias + dropout + residual-add, SwiGLU / GeGLU, forward and
// backward. Every op views its input as [rows, hidden] and runs tiles of (row block x column block) in
// at::parallel_for. Elements are staged through small float buffers so the math loops are plain float loops the
// compiler vectorizes (with exp/erfc written as branch-free polynomials instead of libm calls), and on x86 those
// loops are also compiled for AVX2/AVX-512 and picked at load time (target_clones).
// float64 runs the same formulas with libm, for gradcheck.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "pyperf/activation.h"
#include "pyperf/dispatch.h"
#include "pyperf/philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define PYPERF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYPERF_CLONES
#endif

#if defined(__GNUC__)
#define PYPERF_MATH inline __attribute__((always_inline))  // the tile loops only vectorize with these inlined
#else
#define PYPERF_MATH inline
#endif

namespace pyperf {
namespace {

constexpr int64_t kTile = 256;  // elements staged per inner loop: a few float buffers stay in L1

// ---- math --------------------------------------------------------------------------------------------------
// float: branch-free so loops over a tile vectorize. double: libm, for gradcheck.

// Clamp through the integer order of float bit patterns: integer min/max stay selects, where a float `x < lo ?`
// gets turned into branches by GCC (PRE) and stops the vectorizer. A nan comes out as lo or hi: every caller
// below also multiplies or divides by its own argument, so a nan input still gives a nan result; +-inf clamp
// like huge finite values (gelu(inf) = inf).
PYPERF_MATH int32_t ordered_key(int32_t b) { return b ^ ((b >> 31) & 0x7fffffff); }
PYPERF_MATH float clamp_f(float x, float lo, float hi) {
  const int32_t klo = ordered_key(std::bit_cast<int32_t>(lo)), khi = ordered_key(std::bit_cast<int32_t>(hi));
  int32_t k = ordered_key(std::bit_cast<int32_t>(x));
  k = k < klo ? klo : k;
  k = k > khi ? khi : k;
  return std::bit_cast<float>(ordered_key(k));
}


PYPERF_MATH float exp_f(float x) {
  // Cephes expf: exp(x) = 2^n * exp(r), |r| <= ln2/2; the clamp keeps 2^n a normal float (exp(-87.3) ~ 1e-38).
  x = clamp_f(x, -87.3f, 88.3f);
  float fx = x * 1.44269504088896341f;
  // Round to nearest through the 1.5*2^23 trick (|fx| <= 128 after the clamp); it vectorizes.
  const float magic = 12582912.0f;
  float t = fx + magic;
  float n = t - magic;
  int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(magic);
  float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  float pow2n = std::bit_cast<float>(static_cast<int32_t>((ni + 127) << 23));
  return p * pow2n;
}

// erfc with a relative error below 1.2e-7 everywhere (Numerical Recipes' Chebyshev fit "erfcc"): the GeLU
// needs Phi(x) = erfc(-x/sqrt2)/2 accurate in relative terms for negative x, where 1 + erf(x) would cancel.
PYPERF_MATH float erfc_f(float x) {
  float z = std::fabs(x);
  float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t + -0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t + -1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t + -0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  float r = t * exp_f(-z * z - 1.26551223f + t * p);
  return x >= 0.0f ? r : 2.0f - r;
}

PYPERF_MATH float exp_of(float x) { return exp_f(x); }
PYPERF_MATH double exp_of(double x) { return std::exp(x); }
PYPERF_MATH float erfc_of(float x) { return erfc_f(x); }
PYPERF_MATH double erfc_of(double x) { return std::erfc(x); }

template <typename A>
struct K {
  static constexpr A sqrt_2_over_pi = A(0.7978845608028654);
  static constexpr A coef = A(0.044715);
  static constexpr A inv_sqrt2 = A(0.7071067811865476);
  static constexpr A inv_sqrt_2pi = A(0.3989422804014327);
};

// gelu_tanh(x) = 0.5 x (1 + tanh(z)) = x * sigmoid(2z), z = sqrt(2/pi) (x + 0.044715 x^3): the sigmoid form has
// no cancellation near 0 and needs one exp.
template <typename A>
PYPERF_MATH A gelu_tanh_fwd(A x) {
  A z = K<A>::sqrt_2_over_pi * (x + K<A>::coef * x * x * x);
  return x / (A(1) + exp_of(A(-2) * z));
}
template <typename A>
PYPERF_MATH A gelu_tanh_bwd(A x) {
  A z = K<A>::sqrt_2_over_pi * (x + K<A>::coef * x * x * x);
  A s = A(1) / (A(1) + exp_of(A(-2) * z));  // = (1 + tanh z) / 2
  // d/dx = s + x * (1 - tanh^2 z)/2 * dz/dx, with (1 - tanh^2 z) = 4 s (1 - s).
  return s + A(2) * x * s * (A(1) - s) * K<A>::sqrt_2_over_pi * (A(1) + A(3) * K<A>::coef * x * x);
}
// gelu(x) = x Phi(x), Phi(x) = erfc(-x / sqrt2) / 2; gelu'(x) = Phi(x) + x phi(x).
template <typename A>
PYPERF_MATH A gelu_erf_fwd(A x) {
  return A(0.5) * x * erfc_of(-x * K<A>::inv_sqrt2);
}
template <typename A>
PYPERF_MATH A gelu_erf_bwd(A x) {
  return A(0.5) * erfc_of(-x * K<A>::inv_sqrt2) + x * K<A>::inv_sqrt_2pi * exp_of(A(-0.5) * x * x);
}
template <typename A>
PYPERF_MATH A silu_fwd(A x) {
  return x / (A(1) + exp_of(-x));
}

// ---- tile loops (the hot loops; float versions are compiled per ISA) ---------------------------------------

template <typename A>
PYPERF_MATH void gelu_fwd_tile_t(A* v, int64_t n, bool tanh_approx) {
  if (tanh_approx) {
    for (int64_t j = 0; j < n; ++j) v[j] = gelu_tanh_fwd(v[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) v[j] = gelu_erf_fwd(v[j]);
  }
}
// g[j] <- g[j] * gelu'(v[j])
template <typename A>
PYPERF_MATH void gelu_bwd_tile_t(const A* v, A* g, int64_t n, bool tanh_approx) {
  if (tanh_approx) {
    for (int64_t j = 0; j < n; ++j) g[j] *= gelu_tanh_bwd(v[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) g[j] *= gelu_erf_bwd(v[j]);
  }
}
template <GatedAct ACT, typename A>
PYPERF_MATH A gated_fwd_one(A x) {
  if constexpr (ACT == GatedAct::Silu) return silu_fwd(x);
  else if constexpr (ACT == GatedAct::Gelu) return gelu_erf_fwd(x);
  else return gelu_tanh_fwd(x);
}
// act(x) and act'(x) together, sharing the one exp/erfc both need.
template <GatedAct ACT, typename A>
PYPERF_MATH void gated_both(A x, A& f, A& df) {
  if constexpr (ACT == GatedAct::Silu) {
    const A s = A(1) / (A(1) + exp_of(-x));
    f = x * s;
    df = s * (A(1) + x * (A(1) - s));
  } else if constexpr (ACT == GatedAct::Gelu) {
    const A phi_cdf = A(0.5) * erfc_of(-x * K<A>::inv_sqrt2);
    f = x * phi_cdf;
    df = phi_cdf + x * K<A>::inv_sqrt_2pi * exp_of(A(-0.5) * x * x);
  } else {
    const A z = K<A>::sqrt_2_over_pi * (x + K<A>::coef * x * x * x);
    const A s = A(1) / (A(1) + exp_of(A(-2) * z));
    f = x * s;
    df = s + A(2) * x * s * (A(1) - s) * K<A>::sqrt_2_over_pi * (A(1) + A(3) * K<A>::coef * x * x);
  }
}
// y[j] <- act(a[j]) * b[j]. One loop per activation (a switch inside the loop body stops the vectorizer).
template <GatedAct ACT, typename A>
PYPERF_MATH void gated_fwd_loop(const A* __restrict__ a, const A* __restrict__ b, A* __restrict__ y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = gated_fwd_one<ACT>(a[j]) * b[j];
}
// a[j] <- g * b * act'(a), b[j] <- g * act(a): the two input gradients, in place of the inputs.
template <GatedAct ACT, typename A>
PYPERF_MATH void gated_bwd_loop(A* __restrict__ a, A* __restrict__ b, const A* __restrict__ g, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    A f, df;
    gated_both<ACT>(a[j], f, df);
    a[j] = g[j] * b[j] * df;
    b[j] = g[j] * f;
  }
}
template <typename A>
PYPERF_MATH void gated_fwd_tile_t(const A* a, const A* b, A* y, int64_t n, GatedAct act) {
  switch (act) {
    case GatedAct::Silu: return gated_fwd_loop<GatedAct::Silu>(a, b, y, n);
    case GatedAct::Gelu: return gated_fwd_loop<GatedAct::Gelu>(a, b, y, n);
    case GatedAct::GeluTanh: return gated_fwd_loop<GatedAct::GeluTanh>(a, b, y, n);
  }
}
template <typename A>
PYPERF_MATH void gated_bwd_tile_t(A* a, A* b, const A* g, int64_t n, GatedAct act) {
  switch (act) {
    case GatedAct::Silu: return gated_bwd_loop<GatedAct::Silu>(a, b, g, n);
    case GatedAct::Gelu: return gated_bwd_loop<GatedAct::Gelu>(a, b, g, n);
    case GatedAct::GeluTanh: return gated_bwd_loop<GatedAct::GeluTanh>(a, b, g, n);
  }
}

PYPERF_CLONES void gelu_fwd_tile_f(float* v, int64_t n, bool t) { gelu_fwd_tile_t(v, n, t); }
PYPERF_CLONES void gelu_bwd_tile_f(const float* v, float* g, int64_t n, bool t) { gelu_bwd_tile_t(v, g, n, t); }
PYPERF_CLONES void gated_fwd_tile_f(const float* a, const float* b, float* y, int64_t n, GatedAct act) {
  gated_fwd_tile_t(a, b, y, n, act);
}
PYPERF_CLONES void gated_bwd_tile_f(float* a, float* b, const float* g, int64_t n, GatedAct act) {
  gated_bwd_tile_t(a, b, g, n, act);
}

inline void gelu_fwd_tile(float* v, int64_t n, bool t) { gelu_fwd_tile_f(v, n, t); }
inline void gelu_fwd_tile(double* v, int64_t n, bool t) { gelu_fwd_tile_t(v, n, t); }
inline void gelu_bwd_tile(const float* v, float* g, int64_t n, bool t) { gelu_bwd_tile_f(v, g, n, t); }
inline void gelu_bwd_tile(const double* v, double* g, int64_t n, bool t) { gelu_bwd_tile_t(v, g, n, t); }
inline void gated_fwd_tile(const float* a, const float* b, float* y, int64_t n, GatedAct act) {
  gated_fwd_tile_f(a, b, y, n, act);
}
inline void gated_fwd_tile(const double* a, const double* b, double* y, int64_t n, GatedAct act) {
  gated_fwd_tile_t(a, b, y, n, act);
}
inline void gated_bwd_tile(float* a, float* b, const float* g, int64_t n, GatedAct act) {
  gated_bwd_tile_f(a, b, g, n, act);
}
inline void gated_bwd_tile(double* a, double* b, const double* g, int64_t n, GatedAct act) {
  gated_bwd_tile_t(a, b, g, n, act);
}

// Staging between the tensors and the float tiles. bf16 <-> float get their own per-ISA loops (integer bit
// operations, the same rounding as c10::BFloat16: nearest-even, nan -> 0x7fc0); other pairs a plain loop.
PYPERF_CLONES void load_bf16(const uint16_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = std::bit_cast<float>(static_cast<uint32_t>(src[j]) << 16);
}
PYPERF_CLONES void store_bf16(const float* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = std::bit_cast<uint32_t>(src[j]);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[j] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
}

template <typename T, typename A>
inline void load(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    load_bf16(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<A>(src[j]);
  }
}
template <typename T, typename A>
inline void store(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    store_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
  }
}

// The raw Philox draws of groups g0 .. g0+G-1 (4 per group): a loop over independent groups, so it vectorizes
// (32x32->64-bit multiplies).
PYPERF_CLONES void philox_groups(uint64_t seed, uint64_t offset, uint64_t g0, int64_t G, uint32_t* __restrict__ out) {
  for (int64_t k = 0; k < G; ++k) {
    const Philox4 r = philox_group(seed, offset, g0 + static_cast<uint64_t>(k));
    out[4 * k + 0] = r.x[0];
    out[4 * k + 1] = r.x[1];
    out[4 * k + 2] = r.x[2];
    out[4 * k + 3] = r.x[3];
  }
}

// mask * scale of flat elements i0 .. i0+n-1 (n <= kTile), element i taking lane i%4 of group i/4 (philox.h).
inline void dropout_scale_tile(const DropoutParams& d, uint64_t i0, float* __restrict__ m, int64_t n) {
  uint32_t raw[kTile + 8];
  const uint64_t g0 = i0 >> 2;
  const int64_t G = static_cast<int64_t>(((i0 + n - 1) >> 2) - g0 + 1);
  philox_groups(d.seed, d.offset, g0, G, raw);
  const uint32_t* r = raw + (i0 & 3);
  // u = (r >> 8) * 2^-24 >= p  <=>  (r >> 8) >= ceil(p * 2^24), exactly (p * 2^24 is exact in float): the same
  // keep test as philox_uniform(...) >= p, in integers and with a mask instead of a branch (a ternary here
  // compiles to an unpredictable branch).
  const uint32_t threshold = static_cast<uint32_t>(std::ceil(static_cast<double>(d.p) * 16777216.0));
  const uint32_t scale_bits = std::bit_cast<uint32_t>(d.scale);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t keep = 0u - static_cast<uint32_t>((r[j] >> 8) >= threshold);
    m[j] = std::bit_cast<float>(keep & scale_bits);
  }
}

// ---- tiling ------------------------------------------------------------------------------------------------

// Tasks of (row block x column block). The split depends on the shape only, never on the thread count, so a
// bias gradient reduced over row blocks (partials per row block, summed in block order) is deterministic.
struct Tiling {
  int64_t rows, hidden, rows_per_block, row_blocks, col_block, col_blocks;
};

inline Tiling make_tiling(int64_t rows, int64_t hidden) {
  Tiling t;
  t.rows = rows;
  t.hidden = hidden;
  t.col_block = std::max<int64_t>(1, std::min<int64_t>(hidden, 4096));
  t.col_blocks = hidden == 0 ? 0 : (hidden + t.col_block - 1) / t.col_block;
  // ~32K elements per task so small inputs run inline (no threading overhead); at most 64 row blocks so the
  // partial bias sums stay small.
  t.rows_per_block = std::max<int64_t>(1, 32768 / t.col_block);
  int64_t rb = (rows + t.rows_per_block - 1) / t.rows_per_block;
  if (rb > 64) t.rows_per_block = (rows + 63) / 64;
  t.row_blocks = rows == 0 ? 0 : (rows + t.rows_per_block - 1) / t.rows_per_block;
  return t;
}

// f(row_block, r0, r1, c0, c1) for every tile, in parallel.
template <typename F>
void for_each_tile(const Tiling& t, const F& f) {
  const int64_t tasks = t.row_blocks * t.col_blocks;
  if (tasks == 0) return;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t rb = k / t.col_blocks, cb = k % t.col_blocks;
      const int64_t r0 = rb * t.rows_per_block, r1 = std::min(t.rows, r0 + t.rows_per_block);
      const int64_t c0 = cb * t.col_block, c1 = std::min(t.hidden, c0 + t.col_block);
      f(rb, r0, r1, c0, c1);
    }
  });
}

// grad_bias[c] = sum over row blocks (in order) of partial[rb][c].
template <typename T, typename A>
void finish_bias_grad(const std::vector<A>& partial, const Tiling& t, T* out) {
  at::parallel_for(0, t.hidden, 4096, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A s = A(0);
      for (int64_t rb = 0; rb < t.row_blocks; ++rb) s += partial[rb * t.hidden + c];
      out[c] = static_cast<T>(s);
    }
  });
}

at::Tensor empty_bias_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// ---- bias + GeLU -------------------------------------------------------------------------------------------

at::Tensor bias_gelu_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                         c10::string_view approximate) {
  check_bias_gelu(x_in, bias_in);
  const bool tanh_approx = parse_gelu_approx(approximate) == GeluApprox::Tanh;
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = has(bias_in) ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t hidden = last_dim(x);
  const Tiling t = make_tiling(hidden == 0 ? 0 : x.numel() / hidden, hidden);
  PYPERF_DISPATCH_FLOAT(x.scalar_type(), "bias_gelu_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for_each_tile(t, [&](int64_t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      A bb[kTile], v[kTile];
      for (int64_t c = c0; c < c1; c += kTile) {
        const int64_t n = std::min(kTile, c1 - c);
        if (bp) load(bp + c, bb, n); else std::fill(bb, bb + n, A(0));
        for (int64_t r = r0; r < r1; ++r) {
          load(xp + r * hidden + c, v, n);
          for (int64_t j = 0; j < n; ++j) v[j] += bb[j];
          gelu_fwd_tile(v, n, tanh_approx);
          store(v, yp + r * hidden + c, n);
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                          const std::optional<at::Tensor>& bias_in,
                                                          c10::string_view approximate, bool bias_grad) {
  check_bias_gelu_backward(grad_in, x_in, bias_in, bias_grad);
  const bool tanh_approx = parse_gelu_approx(approximate) == GeluApprox::Tanh;
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor bias = has(bias_in) ? bias_in->contiguous() : at::Tensor();
  at::Tensor gx = at::empty(x.sizes(), x.options());
  const int64_t hidden = last_dim(x);
  at::Tensor gb = bias_grad ? at::empty({hidden}, x.options()) : empty_bias_grad(x);
  const Tiling t = make_tiling(hidden == 0 ? 0 : x.numel() / hidden, hidden);
  PYPERF_DISPATCH_FLOAT(x.scalar_type(), "bias_gelu_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    std::vector<A> partial(bias_grad ? t.row_blocks * hidden : 0);
    for_each_tile(t, [&](int64_t rb, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      A bb[kTile], v[kTile], g[kTile];
      for (int64_t c = c0; c < c1; c += kTile) {
        const int64_t n = std::min(kTile, c1 - c);
        if (bp) load(bp + c, bb, n); else std::fill(bb, bb + n, A(0));
        A* acc = bias_grad ? partial.data() + rb * hidden + c : nullptr;
        if (acc) std::fill(acc, acc + n, A(0));
        for (int64_t r = r0; r < r1; ++r) {
          load(xp + r * hidden + c, v, n);
          for (int64_t j = 0; j < n; ++j) v[j] += bb[j];
          load(gp + r * hidden + c, g, n);
          gelu_bwd_tile(v, g, n, tanh_approx);
          store(g, gxp + r * hidden + c, n);
          if (acc) for (int64_t j = 0; j < n; ++j) acc[j] += g[j];
        }
      }
    });
    if (bias_grad) finish_bias_grad(partial, t, gb.mutable_data_ptr<scalar_t>());
  });
  return {gx, gb};
}

// ---- bias + dropout + residual-add -------------------------------------------------------------------------

at::Tensor bias_dropout_residual_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                                     const at::Tensor& residual_in, double p, c10::SymInt seed, c10::SymInt offset) {
  check_bias_dropout_residual(x_in, bias_in, residual_in);
  const DropoutParams d = make_dropout_params(p, seed.expect_int(), offset.expect_int());
  const at::Tensor x = x_in.contiguous(), res = residual_in.contiguous();
  const at::Tensor bias = has(bias_in) ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t hidden = last_dim(x);
  const Tiling t = make_tiling(hidden == 0 ? 0 : x.numel() / hidden, hidden);
  const bool identity = d.p == 0.0f;
  PYPERF_DISPATCH_FLOAT(x.scalar_type(), "bias_dropout_residual_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for_each_tile(t, [&](int64_t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      A bb[kTile], vx[kTile], vr[kTile];
      float m[kTile];
      for (int64_t c = c0; c < c1; c += kTile) {
        const int64_t n = std::min(kTile, c1 - c);
        if (bp) load(bp + c, bb, n); else std::fill(bb, bb + n, A(0));
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t base = r * hidden + c;
          load(xp + base, vx, n);
          load(rp + base, vr, n);
          if (identity) {
            for (int64_t j = 0; j < n; ++j) vx[j] = vr[j] + (vx[j] + bb[j]);
          } else {
            dropout_scale_tile(d, static_cast<uint64_t>(base), m, n);
            // A plain multiply, like torch's dropout: a dropped inf/nan still turns into nan (never hidden).
            for (int64_t j = 0; j < n; ++j) vx[j] = vr[j] + (vx[j] + bb[j]) * static_cast<A>(m[j]);
          }
          store(vx, yp + base, n);
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_residual_backward_cpu(const at::Tensor& grad_in, double p,
                                                                      c10::SymInt seed, c10::SymInt offset,
                                                                      bool bias_grad) {
  check_bias_dropout_residual_backward(grad_in);
  const DropoutParams d = make_dropout_params(p, seed.expect_int(), offset.expect_int());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor gx = at::empty(grad.sizes(), grad.options());
  const int64_t hidden = last_dim(grad);
  at::Tensor gb = bias_grad ? at::empty({hidden}, grad.options()) : empty_bias_grad(grad);
  const Tiling t = make_tiling(hidden == 0 ? 0 : grad.numel() / hidden, hidden);
  const bool identity = d.p == 0.0f;
  PYPERF_DISPATCH_FLOAT(grad.scalar_type(), "bias_dropout_residual_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    std::vector<A> partial(bias_grad ? t.row_blocks * hidden : 0);
    for_each_tile(t, [&](int64_t rb, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      A v[kTile];
      float m[kTile];
      for (int64_t c = c0; c < c1; c += kTile) {
        const int64_t n = std::min(kTile, c1 - c);
        A* acc = bias_grad ? partial.data() + rb * hidden + c : nullptr;
        if (acc) std::fill(acc, acc + n, A(0));
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t base = r * hidden + c;
          load(gp + base, v, n);
          if (!identity) {
            dropout_scale_tile(d, static_cast<uint64_t>(base), m, n);
            for (int64_t j = 0; j < n; ++j) v[j] *= static_cast<A>(m[j]);
          }
          store(v, gxp + base, n);
          if (acc) for (int64_t j = 0; j < n; ++j) acc[j] += v[j];
        }
      }
    });
    if (bias_grad) finish_bias_grad(partial, t, gb.mutable_data_ptr<scalar_t>());
  });
  return {gx, gb};
}

// ---- SwiGLU / GeGLU ----------------------------------------------------------------------------------------

at::Tensor gated_act_cpu(const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
                         c10::string_view activation) {
  const GatedShape s = check_gated(a_in, b_in);
  const GatedAct act = parse_gated_act(activation);
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = s.split ? at::Tensor() : b_in->contiguous();
  at::Tensor y = at::empty(gated_out_shape(a, s), a.options());
  const Tiling t = make_tiling(s.rows, s.hidden);
  PYPERF_DISPATCH_FLOAT(a.scalar_type(), "gated_act_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = s.split ? ap + s.hidden : b.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    for_each_tile(t, [&](int64_t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      A va[kTile], vb[kTile], vy[kTile];
      for (int64_t c = c0; c < c1; c += kTile) {
        const int64_t n = std::min(kTile, c1 - c);
        for (int64_t r = r0; r < r1; ++r) {
          load(ap + r * s.in_stride + c, va, n);
          load(bp + r * s.in_stride + c, vb, n);
          gated_fwd_tile(va, vb, vy, n, act);
          store(vy, yp + r * s.hidden + c, n);
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> gated_act_backward_cpu(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                          const std::optional<at::Tensor>& b_in,
                                                          c10::string_view activation) {
  const GatedShape s = check_gated_backward(grad_in, a_in, b_in);
  const GatedAct act = parse_gated_act(activation);
  const at::Tensor a = a_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor b = s.split ? at::Tensor() : b_in->contiguous();
  // Split: one gradient shaped like a (both halves). Separate: grad_a and grad_b.
  at::Tensor ga = at::empty(a.sizes(), a.options());
  at::Tensor gb = s.split ? at::empty({0}, a.options()) : at::empty(a.sizes(), a.options());
  const Tiling t = make_tiling(s.rows, s.hidden);
  PYPERF_DISPATCH_FLOAT(a.scalar_type(), "gated_act_backward_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = s.split ? ap + s.hidden : b.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gap = ga.mutable_data_ptr<scalar_t>();
    scalar_t* gbp = s.split ? gap + s.hidden : gb.mutable_data_ptr<scalar_t>();
    for_each_tile(t, [&](int64_t, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
      A va[kTile], vb[kTile], vg[kTile];
      for (int64_t c = c0; c < c1; c += kTile) {
        const int64_t n = std::min(kTile, c1 - c);
        for (int64_t r = r0; r < r1; ++r) {
          load(ap + r * s.in_stride + c, va, n);
          load(bp + r * s.in_stride + c, vb, n);
          load(gp + r * s.hidden + c, vg, n);
          gated_bwd_tile(va, vb, vg, n, act);
          store(va, gap + r * s.in_stride + c, n);
          store(vb, gbp + r * s.in_stride + c, n);
        }
      }
    });
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyperf, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
  m.impl("bias_dropout_residual", &bias_dropout_residual_cpu);
  m.impl("bias_dropout_residual_backward", &bias_dropout_residual_backward_cpu);
  m.impl("gated_act", &gated_act_cpu);
  m.impl("gated_act_backward", &gated_act_backward_cpu);
}

}  // namespace pyperf
