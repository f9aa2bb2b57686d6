// The emulation's side of csrc/include/pyperf/cuda_glue.cuh: the same names, run by the SIMT emulator (simt.h), and
// the emulated CUDA kernels registered as the CPU kernels of torch.ops.pyperf_emu.
#pragma once
#include <c10/core/Device.h>

#include <source_location>
#include <string>
#include <type_traits>

#include "emu/simt.h"
#include "pyperf/library.h"

using cudaStream_t = struct CUstream_st*;

namespace pyperf {
namespace cuda {

// Tensors are CPU tensors here: nothing to switch.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline cudaStream_t current_stream() { return nullptr; }

// The H100 that the launch plans are made for.
inline int sm_count(int) { return 132; }

// Occupancy from threads alone (2048 resident threads and at most 32 blocks per SM; registers not modelled).
template <typename... KArgs>
int max_active_blocks(void (*)(KArgs...), int threads) {
  const int n = threads > 0 ? 2048 / threads : 0;
  return n < 32 ? n : 32;
}

// The grid argument of launch, carrying the launch site for error messages.
struct Grid {
  dim3 dim;
  pyperf_emu::Site where;
  Grid(dim3 d, std::source_location l = std::source_location::current()) : dim(d), where(pyperf_emu::site_of(l)) {}
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  Grid(I x, std::source_location l = std::source_location::current())
      : dim(static_cast<unsigned>(x)), where(pyperf_emu::site_of(l)) {
    // a dim3 would silently wrap it
    if (x < 0 || static_cast<unsigned long long>(x) > 0xffffffffull)
      throw pyperf_emu::Error("pyperf_emu: launch at " + std::string(where.file) + ":" + std::to_string(where.line) +
                              ": grid size " + std::to_string(x) + " does not fit the unsigned gridDim.x");
  }
};

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), Grid grid, dim3 block, cudaStream_t, Args&&... args) {
  pyperf_emu::launch(kernel, grid.dim, block, grid.where, std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace pyperf

#define PYPERF_CUDA_KERNELS(m) PYPERF_LIBRARY_IMPL(CPU, m)
