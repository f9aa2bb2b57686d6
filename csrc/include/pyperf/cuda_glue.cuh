// The CUDA runtime as pyperf's kernels use it, in one place, so that csrc/cuda/*.cu compile with nvcc and, as they
// are, as host C++ under the SIMT emulation (csrc/emu/runtime.h replaces this part when PYPERF_CUDA_EMU is set):
//   pyperf::cuda::launch(kernel, grid, block, stream, args...)   the triple-chevron launch on `stream` with no
//                                                                dynamic shared memory, then the launch check
//   pyperf::cuda::DeviceGuard, current_stream(), sm_count(device), max_active_blocks(kernel, threads)
//   PYPERF_CUDA_KERNELS(m)                                       TORCH_LIBRARY_IMPL(pyperf, CUDA, m)
#pragma once
#include "pyperf/library.h"

#if defined(PYPERF_CUDA_EMU)
#include "emu/runtime.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <utility>

namespace pyperf {
namespace cuda {

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// Every launch goes here: on the current stream (never the default one), checked right after.
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int sm_count(int device) {
  static int counts[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device] = n > 0 ? n : 1;
  }
  return counts[device];
}

// Resident blocks per SM of `kernel` at `threads` threads per block (no dynamic shared memory).
template <typename... KArgs>
int max_active_blocks(void (*kernel)(KArgs...), int threads) {
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, 0));
  return n;
}

}  // namespace cuda
}  // namespace pyperf

#define PYPERF_CUDA_KERNELS(m) PYPERF_LIBRARY_IMPL(CUDA, m)
#endif
