// pyperf's SIMT emulation: the CUDA kernels of csrc/cuda/*.cu, compiled as host C++ (-DPYPERF_CUDA_EMU), run on
// the CPU with CUDA's execution rules enforced. Test-only: it builds pyperf._C_emu (csrc/emu/build.py), which
// registers the emulated kernels as the CPU kernels of torch.ops.pyperf_emu.*; it is never installed.
//
// Written for exactly the CUDA features pyperf's kernels use (add one here before a kernel uses it):
//   launches      pyperf::cuda::launch(kernel, grid, block, stream, args...) (csrc/include/pyperf/cuda_glue.cuh);
//                 1-3-D grids and blocks, no dynamic shared memory, __launch_bounds__(n), __grid_constant__
//   built-ins     threadIdx, blockIdx, blockDim, gridDim
//   barriers      __syncthreads(), __syncthreads_or(p)
//   warp          __shfl_xor_sync(mask, v, lane_mask) on 4- or 8-byte values, width 32
//   memory        static __shared__ arrays (per block, filled with 0xff bytes at block start: an unwritten float
//                 reads as NaN), 16-byte vector loads and stores (plain host memory accesses)
//   types         dim3, uint3, float2 / make_float2
//   intrinsics    exact: __float_as_uint, __uint_as_float, __fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn, max/min
//                 approximate on the device, host libm here (see APPROXIMATE below): rsqrtf, __expf, expf, erfcf
//   runtime       current stream, device guard, SM count and occupancy of an H100 (132 SMs, 2048 threads/SM)
//
// The execution model, as a GPU may run it:
//   - blocks run one after another, in an order shuffled per launch from PYPERF_EMU_SEED, so a kernel that
//     depends on block order shows it;
//   - the threads of a block are fibers, switched only at barriers and shuffles; a barrier releases when every
//     thread of the block has reached the same __syncthreads, a shuffle when every lane its mask names has;
//   - errors (Error, naming kernel, block and thread): a __syncthreads that not every thread of the block reaches
//     (one that exited, or one waiting at another barrier or shuffle: compute-sanitizer's synccheck), a shuffle
//     whose mask names a lane that exited, does not exist or waits elsewhere, a lane reading a lane outside the
//     mask; more than 1024 threads per block or more than the kernel's __launch_bounds__; gridDim.x > 2^31-1,
//     gridDim.y or .z > 65535, an empty grid or block; more than 48 KiB of static shared memory; more than 4 KiB
//     of kernel parameters.
// Built with -ffp-contract=off, so float arithmetic rounds every operation as written: the emulation cannot show
// where nvcc would contract a multiply and an add into an FMA (fix those in the source where bits are promised).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace pyperf_emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Site {
  const char* file;
  unsigned line;
};

inline Site site_of(const std::source_location& l) { return Site{l.file_name(), static_cast<unsigned>(l.line())}; }

// What the device code reads through the built-in variables.
struct BuiltIns {
  uint3 thread, block;
  dim3 block_dim, grid_dim;
};
// __thread, not thread_local: a plain TLS slot with no dynamic-initialization wrapper (GCC 12 with UBSan emitted a
// wrong fast path through the thread_local wrapper of an extern variable: a stale register read as the pointer).
extern __thread const BuiltIns* g_builtins;

// Device-side operations of the running thread (simt.cpp).
int barrier(bool or_reduce, int pred, Site site);
uint64_t shuffle_xor(unsigned mask, uint64_t value, int lane_mask, int width, Site site);
void* shared_alloc(const void* key, size_t bytes, size_t align, const char* name);
void kernel_entry(long long max_threads, const char* kernel);
[[noreturn]] void fail_in_thread(const std::string& what);

// The launch: runs body(ctx) once per thread of every block of the grid.
struct LaunchConfig {
  dim3 grid, block;
  size_t param_bytes;
  Site where;
};
void run_grid(const LaunchConfig& cfg, void (*body)(void*), void* ctx);

// Kernel parameters as the CUDA driver lays them out (each at its alignment), for the 4 KiB limit.
template <typename... Ks>
constexpr size_t param_bytes() {
  size_t off = 0;
  ((off = (off + alignof(Ks) - 1) / alignof(Ks) * alignof(Ks) + sizeof(Ks)), ...);
  return off;
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Site where, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "launch: wrong number of kernel arguments");
  // Converted once at launch, as the driver copies them; every thread gets its own copy, as from param space.
  using Params = std::tuple<std::decay_t<KArgs>...>;
  struct Ctx {
    void (*kernel)(KArgs...);
    Params params;
  } ctx{kernel, Params(std::forward<Args>(args)...)};
  const LaunchConfig cfg{grid, block, param_bytes<std::decay_t<KArgs>...>(), where};
  run_grid(cfg, [](void* p) {
    Ctx* c = static_cast<Ctx*>(p);
    std::apply(c->kernel, c->params);
  }, &ctx);
}

template <typename T>
T& shared(const void* key, const char* name) {
  static_assert(std::is_trivially_default_constructible_v<std::remove_all_extents_t<T>>,
                "__shared__ variables must be trivially constructible");
  return *static_cast<T*>(shared_alloc(key, sizeof(T), alignof(T), name));
}

}  // namespace pyperf_emu

#define threadIdx (::pyperf_emu::g_builtins->thread)
#define blockIdx (::pyperf_emu::g_builtins->block)
#define blockDim (::pyperf_emu::g_builtins->block_dim)
#define gridDim (::pyperf_emu::g_builtins->grid_dim)

// What csrc/emu/build.py inserts: at the top of every kernel body, and in place of each __shared__ declaration.
#define PYPERF_EMU_KERNEL(max_threads) ::pyperf_emu::kernel_entry((max_threads), __PRETTY_FUNCTION__)
#define PYPERF_EMU_SHARED(T, name, dims)        \
  static const char pyperf_emu_key_##name = 0; \
  auto& name = ::pyperf_emu::shared<T dims>(&pyperf_emu_key_##name, #name)

inline void __syncthreads(std::source_location l = std::source_location::current()) {
  ::pyperf_emu::barrier(false, 0, ::pyperf_emu::site_of(l));
}
inline int __syncthreads_or(int pred, std::source_location l = std::source_location::current()) {
  return ::pyperf_emu::barrier(true, pred, ::pyperf_emu::site_of(l));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                  std::source_location l = std::source_location::current()) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "__shfl_xor_sync: the emulation exchanges 4- and 8-byte values");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::pyperf_emu::shuffle_xor(mask, bits, lane_mask, width, ::pyperf_emu::site_of(l));
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// ---- intrinsics ----
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
// IEEE round-to-nearest on the device and here (SSE arithmetic, no contraction): exact.
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
// CUDA's integer max/min overloads (device code calls them unqualified).
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
// APPROXIMATE: on the device these have documented error bounds (rsqrtf 2 ulp, __expf 2 + 1.16|x| ulp, expf and
// erfcf a few ulp); here they are the host's correctly rounded or libm results. Tests of the ops that use them
// (the norms: rsqrtf; the activations: __expf, erfcf, exp, erfc) compare within tolerance, not bits.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
