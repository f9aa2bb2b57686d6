// CUDA kernels of pack / pack_out / unpack / multi_tensor_l2norm, each ONE multi-tensor-apply launch over the
// list (csrc/include/pyperf/multi_tensor_apply.cuh; more only when the list overflows a launch's arguments).
// 16-byte vector loads/stores where both sides are aligned, a scalar loop otherwise and for the tail.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "pyperf/cuda_glue.cuh"
#include "pyperf/dispatch.h"
#include "pyperf/multi_tensor_apply.cuh"
#include "pyperf/pack_common.h"

namespace pyperf {
namespace {

using mta::ChunkArgs;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

template <typename A, typename B>
constexpr int vec_width() {
  return 16 / (sizeof(A) > sizeof(B) ? sizeof(A) : sizeof(B));
}

__device__ __forceinline__ bool is_aligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// dst[i] = cast(scale * src[i]) (or cast(dst[i] + scale * src[i])) for i in [begin, end), by one block. A scale
// of exactly 1 skips the multiply so that same-dtype copies stay bit-exact (fast-math flushes denormals in
// float arithmetic).
template <typename in_t, typename out_t>
__device__ __forceinline__ void scaled_copy(const in_t* __restrict__ src, out_t* __restrict__ dst, int64_t begin,
                                            int64_t end, float scale, bool accumulate) {
  constexpr int V = vec_width<in_t, out_t>();
  const bool unit = scale == 1.0f;
  auto apply = [&](float x, out_t old) -> out_t {
    const float y = unit ? x : x * scale;
    return accumulate ? static_cast<out_t>(static_cast<float>(old) + y) : static_cast<out_t>(y);
  };
  int64_t i = begin;
  if (is_aligned(src + begin, V * sizeof(in_t)) && is_aligned(dst + begin, V * sizeof(out_t))) {
    const int64_t nvec = (end - begin) / V;
    using VI = AlignedVec<in_t, V>;
    using VO = AlignedVec<out_t, V>;
    const VI* s = reinterpret_cast<const VI*>(src + begin);
    VO* d = reinterpret_cast<VO*>(dst + begin);
#pragma unroll 4
    for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
      const VI a = s[k];
      VO o;
      if (accumulate) o = d[k];
#pragma unroll
      for (int j = 0; j < V; ++j) o.v[j] = apply(static_cast<float>(a.v[j]), o.v[j]);
      d[k] = o;
    }
    i = begin + nvec * V;
  }
  for (int64_t k = i + threadIdx.x; k < end; k += blockDim.x) {
    dst[k] = apply(static_cast<float>(src[k]), accumulate ? dst[k] : out_t(0));
  }
}

// aux = the tensor's offset in the flat output.
template <typename in_t, typename out_t>
struct PackOp {
  out_t* flat;
  int64_t align;
  float scale;
  __device__ void operator()(const ChunkArgs<1>& a, int t, int64_t begin, int64_t end, int64_t) const {
    const int64_t off = a.aux[t], n = a.numel[t];
    out_t* dst = flat + off;
    scaled_copy(static_cast<const in_t*>(a.ptr[0][t]), dst, begin, end, scale, false);
    if (end == n) {  // the block of a tensor's last chunk zero-fills the padding after it
      const int64_t pad_end = (off + n + align - 1) / align * align - off;
      for (int64_t k = n + threadIdx.x; k < pad_end; k += blockDim.x) dst[k] = out_t(0.0f);
    }
  }
};

// ptr[0] = the destination tensor; aux = its offset in the flat input.
template <typename in_t, typename out_t>
struct UnpackOp {
  const in_t* flat;
  float scale;
  bool accumulate;
  __device__ void operator()(const ChunkArgs<1>& a, int t, int64_t begin, int64_t end, int64_t) const {
    scaled_copy(flat + a.aux[t], static_cast<out_t*>(a.ptr[0][t]), begin, end, scale, accumulate);
  }
};

__device__ __forceinline__ bool nonfinite_bits(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

// Block-wide sum, the same fixed tree every time (deterministic). All threads get the result.
template <typename T>
__device__ T block_sum(T v, T* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < nwarps ? smem[lane] : T(0);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One partial (sum of squares, non-finite flag) per chunk.
template <typename T>
struct L2NormOp {
  float* partial_sq;
  int* partial_bad;
  __device__ void operator()(const ChunkArgs<1>& a, int t, int64_t begin, int64_t end, int64_t block) const {
    __shared__ float smem[32];
    const T* __restrict__ p = static_cast<const T*>(a.ptr[0][t]);
    constexpr int V = 16 / sizeof(T);
    float acc = 0.0f;
    bool bad = false;
    int64_t i = begin;
    if (is_aligned(p + begin, 16)) {
      using VT = AlignedVec<T, V>;
      const VT* s = reinterpret_cast<const VT*>(p + begin);
      const int64_t nvec = (end - begin) / V;
#pragma unroll 4
      for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) {
        const VT v = s[k];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float x = static_cast<float>(v.v[j]);
          acc += x * x;
          bad |= nonfinite_bits(x);
        }
      }
      i = begin + nvec * V;
    }
    for (int64_t k = i + threadIdx.x; k < end; k += blockDim.x) {
      const float x = static_cast<float>(p[k]);
      acc += x * x;
      bad |= nonfinite_bits(x);
    }
    const float sum = block_sum(acc, smem);
    const int any_bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
      partial_sq[block] = sum;
      partial_bad[block] = any_bad;
    }
  }
};

// The partials in a fixed order: thread j sums j, j + blockDim, ... then a fixed tree.
__global__ void __launch_bounds__(1024) multi_tensor_l2norm_finalize_kernel(const float* __restrict__ partial_sq,
                                                                            const int* __restrict__ partial_bad,
                                                                            int64_t n, float* out_sq,
                                                                            bool* out_bad) {
  __shared__ double smem[32];
  double acc = 0.0;
  int bad = 0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    acc += partial_sq[k];
    bad |= partial_bad[k];
  }
  const double sum = block_sum(acc, smem);
  const int any_bad = __syncthreads_or(bad);
  if (threadIdx.x == 0) {
    *out_sq = static_cast<float>(sum);
    *out_bad = any_bad != 0;
  }
}

void list_args(at::TensorList tensors, std::vector<std::array<void*, 1>>& ptrs, std::vector<int64_t>& numels) {
  ptrs.resize(tensors.size());
  numels.resize(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    ptrs[i][0] = const_cast<void*>(tensors[i].data_ptr());
    numels[i] = tensors[i].numel();
  }
}

void pack_into(at::TensorList tensors, double scale, int64_t align, const PackLayout& layout, at::Tensor& out) {
  if (tensors.empty()) return;
  std::vector<std::array<void*, 1>> ptrs;
  std::vector<int64_t> numels;
  list_args(tensors, ptrs, numels);
  dispatch_float3_pair(tensors[0].scalar_type(), "tensors", out.scalar_type(), "out", [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    PackOp<in_t, out_t> op{static_cast<out_t*>(out.data_ptr()), align, static_cast<float>(scale)};
    mta::multi_tensor_apply<1>(ptrs, numels, layout.offsets, op);
  });
}

at::Tensor pack_cuda(at::TensorList tensors, double scale, std::optional<c10::ScalarType> out_dtype, int64_t align) {
  check_pack_list(tensors, "tensors");
  check_pack_align(align);
  TORCH_CHECK(!tensors.empty(), "tensors: expected at least one tensor (the Python wrapper handles empty lists)");
  const auto dtype = out_dtype.value_or(tensors[0].scalar_type());
  check_pack_dtype(dtype, "out_dtype");
  cuda::DeviceGuard guard(tensors[0].device());
  const auto layout = pack_layout(tensors, align);
  at::Tensor out = at::empty({layout.total}, tensors[0].options().dtype(dtype));
  pack_into(tensors, scale, align, layout, out);
  return out;
}

void pack_out_cuda(at::TensorList tensors, double scale, int64_t align, at::Tensor out) {
  check_pack_list(tensors, "tensors");
  check_pack_align(align);
  const auto layout = pack_layout(tensors, align);
  check_flat(out, "out", tensors, layout.total);
  cuda::DeviceGuard guard(out.device());
  pack_into(tensors, scale, align, layout, out);
}

void unpack_cuda(const at::Tensor& flat, at::TensorList tensors, double scale, int64_t align, bool accumulate) {
  check_pack_list(tensors, "tensors", &flat);
  check_pack_align(align);
  const auto layout = pack_layout(tensors, align);
  check_flat(flat, "flat", tensors, layout.total);
  if (tensors.empty()) return;
  cuda::DeviceGuard guard(flat.device());
  std::vector<std::array<void*, 1>> ptrs;
  std::vector<int64_t> numels;
  list_args(tensors, ptrs, numels);
  dispatch_float3_pair(flat.scalar_type(), "flat", tensors[0].scalar_type(), "tensors", [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    UnpackOp<in_t, out_t> op{static_cast<const in_t*>(flat.data_ptr()), static_cast<float>(scale), accumulate};
    mta::multi_tensor_apply<1>(ptrs, numels, layout.offsets, op);
  });
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_l2norm_cuda(at::TensorList tensors) {
  check_pack_list(tensors, "tensors");
  TORCH_CHECK(!tensors.empty(), "tensors: expected at least one tensor (the Python wrapper handles empty lists)");
  cuda::DeviceGuard guard(tensors[0].device());
  const PackLayout layout = pack_layout(tensors, 1);
  std::vector<std::array<void*, 1>> ptrs;
  std::vector<int64_t> numels;
  list_args(tensors, ptrs, numels);
  const int64_t n_chunks = mta::num_chunks(numels);
  const auto opts = tensors[0].options();
  at::Tensor partial_sq = at::empty({n_chunks}, opts.dtype(c10::kFloat));
  at::Tensor partial_bad = at::empty({n_chunks}, opts.dtype(c10::kInt));
  at::Tensor sq = at::empty({}, opts.dtype(c10::kFloat));
  at::Tensor flag = at::empty({}, opts.dtype(c10::kBool));
  dispatch_float3(tensors[0].scalar_type(), "tensors", [&](auto tag) {
    using T = decltype(tag);
    L2NormOp<T> op{partial_sq.data_ptr<float>(), partial_bad.data_ptr<int>()};
    const int64_t ran = mta::multi_tensor_apply<1>(ptrs, numels, layout.offsets, op);
    TORCH_INTERNAL_ASSERT(ran == n_chunks);
  });
  const cudaStream_t stream = cuda::current_stream();
  cuda::launch(multi_tensor_l2norm_finalize_kernel, 1, 1024, stream, partial_sq.data_ptr<float>(),
               partial_bad.data_ptr<int>(), n_chunks, sq.data_ptr<float>(), flag.data_ptr<bool>());
  return {sq, flag};
}

}  // namespace

// For the quant ops that compose pack/unpack on CUDA (pyperf/pack_cuda.h).
void cuda_pack_out(at::TensorList tensors, double scale, int64_t align, const at::Tensor& out) {
  pack_out_cuda(tensors, scale, align, out);
}

void cuda_unpack(const at::Tensor& flat, at::TensorList tensors, double scale, int64_t align) {
  unpack_cuda(flat, tensors, scale, align, /*accumulate=*/false);
}

PYPERF_CUDA_KERNELS(m) {
  m.impl("pack", &pack_cuda);
  m.impl("pack_out", &pack_out_cuda);
  m.impl("unpack", &unpack_cuda);
  m.impl("multi_tensor_l2norm", &multi_tensor_l2norm_cuda);
}

}  // namespace pyperf
