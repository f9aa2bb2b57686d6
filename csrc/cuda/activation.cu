// CUDA kernels of the fused activations: bias + GeLU, bias + dropout + residual-add, SwiGLU / GeGLU, forward and
// backward.
//
// Every op views its input as [rows, hidden]. One kernel shape serves all of them: a 2-D grid where x walks the
// columns in 16-byte vectors (VEC elements: 4 fp32, 8 bf16/fp16) and y grid-strides over the rows, so a thread
// loads its bias vector once and, in backward, accumulates its columns' bias gradient in registers. The partial
// sums go to a [slots, hidden] buffer (slot = the thread's row lane) and a second kernel sums the slots in a fixed
// order: the bias gradient is deterministic (it depends on the launch plan, which depends on the shape and the
// GPU's SM count only). Rows whose length is not a multiple of VEC, or unaligned pointers, take the VEC = 1
// instance of the same kernels (the scalar path).
//
// The dropout mask is Philox(seed, offset) at the element's flat index, the mapping of csrc/include/pyperf/
// philox.h, exactly as on the CPU: the same (seed, offset) gives the same mask on both.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "pyperf/activation.h"
#include "pyperf/column_plan.h"
#include "pyperf/cuda_glue.cuh"
#include "pyperf/dispatch.h"
#include "pyperf/philox.h"

namespace pyperf {
namespace {

// ---- math (float for fp32/bf16/fp16, double for fp64) -----------------------------------------------------

// Rounded multiply and add that nvcc cannot contract into an FMA: where CPU and CUDA promise the same bits
// (bias + dropout + residual), the CPU rounds the product before the add.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

__device__ __forceinline__ float dexp(float x) { return __expf(x); }
__device__ __forceinline__ double dexp(double x) { return ::exp(x); }
__device__ __forceinline__ float derfc(float x) { return ::erfcf(x); }
__device__ __forceinline__ double derfc(double x) { return ::erfc(x); }

template <typename A>
struct K {
  static constexpr A sqrt_2_over_pi = A(0.7978845608028654);
  static constexpr A coef = A(0.044715);
  static constexpr A inv_sqrt2 = A(0.7071067811865476);
  static constexpr A inv_sqrt_2pi = A(0.3989422804014327);
};

// The same formulas as csrc/cpu/activation.cpp: gelu_tanh(x) = x * sigmoid(2z); gelu(x) = x Phi(x) with
// Phi(x) = erfc(-x/sqrt2)/2 (no cancellation for negative x); silu(x) = x * sigmoid(x).
template <typename A>
__device__ __forceinline__ A gelu_tanh_fwd(A x) {
  A z = K<A>::sqrt_2_over_pi * (x + K<A>::coef * x * x * x);
  return x / (A(1) + dexp(A(-2) * z));
}
template <typename A>
__device__ __forceinline__ A gelu_tanh_bwd(A x) {
  A z = K<A>::sqrt_2_over_pi * (x + K<A>::coef * x * x * x);
  A s = A(1) / (A(1) + dexp(A(-2) * z));
  return s + A(2) * x * s * (A(1) - s) * K<A>::sqrt_2_over_pi * (A(1) + A(3) * K<A>::coef * x * x);
}
template <typename A>
__device__ __forceinline__ A gelu_erf_fwd(A x) {
  return A(0.5) * x * derfc(-x * K<A>::inv_sqrt2);
}
template <typename A>
__device__ __forceinline__ A gelu_erf_bwd(A x) {
  return A(0.5) * derfc(-x * K<A>::inv_sqrt2) + x * K<A>::inv_sqrt_2pi * dexp(A(-0.5) * x * x);
}
template <typename A>
__device__ __forceinline__ A silu_fwd(A x) {
  return x / (A(1) + dexp(-x));
}
template <typename A>
__device__ __forceinline__ A silu_bwd(A x) {
  A s = A(1) / (A(1) + dexp(-x));
  return s * (A(1) + x * (A(1) - s));
}

template <typename A>
__device__ __forceinline__ A gelu_fwd(A x, bool tanh_approx) {
  return tanh_approx ? gelu_tanh_fwd(x) : gelu_erf_fwd(x);
}
template <typename A>
__device__ __forceinline__ A gelu_bwd(A x, bool tanh_approx) {
  return tanh_approx ? gelu_tanh_bwd(x) : gelu_erf_bwd(x);
}
template <typename A>
__device__ __forceinline__ A gated_fwd(A x, GatedAct act) {
  return act == GatedAct::Silu ? silu_fwd(x) : gelu_fwd(x, act == GatedAct::GeluTanh);
}
template <typename A>
__device__ __forceinline__ A gated_bwd(A x, GatedAct act) {
  return act == GatedAct::Silu ? silu_bwd(x) : gelu_bwd(x, act == GatedAct::GeluTanh);
}

// ---- vectorized access -----------------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, A (&out)[N]) {
  Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = static_cast<A>(pk.v[j]);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const A (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int j = 0; j < N; ++j) pk.v[j] = static_cast<T>(in[j]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// mask * scale of flat elements i0 .. i0+N-1. When N is a multiple of 4, i0 is too (rows are multiples of N),
// so each Philox call serves four elements.
template <int N>
__device__ __forceinline__ void dropout_scales(const DropoutParams& d, uint64_t i0, float (&m)[N]) {
  if constexpr (N % 4 == 0) {
#pragma unroll
    for (int g = 0; g < N / 4; ++g) {
      Philox4 q = philox_group(d.seed, d.offset, (i0 >> 2) + g);
#pragma unroll
      for (int l = 0; l < 4; ++l) m[4 * g + l] = philox_to_uniform(q.x[l]) >= d.p ? d.scale : 0.0f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) m[j] = philox_uniform(d.seed, d.offset, i0 + j) >= d.p ? d.scale : 0.0f;
  }
}

// ---- launch plan -------------------------------------------------------------------------------------------

struct Plan {
  dim3 grid, block;
  int64_t slots;  // row lanes: gridDim.y * blockDim.y (the rows of the bias-gradient partials); 0: launch nothing
};

Plan make_plan(int64_t rows, int64_t col_vecs, bool reduce, int device) {
  const ColumnPlan c = column_plan(rows, col_vecs, reduce, cuda::sm_count(device));
  return Plan{dim3(c.gx, c.gy), dim3(c.bx, c.by), c.slots};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- bias + GeLU -------------------------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void bias_gelu_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                                 int64_t rows, int64_t hidden, bool tanh_approx) {
  using A = at::opmath_type<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= hidden) return;
  A bb[VEC];
  if (bias != nullptr) load_vec<VEC>(bias + c, bb);
  else for (int j = 0; j < VEC; ++j) bb[j] = A(0);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    A v[VEC];
    load_vec<VEC>(x + r * hidden + c, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = gelu_fwd(v[j] + bb[j], tanh_approx);
    store_vec<VEC>(y + r * hidden + c, v);
  }
}

// grad_x = grad * gelu'(x + bias); partial[slot][c] = this lane's sum of grad_x over its rows.
template <typename T, int VEC, bool kBiasGrad>
__global__ void bias_gelu_backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                          const T* __restrict__ bias, T* __restrict__ gx,
                                          at::opmath_type<T>* __restrict__ partial, int64_t rows, int64_t hidden,
                                          bool tanh_approx) {
  using A = at::opmath_type<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= hidden) return;
  A bb[VEC], acc[VEC];
  if (bias != nullptr) load_vec<VEC>(bias + c, bb);
  else for (int j = 0; j < VEC; ++j) bb[j] = A(0);
  for (int j = 0; j < VEC; ++j) acc[j] = A(0);
  const int64_t lane = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = lane; r < rows; r += stride) {
    A v[VEC], g[VEC];
    load_vec<VEC>(x + r * hidden + c, v);
    load_vec<VEC>(grad + r * hidden + c, g);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g[j] *= gelu_bwd(v[j] + bb[j], tanh_approx);
      if constexpr (kBiasGrad) acc[j] += g[j];
    }
    store_vec<VEC>(gx + r * hidden + c, g);
  }
  if constexpr (kBiasGrad) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partial[lane * hidden + c + j] = acc[j];
  }
}

// grad_bias[c] = sum of partial[0..slots)[c] in a fixed order: each of the 16 y-threads sums a strided subset of
// the slots, then a fixed shared-memory tree adds the 16 results.
template <typename T>
__global__ void __launch_bounds__(512) bias_grad_finish_kernel(const at::opmath_type<T>* __restrict__ partial, int64_t slots,
                                        int64_t hidden, T* __restrict__ out) {
  using A = at::opmath_type<T>;
  __shared__ A sh[16][33];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  A s = A(0);
  if (c < hidden) {
    for (int64_t k = threadIdx.y; k < slots; k += 16) s += partial[k * hidden + c];
  }
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  for (int half = 8; half > 0; half /= 2) {
    if (threadIdx.y < half) sh[threadIdx.y][threadIdx.x] += sh[threadIdx.y + half][threadIdx.x];
    __syncthreads();
  }
  if (threadIdx.y == 0 && c < hidden) out[c] = static_cast<T>(sh[0][threadIdx.x]);
}

template <typename T>
void finish_bias_grad(const at::Tensor& partial, int64_t slots, int64_t hidden, at::Tensor& gb,
                      cudaStream_t stream) {
  if (hidden == 0) return;
  const dim3 grid(static_cast<unsigned>((hidden + 31) / 32)), block(32, 16);
  const at::opmath_type<T>* pp = slots > 0 ? partial.const_data_ptr<at::opmath_type<T>>() : nullptr;
  cuda::launch(bias_grad_finish_kernel<T>, grid, block, stream, pp, slots, hidden, gb.mutable_data_ptr<T>());
}

at::Tensor partial_buffer(const at::Tensor& like, int64_t slots, int64_t hidden) {
  const auto acc = like.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
  return at::empty({std::max<int64_t>(slots, 1), hidden}, like.options().dtype(acc));
}

template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

at::Tensor bias_gelu_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                          c10::string_view approximate) {
  check_bias_gelu(x_in, bias_in);
  const bool tanh_approx = parse_gelu_approx(approximate) == GeluApprox::Tanh;
  cuda::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor bias = has(bias_in) ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t hidden = last_dim(x);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  if (rows == 0) return y;
  const cudaStream_t stream = cuda::current_stream();
  PYPERF_DISPATCH_FLOAT(x.scalar_type(), "bias_gelu_cuda", [&] {
    constexpr int V = vec_of<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool vec = hidden % V == 0 && aligned16(xp) && aligned16(yp) && (bp == nullptr || aligned16(bp));
    const Plan p = make_plan(rows, vec ? hidden / V : hidden, false, x.get_device());
    if (vec) {
      cuda::launch(bias_gelu_kernel<scalar_t, V>, p.grid, p.block, stream, xp, bp, yp, rows, hidden, tanh_approx);
    } else {
      cuda::launch(bias_gelu_kernel<scalar_t, 1>, p.grid, p.block, stream, xp, bp, yp, rows, hidden, tanh_approx);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                           const std::optional<at::Tensor>& bias_in,
                                                           c10::string_view approximate, bool bias_grad) {
  check_bias_gelu_backward(grad_in, x_in, bias_in, bias_grad);
  const bool tanh_approx = parse_gelu_approx(approximate) == GeluApprox::Tanh;
  cuda::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor bias = has(bias_in) ? bias_in->contiguous() : at::Tensor();
  at::Tensor gx = at::empty(x.sizes(), x.options());
  const int64_t hidden = last_dim(x);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  at::Tensor gb = at::empty({bias_grad ? hidden : 0}, x.options());
  const cudaStream_t stream = cuda::current_stream();
  PYPERF_DISPATCH_FLOAT(x.scalar_type(), "bias_gelu_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    constexpr int V = vec_of<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const bool vec = hidden % V == 0 && aligned16(xp) && aligned16(gp) && aligned16(gxp) &&
                     (bp == nullptr || aligned16(bp));
    const Plan p = make_plan(rows, vec ? hidden / V : hidden, bias_grad, x.get_device());
    at::Tensor partial;
    A* pp = nullptr;
    if (bias_grad && p.slots > 0) {
      partial = partial_buffer(x, p.slots, hidden);
      pp = partial.mutable_data_ptr<A>();
    }
    if (p.slots > 0) {
      auto run = [&](auto kernel) {
        cuda::launch(kernel, p.grid, p.block, stream, gp, xp, bp, gxp, pp, rows, hidden, tanh_approx);
      };
      if (vec && bias_grad) {
        run(bias_gelu_backward_kernel<scalar_t, V, true>);
      } else if (vec) {
        run(bias_gelu_backward_kernel<scalar_t, V, false>);
      } else if (bias_grad) {
        run(bias_gelu_backward_kernel<scalar_t, 1, true>);
      } else {
        run(bias_gelu_backward_kernel<scalar_t, 1, false>);
      }
    }
    if (bias_grad) finish_bias_grad<scalar_t>(partial, p.slots, hidden, gb, stream);
  });
  return {gx, gb};
}

// ---- bias + dropout + residual-add -------------------------------------------------------------------------

template <typename T, int VEC>
__global__ void bias_dropout_residual_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                             const T* __restrict__ residual, T* __restrict__ y, int64_t rows,
                                             int64_t hidden, DropoutParams d, bool identity) {
  using A = at::opmath_type<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= hidden) return;
  A bb[VEC];
  if (bias != nullptr) load_vec<VEC>(bias + c, bb);
  else for (int j = 0; j < VEC; ++j) bb[j] = A(0);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    const int64_t base = r * hidden + c;
    A v[VEC], res[VEC];
    load_vec<VEC>(x + base, v);
    load_vec<VEC>(residual + base, res);
    if (identity) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = res[j] + (v[j] + bb[j]);
    } else {
      float m[VEC];
      dropout_scales<VEC>(d, static_cast<uint64_t>(base), m);
      // A plain multiply, like torch's dropout: a dropped inf/nan turns into nan (never hidden). Rounded as the
      // CPU rounds it (no FMA): the same bits on both.
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = add_rn(res[j], mul_rn(v[j] + bb[j], static_cast<A>(m[j])));
    }
    store_vec<VEC>(y + base, v);
  }
}

template <typename T, int VEC, bool kBiasGrad>
__global__ void bias_dropout_residual_backward_kernel(const T* __restrict__ grad, T* __restrict__ gx,
                                                      at::opmath_type<T>* __restrict__ partial, int64_t rows,
                                                      int64_t hidden, DropoutParams d, bool identity) {
  using A = at::opmath_type<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= hidden) return;
  A acc[VEC];
  for (int j = 0; j < VEC; ++j) acc[j] = A(0);
  const int64_t lane = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = lane; r < rows; r += stride) {
    const int64_t base = r * hidden + c;
    A g[VEC];
    load_vec<VEC>(grad + base, g);
    if (!identity) {
      float m[VEC];
      dropout_scales<VEC>(d, static_cast<uint64_t>(base), m);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] *= static_cast<A>(m[j]);
    }
    if constexpr (kBiasGrad) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc[j] += g[j];
    }
    store_vec<VEC>(gx + base, g);
  }
  if constexpr (kBiasGrad) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) partial[lane * hidden + c + j] = acc[j];
  }
}

at::Tensor bias_dropout_residual_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& bias_in,
                                      const at::Tensor& residual_in, double p, c10::SymInt seed, c10::SymInt offset) {
  check_bias_dropout_residual(x_in, bias_in, residual_in);
  const DropoutParams d = make_dropout_params(p, seed.expect_int(), offset.expect_int());
  cuda::DeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), res = residual_in.contiguous();
  const at::Tensor bias = has(bias_in) ? bias_in->contiguous() : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t hidden = last_dim(x);
  const int64_t rows = hidden == 0 ? 0 : x.numel() / hidden;
  if (rows == 0) return y;
  const bool identity = d.p == 0.0f;
  const cudaStream_t stream = cuda::current_stream();
  PYPERF_DISPATCH_FLOAT(x.scalar_type(), "bias_dropout_residual_cuda", [&] {
    constexpr int V = vec_of<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool vec = hidden % V == 0 && aligned16(xp) && aligned16(rp) && aligned16(yp) &&
                     (bp == nullptr || aligned16(bp));
    const Plan pl = make_plan(rows, vec ? hidden / V : hidden, false, x.get_device());
    if (vec) {
      cuda::launch(bias_dropout_residual_kernel<scalar_t, V>, pl.grid, pl.block, stream, xp, bp, rp, yp, rows, hidden,
                   d, identity);
    } else {
      cuda::launch(bias_dropout_residual_kernel<scalar_t, 1>, pl.grid, pl.block, stream, xp, bp, rp, yp, rows, hidden,
                   d, identity);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_dropout_residual_backward_cuda(const at::Tensor& grad_in, double p,
                                                                       c10::SymInt seed, c10::SymInt offset,
                                                                       bool bias_grad) {
  check_bias_dropout_residual_backward(grad_in);
  const DropoutParams d = make_dropout_params(p, seed.expect_int(), offset.expect_int());
  cuda::DeviceGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor gx = at::empty(grad.sizes(), grad.options());
  const int64_t hidden = last_dim(grad);
  const int64_t rows = hidden == 0 ? 0 : grad.numel() / hidden;
  at::Tensor gb = at::empty({bias_grad ? hidden : 0}, grad.options());
  const bool identity = d.p == 0.0f;
  const cudaStream_t stream = cuda::current_stream();
  PYPERF_DISPATCH_FLOAT(grad.scalar_type(), "bias_dropout_residual_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    constexpr int V = vec_of<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    const bool vec = hidden % V == 0 && aligned16(gp) && aligned16(gxp);
    const Plan pl = make_plan(rows, vec ? hidden / V : hidden, bias_grad, grad.get_device());
    at::Tensor partial;
    A* pp = nullptr;
    if (bias_grad && pl.slots > 0) {
      partial = partial_buffer(grad, pl.slots, hidden);
      pp = partial.mutable_data_ptr<A>();
    }
    if (pl.slots > 0) {
      auto run = [&](auto kernel) {
        cuda::launch(kernel, pl.grid, pl.block, stream, gp, gxp, pp, rows, hidden, d, identity);
      };
      if (vec && bias_grad) {
        run(bias_dropout_residual_backward_kernel<scalar_t, V, true>);
      } else if (vec) {
        run(bias_dropout_residual_backward_kernel<scalar_t, V, false>);
      } else if (bias_grad) {
        run(bias_dropout_residual_backward_kernel<scalar_t, 1, true>);
      } else {
        run(bias_dropout_residual_backward_kernel<scalar_t, 1, false>);
      }
    }
    if (bias_grad) finish_bias_grad<scalar_t>(partial, pl.slots, hidden, gb, stream);
  });
  return {gx, gb};
}

// ---- SwiGLU / GeGLU ----------------------------------------------------------------------------------------

// a and b rows have stride in_stride (hidden when separate, 2*hidden when split from one tensor); y rows hidden.
template <typename T, int VEC>
__global__ void gated_act_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y,
                                 int64_t rows, int64_t hidden, int64_t in_stride, GatedAct act) {
  using A = at::opmath_type<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= hidden) return;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    A va[VEC], vb[VEC];
    load_vec<VEC>(a + r * in_stride + c, va);
    load_vec<VEC>(b + r * in_stride + c, vb);
#pragma unroll
    for (int j = 0; j < VEC; ++j) va[j] = gated_fwd(va[j], act) * vb[j];
    store_vec<VEC>(y + r * hidden + c, va);
  }
}

template <typename T, int VEC>
__global__ void gated_act_backward_kernel(const T* __restrict__ grad, const T* __restrict__ a,
                                          const T* __restrict__ b, T* __restrict__ ga, T* __restrict__ gb,
                                          int64_t rows, int64_t hidden, int64_t in_stride, GatedAct act) {
  using A = at::opmath_type<T>;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c >= hidden) return;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    A va[VEC], vb[VEC], g[VEC];
    load_vec<VEC>(a + r * in_stride + c, va);
    load_vec<VEC>(b + r * in_stride + c, vb);
    load_vec<VEC>(grad + r * hidden + c, g);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A x = va[j], z = vb[j];
      va[j] = g[j] * z * gated_bwd(x, act);
      vb[j] = g[j] * gated_fwd(x, act);
    }
    store_vec<VEC>(ga + r * in_stride + c, va);
    store_vec<VEC>(gb + r * in_stride + c, vb);
  }
}

at::Tensor gated_act_cuda(const at::Tensor& a_in, const std::optional<at::Tensor>& b_in,
                          c10::string_view activation) {
  const GatedShape s = check_gated(a_in, b_in);
  const GatedAct act = parse_gated_act(activation);
  cuda::DeviceGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = s.split ? at::Tensor() : b_in->contiguous();
  at::Tensor y = at::empty(gated_out_shape(a, s), a.options());
  if (s.rows == 0 || s.hidden == 0) return y;
  const cudaStream_t stream = cuda::current_stream();
  PYPERF_DISPATCH_FLOAT(a.scalar_type(), "gated_act_cuda", [&] {
    constexpr int V = vec_of<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = s.split ? ap + s.hidden : b.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool vec = s.hidden % V == 0 && aligned16(ap) && aligned16(bp) && aligned16(yp);
    const Plan p = make_plan(s.rows, vec ? s.hidden / V : s.hidden, false, a.get_device());
    if (vec) {
      cuda::launch(gated_act_kernel<scalar_t, V>, p.grid, p.block, stream, ap, bp, yp, s.rows, s.hidden, s.in_stride,
                   act);
    } else {
      cuda::launch(gated_act_kernel<scalar_t, 1>, p.grid, p.block, stream, ap, bp, yp, s.rows, s.hidden, s.in_stride,
                   act);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> gated_act_backward_cuda(const at::Tensor& grad_in, const at::Tensor& a_in,
                                                           const std::optional<at::Tensor>& b_in,
                                                           c10::string_view activation) {
  const GatedShape s = check_gated_backward(grad_in, a_in, b_in);
  const GatedAct act = parse_gated_act(activation);
  cuda::DeviceGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor b = s.split ? at::Tensor() : b_in->contiguous();
  at::Tensor ga = at::empty(a.sizes(), a.options());
  at::Tensor gb = s.split ? at::empty({0}, a.options()) : at::empty(a.sizes(), a.options());
  if (s.rows == 0 || s.hidden == 0) return {ga, gb};
  const cudaStream_t stream = cuda::current_stream();
  PYPERF_DISPATCH_FLOAT(a.scalar_type(), "gated_act_backward_cuda", [&] {
    constexpr int V = vec_of<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = s.split ? ap + s.hidden : b.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* gap = ga.mutable_data_ptr<scalar_t>();
    scalar_t* gbp = s.split ? gap + s.hidden : gb.mutable_data_ptr<scalar_t>();
    const bool vec = s.hidden % V == 0 && aligned16(ap) && aligned16(bp) && aligned16(gp) && aligned16(gap) &&
                     aligned16(gbp);
    const Plan p = make_plan(s.rows, vec ? s.hidden / V : s.hidden, false, a.get_device());
    if (vec) {
      cuda::launch(gated_act_backward_kernel<scalar_t, V>, p.grid, p.block, stream, gp, ap, bp, gap, gbp, s.rows,
                   s.hidden, s.in_stride, act);
    } else {
      cuda::launch(gated_act_backward_kernel<scalar_t, 1>, p.grid, p.block, stream, gp, ap, bp, gap, gbp, s.rows,
                   s.hidden, s.in_stride, act);
    }
  });
  return {ga, gb};
}

}  // namespace

PYPERF_CUDA_KERNELS(m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cuda);
  m.impl("bias_dropout_residual", &bias_dropout_residual_cuda);
  m.impl("bias_dropout_residual_backward", &bias_dropout_residual_backward_cuda);
  m.impl("gated_act", &gated_act_cuda);
  m.impl("gated_act_backward", &gated_act_backward_cuda);
}

}  // namespace pyperf
