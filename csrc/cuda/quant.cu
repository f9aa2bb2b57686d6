// CUDA kernels of the quant ops (docs/quant.md), bit-identical to csrc/cpu/quant.cpp: both use the per-element math
// of pyperf/quant_math.h, whose *_rn helpers keep --use_fast_math and FMA contraction out of the results.
//
// quantize_kernel: a quant block is handled by L = min(32, block_size / VEC) lanes of one warp, each lane VEC
// consecutive values per step (VEC = 4, or 8 for int4, so every lane stores exactly one 32-bit payload word: fully
// coalesced), loaded with 8/16-byte vector loads. The absmax is reduced with warp shuffles, fused with the loads;
// blocks up to 1024 values stay in registers between the absmax and the encode pass, larger ones
// are re-read (from L1/L2). The same kernel requantizes the reduce's sum (WireSumSrc).
// dequantize_kernel / reduce_kernel: elementwise over VEC-value groups; the reduce keeps its fp32 sum over the W
// chunks in registers and adds in rank order 0..W-1.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "pyperf/checks.h"
#include "pyperf/cuda_glue.cuh"
#include "pyperf/pack_cuda.h"
#include "pyperf/dispatch.h"
#include "pyperf/philox.h"
#include "pyperf/quant.h"

namespace pyperf {
namespace {

using namespace quant;

constexpr int kThreads = 256;

template <int F>
constexpr int vec_of() {
  return F == kInt4 ? 8 : 4;
}

template <typename Fn>
void dispatch_format(Format f, Fn&& fn) {
  switch (f) {
    case kInt8: fn(std::integral_constant<int, kInt8>{}); break;
    case kInt4: fn(std::integral_constant<int, kInt4>{}); break;
    case kE4M3: fn(std::integral_constant<int, kE4M3>{}); break;
    case kE5M2: fn(std::integral_constant<int, kE5M2>{}); break;
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

// N values from p[i], as fp32: one vector load when the group is whole and aligned, else bounded scalar loads
// (zeros past n).
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, int64_t i, int64_t n, bool aligned, float* out) {
  if (aligned && i + N <= n) {
    AlignedVec<T, N> a = *reinterpret_cast<const AlignedVec<T, N>*>(p + i);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_float(a.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = i + k < n ? to_float(p[i + k]) : 0.0f;
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, int64_t i, int64_t n, bool aligned, const float* v) {
  if (aligned && i + N <= n) {
    AlignedVec<T, N> a;
#pragma unroll
    for (int k = 0; k < N; ++k) a.v[k] = static_cast<T>(v[k]);
    *reinterpret_cast<AlignedVec<T, N>*>(p + i) = a;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (i + k < n) p[i + k] = static_cast<T>(v[k]);
    }
  }
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The code of value j of a 32-bit payload word (VEC codes: 4 bytes, or 8 nibbles for int4, low first).
template <int F>
__device__ __forceinline__ uint32_t word_code(uint32_t word, int j) {
  return F == kInt4 ? (word >> (4 * j)) & 0xfu : (word >> (8 * j)) & 0xffu;
}

// Byte offset in the payload of the word holding values [i, i + VEC) (i a multiple of VEC).
template <int F>
__device__ __forceinline__ int64_t word_byte(int64_t i) {
  return F == kInt4 ? i / 2 : i;
}

__device__ __forceinline__ float load_scale(const uint8_t* wire, int64_t b) {
  return reinterpret_cast<const float*>(wire)[b];
}

// ---- value sources of quantize_kernel ----

// A float tensor x (fp32/bf16/fp16).
template <typename T, int VEC>
struct XSrc {
  static constexpr int kElemBytes = sizeof(T);
  const T* x;
  int64_t numel;
  bool aligned;
  __device__ __forceinline__ void load(int64_t i, float* v) const { load_vec<T, VEC>(x, i, numel, aligned, v); }
};

// The scaled fp32 sum over W wires of values [i, i + VEC), in rank order (the reduce's requantize).
template <int F, int VEC>
struct WireSumSrc {
  static constexpr int kElemBytes = 4;
  const uint8_t* wires;
  int64_t W, row_bytes, payload_offset, numel;
  int block_shift;
  float uscale;
  // reduce_quantized_tensors_ with own: row own_row's term is own[i] (fp32, numel values), its wire unread
  const float* own = nullptr;
  int64_t own_row = -1;
  __device__ __forceinline__ void load(int64_t i, float* v) const {
    const int64_t b = i >> block_shift;
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = 0.0f;
    for (int64_t r = 0; r < W; ++r) {
      if (r == own_row) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k] = add_rn(v[k], i + k < numel ? own[i + k] : 0.0f);
        continue;
      }
      const uint8_t* row = wires + r * row_bytes;
      const float s = load_scale(row, b);
      const uint32_t word = *reinterpret_cast<const uint32_t*>(row + payload_offset + word_byte<F>(i));
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = add_rn(v[k], dequant<F>(word_code<F>(word, k), s));
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = i + k < numel ? mul_rn(v[k], uscale) : 0.0f;
  }
};

struct QuantParams {
  int64_t numel, nblocks, payload_offset;
  int block_size, lanes, lanes_shift, iters;  // lanes per quant block (power of two <= 32), steps per lane
  bool stochastic;
  uint64_t seed, offset;
  uint8_t* wire;
  // Error feedback: the old residual is read from residual_in (null: zeros) and the new one written to
  // residual_out (null: no error feedback); the same pointer for the in-place form. Each element is read before
  // the same thread writes it.
  const float* residual_in;
  float* residual_out;
  bool residual_in_aligned, residual_out_aligned;
};

// Values [i, i + VEC) of x (+ residual): the v that is quantized.
template <int VEC, typename Src>
__device__ __forceinline__ void load_v(const Src& src, const QuantParams& p, int64_t i, float* v) {
  src.load(i, v);
  if (p.residual_out != nullptr) {
    float r[VEC];
    if (p.residual_in != nullptr) {
      load_vec<float, VEC>(p.residual_in, i, p.numel, p.residual_in_aligned, r);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) r[k] = 0.0f;  // + 0 all the same: -0 turns +0 as with a zero residual
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = add_rn(v[k], r[k]);
  }
}

// Encodes values [i, i + VEC) of block b, stores their payload word and, with error feedback, their residual.
template <int F, int VEC>
__device__ __forceinline__ void encode_store(const QuantParams& p, int64_t i, const float* v, float scale,
                                             float inv) {
  float u[VEC];
  if (p.stochastic) {
#pragma unroll
    for (int g = 0; g < VEC; g += 4) {
      Philox4 r = philox_group(p.seed, p.offset, static_cast<uint64_t>(i + g) >> 2);
#pragma unroll
      for (int k = 0; k < 4; ++k) u[g + k] = philox_to_uniform(r.x[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) u[k] = 0.0f;
  }
  uint32_t word = 0;
  float res[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const uint32_t c = encode<F>(v[k], inv, p.stochastic, u[k]);
    word |= c << ((F == kInt4 ? 4 : 8) * k);
    res[k] = ef_residual(v[k], dequant<F>(c, scale), scale);
  }
  *reinterpret_cast<uint32_t*>(p.wire + p.payload_offset + word_byte<F>(i)) = word;
  if (p.residual_out != nullptr) store_vec<float, VEC>(p.residual_out, i, p.numel, p.residual_out_aligned, res);
}

// CACHE > 0: the CACHE (== p.iters) steps of a lane stay in registers between the two passes; 0: re-read.
template <int F, int CACHE, typename Src>
__global__ void __launch_bounds__(kThreads) quantize_kernel(Src src, QuantParams p) {
  constexpr int VEC = vec_of<F>();
  const int lane = threadIdx.x & 31;
  const int sub = lane >> p.lanes_shift;
  const int sl = lane & (p.lanes - 1);
  const int per_warp = 32 >> p.lanes_shift;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t stride = (static_cast<int64_t>(gridDim.x) * blockDim.x >> 5) * per_warp;
  for (int64_t base = warp * per_warp; base < p.nblocks; base += stride) {  // warp-uniform loop
    const int64_t b = base + sub;
    const bool active = b < p.nblocks;
    const int64_t first = b * p.block_size;
    uint32_t amax = 0;
    float cache[CACHE > 0 ? CACHE : 1][VEC];
    if (active) {
      if constexpr (CACHE > 0) {
#pragma unroll
        for (int it = 0; it < CACHE; ++it) {
          load_v<VEC>(src, p, first + static_cast<int64_t>(it * p.lanes + sl) * VEC, cache[it]);
#pragma unroll
          for (int k = 0; k < VEC; ++k) amax = max(amax, abs_bits(cache[it][k]));
        }
      } else {
        for (int it = 0; it < p.iters; ++it) {
          float v[VEC];
          load_v<VEC>(src, p, first + static_cast<int64_t>(it * p.lanes + sl) * VEC, v);
#pragma unroll
          for (int k = 0; k < VEC; ++k) amax = max(amax, abs_bits(v[k]));
        }
      }
    }
    for (int m = p.lanes >> 1; m > 0; m >>= 1) amax = max(amax, __shfl_xor_sync(0xffffffffu, amax, m));
    if (!active) continue;
    const float scale = block_scale(amax, static_cast<Format>(F));
    const float inv = inv_block_scale(scale);
    if (sl == 0) reinterpret_cast<float*>(p.wire)[b] = scale;
    if constexpr (CACHE > 0) {
#pragma unroll
      for (int it = 0; it < CACHE; ++it) {
        encode_store<F, VEC>(p, first + static_cast<int64_t>(it * p.lanes + sl) * VEC, cache[it], scale, inv);
      }
    } else {
      for (int it = 0; it < p.iters; ++it) {
        const int64_t i = first + static_cast<int64_t>(it * p.lanes + sl) * VEC;
        float v[VEC];
        load_v<VEC>(src, p, i, v);
        encode_store<F, VEC>(p, i, v, scale, inv);
      }
    }
  }
}

int log2_int(int64_t v) {
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

int grid_for(int64_t work_items, int per_block) {
  const int64_t blocks = (work_items + per_block - 1) / per_block;
  // Enough CTAs to fill any current GPU several times over; the kernels loop (grid-stride) beyond that.
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 132 * 32)));
}

template <int F, typename Src>
void launch_quantize(const Src& src, QuantParams p) {
  constexpr int VEC = vec_of<F>();
  // At most 32 cached values per lane (8 steps of 4 for int8 / fp8, 4 of 8 for int4), except int4 from 16-bit
  // values: 32 floats live next to the unpacking of the 16-bit loads made ptxas spill (scripts/cuda_resources.py),
  // so it caches 2 steps at most and takes the two-pass variant beyond.
  constexpr int kCache = (F == kInt4 && Src::kElemBytes == 2) ? 2 : 32 / VEC;
  const int groups = p.block_size / VEC;
  p.lanes = std::min(32, groups);
  p.lanes_shift = log2_int(p.lanes);
  p.iters = groups / p.lanes;
  p.residual_in_aligned = p.residual_in != nullptr && aligned_to(p.residual_in, sizeof(float) * VEC);
  p.residual_out_aligned = p.residual_out != nullptr && aligned_to(p.residual_out, sizeof(float) * VEC);
  const int64_t warps = (p.nblocks * p.lanes + 31) / 32;
  const int grid = grid_for(warps * 32, kThreads);
  const cudaStream_t stream = cuda::current_stream();
  // The register cache is sized to the exact step count: a larger array would cost registers (occupancy) even
  // when unused.
  switch (p.iters) {
    case 1:
      cuda::launch(quantize_kernel<F, 1, Src>, grid, kThreads, stream, src, p);
      break;
    case 2:
      cuda::launch(quantize_kernel<F, 2, Src>, grid, kThreads, stream, src, p);
      break;
    case 4:
      if constexpr (kCache >= 4) {
        cuda::launch(quantize_kernel<F, 4, Src>, grid, kThreads, stream, src, p);
      } else {
        cuda::launch(quantize_kernel<F, 0, Src>, grid, kThreads, stream, src, p);
      }
      break;
    default:
      if (kCache > 4 && p.iters == kCache) {
        cuda::launch(quantize_kernel<F, kCache, Src>, grid, kThreads, stream, src, p);
      } else {
        cuda::launch(quantize_kernel<F, 0, Src>, grid, kThreads, stream, src, p);
      }
  }
}

QuantParams make_params(const WireLayout& w, bool stochastic, int64_t seed, int64_t offset, uint8_t* wire,
                        const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& residual_out) {
  QuantParams p;
  p.numel = w.numel;
  p.nblocks = w.nblocks;
  p.payload_offset = w.payload_offset;
  p.block_size = static_cast<int>(w.block_size);
  p.stochastic = stochastic;
  p.seed = as_u64(seed);
  p.offset = as_u64(offset);
  p.wire = wire;
  const ResidualPtrs res = residual_ptrs(residual, residual_out);
  p.residual_in = res.in;
  p.residual_out = res.out;
  p.residual_in_aligned = p.residual_out_aligned = false;  // set per format by launch_quantize
  return p;
}

// ---- dequantize / reduce (elementwise over VEC-value groups) ----

template <int F, typename T>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(const uint8_t* wire, int64_t numel, int64_t payload_offset, int block_shift, float uscale,
                      bool accumulate, T* out, bool out_aligned) {
  constexpr int VEC = vec_of<F>();
  const int64_t groups = (numel + VEC - 1) / VEC;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = g * VEC;
    const float s = load_scale(wire, i >> block_shift);
    const uint32_t word = *reinterpret_cast<const uint32_t*>(wire + payload_offset + word_byte<F>(i));
    float v[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v[k] = dequant<F>(word_code<F>(word, k), s);
      if (uscale != 1.0f) v[k] = mul_rn(v[k], uscale);
    }
    if (accumulate) {
      float o[VEC];
      load_vec<T, VEC>(out, i, numel, out_aligned, o);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = add_rn(o[k], v[k]);
    }
    store_vec<T, VEC>(out, i, numel, out_aligned, v);
  }
}

template <int F, typename T>
__global__ void __launch_bounds__(kThreads) reduce_kernel(WireSumSrc<F, vec_of<F>()> src, T* out, bool out_aligned) {
  constexpr int VEC = vec_of<F>();
  const int64_t groups = (src.numel + VEC - 1) / VEC;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v[VEC];
    src.load(g * VEC, v);
    store_vec<T, VEC>(out, g * VEC, src.numel, out_aligned, v);
  }
}

// ---- ops ----

void quantize_into_cuda(const at::Tensor& x, c10::string_view fmt, int64_t block_size, bool stochastic,
                        int64_t seed, int64_t offset, const c10::optional<at::Tensor>& residual, at::Tensor& out,
                        const c10::optional<at::Tensor>& residual_out) {
  const WireLayout w = check_quantize_args(x, fmt, block_size, residual, residual_out, out);
  if (w.numel == 0) return;
  cuda::DeviceGuard guard(x.device());
  QuantParams p = make_params(w, stochastic, seed, offset, out.data_ptr<uint8_t>(), residual, residual_out);
  dispatch_float3(x.scalar_type(), "x", [&](auto t) {
    using T = decltype(t);
    dispatch_format(w.fmt, [&](auto F_) {
      constexpr int F = decltype(F_)::value;
      constexpr int VEC = vec_of<F>();
      const T* xp = reinterpret_cast<const T*>(x.data_ptr());
      XSrc<T, VEC> src{xp, w.numel, aligned_to(xp, sizeof(T) * VEC)};
      launch_quantize<F>(src, p);
    });
  });
}

at::Tensor quantize_cuda(const at::Tensor& x, c10::string_view fmt, int64_t block_size, bool stochastic,
                         int64_t seed, int64_t offset, const c10::optional<at::Tensor>& residual,
                         const c10::optional<at::Tensor>& residual_out) {
  const WireLayout w = wire_layout(x.numel(), fmt, block_size);
  at::Tensor out = at::empty({w.bytes}, x.options().dtype(at::kByte));
  quantize_into_cuda(x, fmt, block_size, stochastic, seed, offset, residual, out, residual_out);
  return out;
}

void dequantize_into_cuda(const at::Tensor& wire, int64_t numel, c10::string_view fmt, int64_t block_size,
                          double scale, bool accumulate, at::Tensor& out) {
  const WireLayout w = check_dequantize_args(wire, numel, fmt, block_size, out);
  if (numel == 0) return;
  cuda::DeviceGuard guard(wire.device());
  const cudaStream_t stream = cuda::current_stream();
  const int shift = log2_int(block_size);
  dispatch_float3(out.scalar_type(), "out", [&](auto t) {
    using T = decltype(t);
    dispatch_format(w.fmt, [&](auto F_) {
      constexpr int F = decltype(F_)::value;
      constexpr int VEC = vec_of<F>();
      T* op = reinterpret_cast<T*>(out.data_ptr());
      const int grid = grid_for((numel + VEC - 1) / VEC, kThreads);
      cuda::launch(dequantize_kernel<F, T>, grid, kThreads, stream, wire.data_ptr<uint8_t>(), numel,
                   w.payload_offset, shift, static_cast<float>(scale), accumulate, op,
                   aligned_to(op, sizeof(T) * VEC));
    });
  });
}

at::Tensor dequantize_cuda(const at::Tensor& wire, int64_t numel, c10::string_view fmt, int64_t block_size,
                           at::ScalarType out_dtype, double scale) {
  TORCH_CHECK(is_float_dtype(out_dtype), "out_dtype: expected float32, bfloat16 or float16, got ", out_dtype);
  wire_layout(numel, fmt, block_size);
  at::Tensor out = at::empty({numel}, wire.options().dtype(out_dtype));
  dequantize_into_cuda(wire, numel, fmt, block_size, scale, false, out);
  return out;
}


template <int F>
WireSumSrc<F, vec_of<F>()> wire_sum_src(const at::Tensor& wires, const WireLayout& w, double scale) {
  WireSumSrc<F, vec_of<F>()> src;
  src.wires = wires.data_ptr<uint8_t>();
  src.W = wires.size(0);
  src.row_bytes = w.bytes;
  src.payload_offset = w.payload_offset;
  src.numel = w.numel;
  src.block_shift = log2_int(w.block_size);
  src.uscale = static_cast<float>(scale);
  return src;
}

// The reduce of a contiguous [W, w.bytes] stack into op (w.numel values); with own (fp32, w.numel values), rank
// own_row's term is own's.
template <typename T>
void launch_reduce(const at::Tensor& stack, const WireLayout& w, double scale, T* op, const float* own = nullptr,
                   int64_t own_row = -1) {
  dispatch_format(w.fmt, [&](auto F_) {
    constexpr int F = decltype(F_)::value;
    constexpr int VEC = vec_of<F>();
    auto src = wire_sum_src<F>(stack, w, scale);
    src.own = own;
    src.own_row = own_row;
    const int grid = grid_for((w.numel + VEC - 1) / VEC, kThreads);
    cuda::launch(reduce_kernel<F, T>, grid, kThreads, cuda::current_stream(), src, op, aligned_to(op, sizeof(T) * VEC));
  });
}

at::Tensor reduce_quantized_cuda(const at::Tensor& wires, int64_t numel, c10::string_view fmt, int64_t block_size,
                                 double scale, at::ScalarType out_dtype) {
  TORCH_CHECK(is_float_dtype(out_dtype), "out_dtype: expected float32, bfloat16 or float16, got ", out_dtype);
  const WireLayout w = check_wires(wires, numel, fmt, block_size);
  at::Tensor out = at::empty({numel}, wires.options().dtype(out_dtype));
  if (numel == 0) return out;
  cuda::DeviceGuard guard(wires.device());
  dispatch_float3(out_dtype, "out_dtype", [&](auto t) {
    using T = decltype(t);
    launch_reduce<T>(wires, w, scale, reinterpret_cast<T*>(out.data_ptr()));
  });
  return out;
}

void reduce_requantize_into_cuda(const at::Tensor& wires, int64_t numel, c10::string_view fmt, int64_t block_size,
                                 double scale, bool stochastic, int64_t seed, int64_t offset,
                                 const c10::optional<at::Tensor>& residual, at::Tensor& out,
                                 const c10::optional<at::Tensor>& residual_out) {
  const WireLayout w = check_requantize_args(wires, numel, fmt, block_size, residual, residual_out, &out);
  if (numel == 0) return;
  cuda::DeviceGuard guard(wires.device());
  QuantParams p = make_params(w, stochastic, seed, offset, out.data_ptr<uint8_t>(), residual, residual_out);
  dispatch_format(w.fmt, [&](auto F_) {
    constexpr int F = decltype(F_)::value;
    launch_quantize<F>(wire_sum_src<F>(wires, w, scale), p);
  });
}

at::Tensor reduce_requantize_cuda(const at::Tensor& wires, int64_t numel, c10::string_view fmt,
                                  int64_t block_size, double scale, bool stochastic, int64_t seed, int64_t offset,
                                  const c10::optional<at::Tensor>& residual,
                                  const c10::optional<at::Tensor>& residual_out) {
  const WireLayout w = check_requantize_args(wires, numel, fmt, block_size, residual, residual_out, nullptr);
  at::Tensor out = at::empty({w.bytes}, wires.options());
  reduce_requantize_into_cuda(wires, numel, fmt, block_size, scale, stochastic, seed, offset, residual, out,
                              residual_out);
  return out;
}

// Many tensors: composed of the pack and quant kernels through one fp32 buffer of the padded layout. The CPU
// kernels read and write the tensors directly (the pack pass cost the CPU hook ~10% of its time); on the GPU the
// extra pass is cheap next to the collectives, and a fused kernel is left for when it can be measured there.
void quantize_tensors_into_cuda(at::TensorList xs, c10::string_view fmt, int64_t block_size,
                                const c10::optional<at::Tensor>& residual, at::Tensor& out,
                                const c10::optional<at::Tensor>& residual_out) {
  const TensorsLayout l = check_tensors_layout(xs, "xs", fmt, block_size, out, "out");
  check_residuals(residual, residual_out, l.w.numel, out, "out");
  if (l.w.nblocks == 0) return;
  cuda::DeviceGuard guard(out.device());
  at::Tensor packed = at::empty({l.w.numel}, out.options().dtype(at::kFloat));
  cuda_pack_out(xs, 1.0, block_size, packed);
  quantize_into_cuda(packed, fmt, block_size, false, 0, 0, residual, out, residual_out);
}

void dequantize_tensors_cuda(const at::Tensor& wire, c10::string_view fmt, int64_t block_size, double scale,
                             at::TensorList outs) {
  const TensorsLayout l = check_tensors_layout(outs, "outs", fmt, block_size, wire, "wire");
  if (l.w.nblocks == 0) return;
  cuda::DeviceGuard guard(wire.device());
  at::Tensor flat = at::empty({l.w.numel}, wire.options().dtype(at::kFloat));
  dequantize_into_cuda(wire, l.w.numel, fmt, block_size, scale, false, flat);
  cuda_unpack(flat, outs, 1.0, block_size);
}

void reduce_quantized_tensors_cuda(const at::Tensor& wires, c10::string_view fmt, int64_t block_size, double scale,
                                   at::TensorList outs, const c10::optional<at::TensorList>& own, int64_t own_row) {
  const TensorsLayout l = check_tensors_wires(outs, fmt, block_size, wires);
  check_own_row(own, own_row, outs, wires);
  if (l.w.nblocks == 0) return;
  cuda::DeviceGuard guard(wires.device());
  // the reduce reads a contiguous stack: a row-strided slice of a gather buffer is copied first
  const at::Tensor stack = wires.contiguous();
  at::Tensor flat = at::empty({l.w.numel}, wires.options().dtype(at::kFloat));
  at::Tensor own_flat;
  if (own.has_value()) {   // own in the padded fp32 layout (zeros between tensors), as the wires hold it
    own_flat = at::empty({l.w.numel}, wires.options().dtype(at::kFloat));
    cuda_pack_out(*own, 1.0, block_size, own_flat);
  }
  launch_reduce<float>(stack, l.w, scale, flat.data_ptr<float>(),
                       own.has_value() ? own_flat.data_ptr<float>() : nullptr, own.has_value() ? own_row : -1);
  cuda_unpack(flat, outs, 1.0, block_size);
}

}  // namespace

PYPERF_CUDA_KERNELS(m) {
  m.impl("quantize", &quantize_cuda);
  m.impl("quantize_into", &quantize_into_cuda);
  m.impl("dequantize", &dequantize_cuda);
  m.impl("dequantize_into", &dequantize_into_cuda);
  m.impl("reduce_quantized", &reduce_quantized_cuda);
  m.impl("reduce_requantize", &reduce_requantize_cuda);
  m.impl("reduce_requantize_into", &reduce_requantize_into_cuda);
  m.impl("quantize_tensors_into", &quantize_tensors_into_cuda);
  m.impl("dequantize_tensors_", &dequantize_tensors_cuda);
  m.impl("reduce_quantized_tensors_", &reduce_quantized_tensors_cuda);
}

}  // namespace pyperf
