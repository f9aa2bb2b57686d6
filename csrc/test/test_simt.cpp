// The SIMT emulation itself (csrc/emu/simt.h): that it runs kernels as CUDA would (barriers, shuffles, shared
// memory per block, block order shuffled) and reports each misuse it promises to, naming kernel, block and thread.
// The kernels are written as csrc/emu/build.py leaves a .cu: an entry hook first, __shared__ as shared<T>().
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "emu/simt.h"

#include "expect.h"

using pyperf_emu::Error;
using pyperf_emu::Site;

#define HERE Site{__FILE__, __LINE__}

// The message of the Error a launch throws, or "" when it runs clean.
template <typename F>
static std::string error_of(F&& run) {
  try {
    run();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

static bool has(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// ---- kernels that are correct ----

// Block-wide sum through shared memory and a barrier, then a warp butterfly with shuffles.
static void sum_kernel(const float* in, float* out) {
  PYPERF_EMU_KERNEL(256);
  static const char key = 0;
  auto& part = pyperf_emu::shared<float[8]>(&key, "part");
  const int t = threadIdx.x, lane = t % 32, warp = t / 32;
  float v = in[blockIdx.x * blockDim.x + t];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (t == 0) {
    float s = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) s += part[w];
    out[blockIdx.x] = s;
  }
}

static void any_kernel(const int* flags, int* out) {
  PYPERF_EMU_KERNEL(0);
  const int r = __syncthreads_or(flags[blockIdx.x * blockDim.x + threadIdx.x]);
  if (threadIdx.x == 0) out[blockIdx.x] = r;
}

static void order_kernel(int* order, int* next) {
  PYPERF_EMU_KERNEL(0);
  if (threadIdx.x == 0) order[(*next)++] = static_cast<int>(blockIdx.x);
}

static void read_unwritten_shared(float* out) {
  PYPERF_EMU_KERNEL(0);
  static const char key = 0;
  auto& s = pyperf_emu::shared<float[64]>(&key, "s");
  if (threadIdx.x == 0) out[blockIdx.x] = s[5];  // nobody wrote it in this block
  if (threadIdx.x == 0) s[5] = 1.0f;             // the next block must not see this
}

static void dims_kernel(unsigned* out) {
  PYPERF_EMU_KERNEL(0);
  const unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  out[b * blockDim.x * blockDim.y * blockDim.z + t] = b * 1000 + t;
}

// ---- kernels that break a rule ----

static void divergent_barrier() {
  PYPERF_EMU_KERNEL(0);
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

static void exit_before_barrier() {
  PYPERF_EMU_KERNEL(0);
  if (threadIdx.x == 7) return;
  __syncthreads();
}

static void shuffle_with_exited_lane() {
  PYPERF_EMU_KERNEL(0);
  if (threadIdx.x == 3) return;
  (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

static void shuffle_lane_outside_mask() {
  PYPERF_EMU_KERNEL(0);
  if (threadIdx.x < 16) (void)__shfl_xor_sync(0x0000ffffu, 1.0f, 16);
}

static void shuffle_beyond_block() {
  PYPERF_EMU_KERNEL(0);
  (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);  // a 16-thread block: lanes 16..31 do not exist
}

static void shuffle_vs_barrier() {
  PYPERF_EMU_KERNEL(0);
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

static void bounded_kernel() { PYPERF_EMU_KERNEL(128); }

static void too_much_shared() {
  PYPERF_EMU_KERNEL(0);
  static const char a = 0, b = 0;
  auto& x = pyperf_emu::shared<float[8192]>(&a, "x");
  auto& y = pyperf_emu::shared<float[8192]>(&b, "y");  // 64 KiB in all
  x[threadIdx.x] = y[threadIdx.x] = 0.f;
}

struct Big {
  char bytes[4100];
};
static void big_params(Big) { PYPERF_EMU_KERNEL(0); }

static void named(int) { PYPERF_EMU_KERNEL(0); __syncthreads(); if (threadIdx.x == 0) return; __syncthreads(); }

int main() {
  // a block sum: shuffles and a barrier compute what the host does
  {
    std::vector<float> in(4 * 256), out(4, -1.f);
    for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7) - 3.f;
    EXPECT(error_of([&] { pyperf_emu::launch(sum_kernel, dim3(4), dim3(256), HERE, in.data(), out.data()); }) == "");
    for (int b = 0; b < 4; ++b) {
      float want = 0.f;
      for (int t = 0; t < 256; ++t) want += in[b * 256 + t];
      EXPECT(out[b] == want);
    }
  }
  // __syncthreads_or
  {
    std::vector<int> flags(3 * 64, 0), out(3, -1);
    flags[64 + 63] = 1;
    EXPECT(error_of([&] { pyperf_emu::launch(any_kernel, dim3(3), dim3(64), HERE, flags.data(), out.data()); }) == "");
    EXPECT(out[0] == 0 && out[1] == 1 && out[2] == 0);
  }
  // blocks run once each, in a shuffled order
  {
    std::vector<int> order(64, -1);
    int next = 0;
    pyperf_emu::launch(order_kernel, dim3(64), dim3(32), HERE, order.data(), &next);
    EXPECT(next == 64);
    std::vector<int> seen(64, 0);
    bool sorted = true;
    for (int i = 0; i < 64; ++i) {
      if (order[i] >= 0 && order[i] < 64) ++seen[order[i]];
      if (i > 0 && order[i] < order[i - 1]) sorted = false;
    }
    for (int i = 0; i < 64; ++i) EXPECT(seen[i] == 1);
    EXPECT(!sorted);
  }
  // shared memory is per block and poisoned: an unwritten float reads as NaN in every block
  {
    std::vector<float> out(5, 0.f);
    pyperf_emu::launch(read_unwritten_shared, dim3(5), dim3(32), HERE, out.data());
    for (float v : out) EXPECT(std::isnan(v));
  }
  // 3-D grids and blocks: every (block, thread) once, with the right built-ins
  {
    std::vector<unsigned> out(2 * 3 * 2 * 4 * 2 * 3, ~0u);
    pyperf_emu::launch(dims_kernel, dim3(2, 3, 2), dim3(4, 2, 3), HERE, out.data());
    for (unsigned b = 0; b < 12; ++b)
      for (unsigned t = 0; t < 24; ++t) EXPECT(out[b * 24 + t] == b * 1000 + t);
  }

  // the errors, each naming what went wrong, the kernel and the place
  std::string e = error_of([] { pyperf_emu::launch(divergent_barrier, dim3(2), dim3(32), HERE); });
  EXPECT(has(e, "divergent __syncthreads") && has(e, "divergent_barrier") && has(e, "block (") &&
         has(e, "test_simt.cpp"));
  e = error_of([] { pyperf_emu::launch(exit_before_barrier, dim3(1), dim3(64), HERE); });
  EXPECT(has(e, "thread (7,0,0) exited without reaching it") && has(e, "exit_before_barrier"));
  e = error_of([] { pyperf_emu::launch(shuffle_with_exited_lane, dim3(1), dim3(32), HERE); });
  EXPECT(has(e, "names lane 3, which has exited") && has(e, "shuffle_with_exited_lane"));
  e = error_of([] { pyperf_emu::launch(shuffle_lane_outside_mask, dim3(1), dim3(32), HERE); });
  EXPECT(has(e, "which its mask does not name"));
  e = error_of([] { pyperf_emu::launch(shuffle_beyond_block, dim3(1), dim3(16), HERE); });
  EXPECT(has(e, "names lane 16, which does not exist"));
  e = error_of([] { pyperf_emu::launch(shuffle_vs_barrier, dim3(1), dim3(32), HERE); });
  EXPECT(has(e, "deadlock") || has(e, "divergent"));
  e = error_of([] { pyperf_emu::launch(bounded_kernel, dim3(1), dim3(256), HERE); });
  EXPECT(has(e, "256 threads per block, more than its __launch_bounds__(128)") && has(e, "bounded_kernel"));
  EXPECT(error_of([] { pyperf_emu::launch(bounded_kernel, dim3(1), dim3(128), HERE); }) == "");
  e = error_of([] { pyperf_emu::launch(bounded_kernel, dim3(1), dim3(2048), HERE); });
  EXPECT(has(e, "2048 threads per block > 1024") && has(e, "test_simt.cpp"));
  e = error_of([] { pyperf_emu::launch(bounded_kernel, dim3(1, 70000), dim3(32), HERE); });
  EXPECT(has(e, "gridDim.y = 70000 > 65535"));
  e = error_of([] { pyperf_emu::launch(bounded_kernel, dim3(1, 1, 65536), dim3(32), HERE); });
  EXPECT(has(e, "gridDim.z = 65536 > 65535"));
  e = error_of([] { pyperf_emu::launch(bounded_kernel, dim3(2147483648u), dim3(32), HERE); });
  EXPECT(has(e, "gridDim.x = 2147483648 > 2^31-1"));
  e = error_of([] { pyperf_emu::launch(bounded_kernel, dim3(0), dim3(32), HERE); });
  EXPECT(has(e, "empty grid"));
  e = error_of([] { pyperf_emu::launch(too_much_shared, dim3(1), dim3(32), HERE); });
  EXPECT(has(e, "more than 48 KiB") && has(e, "__shared__ y"));
  e = error_of([] { pyperf_emu::launch(big_params, dim3(1), dim3(32), HERE, Big{}); });
  EXPECT(has(e, "4100 bytes of kernel parameters > 4 KiB"));
  e = error_of([] { pyperf_emu::launch(named, dim3(3), dim3(32), HERE, 1); });
  EXPECT(has(e, "named(int)") && has(e, "exited without reaching it"));
  // after errors, the emulator runs the next launch normally
  {
    std::vector<float> in(256, 1.f), out(1, 0.f);
    EXPECT(error_of([&] { pyperf_emu::launch(sum_kernel, dim3(1), dim3(256), HERE, in.data(), out.data()); }) == "");
    EXPECT(out[0] == 256.f);
  }

  if (failures) std::fprintf(stderr, "%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
