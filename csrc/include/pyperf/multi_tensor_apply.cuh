// pyperf's multi-tensor-apply launcher: one kernel launch walks a whole list of tensors.
//
// The list is cut into chunks of `chunk_size` elements; each CUDA block handles one (tensor, chunk). Tensor
// pointers, sizes and a caller-defined int64 per tensor (`aux`, e.g. its offset in a flat buffer) travel BY VALUE
// in the kernel arguments (no host->device copy, no sync), so a launch carries at most kMaxTensors tensors and
// kMaxBlocks chunks; a longer list takes several launches (a tensor may straddle two, its slot is carried over;
// the plan is pyperf/mta_plan.h, tested on the host in csrc/test/test_mta_plan.cpp).
// Empty tensors are skipped. Launches go to the current stream and are checked. Blocks are numbered globally
// across the launches of one call (first_block + blockIdx.x), in list order, so a reduction can store one partial
// per chunk and combine them in a fixed order afterwards (deterministic).
//
// Written after reading the pattern of ATen's MultiTensorApply.cuh and apex's multi_tensor_apply.cuh.
#pragma once
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "pyperf/cuda_glue.cuh"
#include "pyperf/mta_plan.h"

namespace pyperf {
namespace mta {

constexpr int kThreads = 512;
constexpr int64_t kChunkSize = 65536;
// Kernel arguments are limited to 4 KiB on every toolkit and arch pyperf builds for; the limits below keep
// ChunkArgs<DEPTH> plus a small functor under it (checked by a static_assert in the launcher).
template <int DEPTH> struct Limits;
template <> struct Limits<1> { static constexpr int kMaxTensors = 64, kMaxBlocks = 416; };
template <> struct Limits<2> { static constexpr int kMaxTensors = 48, kMaxBlocks = 384; };
template <> struct Limits<3> { static constexpr int kMaxTensors = 36, kMaxBlocks = 320; };

template <int DEPTH>
struct ChunkArgs {
  static constexpr int kMaxTensors = Limits<DEPTH>::kMaxTensors;
  static constexpr int kMaxBlocks = Limits<DEPTH>::kMaxBlocks;
  void* ptr[DEPTH][kMaxTensors];   // DEPTH pointers per tensor (e.g. input and output of the same shape)
  int64_t numel[kMaxTensors];
  int64_t aux[kMaxTensors];        // the caller's value for each tensor
  static_assert(kMaxTensors <= 256, "block_tensor is a uint8_t slot number");
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
  int64_t first_block;             // global number of this launch's block 0
};

// What a block sees: its tensor slot `t` (index into args arrays), element range [begin, end) of that tensor,
// and its global chunk number.
template <int DEPTH, typename Op>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_apply_kernel(int64_t chunk_size, const __grid_constant__ ChunkArgs<DEPTH> args, Op op) {
  const int t = args.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * chunk_size;
  const int64_t n = args.numel[t];
  const int64_t end = begin + chunk_size < n ? begin + chunk_size : n;
  op(args, t, begin, end, args.first_block + blockIdx.x);
}

// Number of blocks (chunks) one multi_tensor_apply call over these sizes runs: the size of a per-chunk array.
inline int64_t num_chunks(const std::vector<int64_t>& numels, int64_t chunk_size = kChunkSize) {
  int64_t c = 0;
  for (int64_t n : numels) c += (n + chunk_size - 1) / chunk_size;
  return c;
}

// ptrs[i]: DEPTH pointers of tensor i; numels[i]: its size; aux[i]: the caller's value. Runs `op` (a
// trivially copyable functor with `__device__ void operator()(const ChunkArgs<DEPTH>&, int t, int64_t begin,
// int64_t end, int64_t block)`) over every chunk of every non-empty tensor on the current stream. Returns the
// number of blocks run (== num_chunks(numels, chunk_size)).
template <int DEPTH, typename Op>
int64_t multi_tensor_apply(const std::vector<std::array<void*, DEPTH>>& ptrs, const std::vector<int64_t>& numels,
                           const std::vector<int64_t>& aux, const Op& op, int64_t chunk_size = kChunkSize) {
  using Args = ChunkArgs<DEPTH>;
  static_assert(sizeof(Args) + sizeof(Op) + sizeof(int64_t) <= 4096, "kernel arguments exceed 4 KiB");
  TORCH_CHECK(ptrs.size() == numels.size() && aux.size() == numels.size(),
              "multi_tensor_apply: ptrs, numels and aux must have one entry per tensor");
  TORCH_CHECK(chunk_size > 0 && chunk_size % 16 == 0, "multi_tensor_apply: chunk_size must be a positive multiple "
              "of 16, got ", chunk_size);
  for (int64_t n : numels) {
    TORCH_CHECK((n + chunk_size - 1) / chunk_size <= INT32_MAX, "multi_tensor_apply: a tensor of ", n,
                " elements has too many chunks");
  }
  const cudaStream_t stream = cuda::current_stream();
  Args args;
  std::memset(&args, 0, sizeof(args));
  int64_t launched = 0;
  plan_launches(
      numels.data(), numels.size(), chunk_size, Args::kMaxTensors, Args::kMaxBlocks,
      [&](int slot, size_t i) {
        for (int d = 0; d < DEPTH; ++d) args.ptr[d][slot] = ptrs[i][d];
        args.numel[slot] = numels[i];
        args.aux[slot] = aux[i];
      },
      [&](int block, int slot, int64_t chunk) {
        args.block_tensor[block] = static_cast<uint8_t>(slot);
        args.block_chunk[block] = static_cast<int32_t>(chunk);
      },
      [&](int nblocks) {
        args.first_block = launched;
        cuda::launch(multi_tensor_apply_kernel<DEPTH, Op>, nblocks, kThreads, stream, chunk_size, args, op);
        launched += nblocks;
      });
  return launched;
}

}  // namespace mta
}  // namespace pyperf
