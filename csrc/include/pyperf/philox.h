// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11), host and device.
//
// Every random draw in pyperf (stochastic rounding, dropout) comes from here, keyed by an explicit
// (seed, offset) and the element index, so the same call reproduces the same bits on replay, on recompute
// and on CPU and CUDA alike. Convention: element i uses counter {g, g >> 32, offset, offset >> 32} with
// g = i / 4 and takes lane i % 4 of the four outputs; the key is {seed, seed >> 32}.
// Torch-independent on purpose: csrc/test checks it against the published known-answer vectors.
#pragma once
#include <stdint.h>

#include "pyperf/macros.h"

namespace pyperf {

struct Philox4 {
  uint32_t x[4];
};

PYPERF_HD uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
  uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

PYPERF_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    uint32_t lo0 = philox_mulhilo(M0, ctr.x[0], &hi0);
    uint32_t lo1 = philox_mulhilo(M1, ctr.x[2], &hi1);
    Philox4 next;
    next.x[0] = hi1 ^ ctr.x[1] ^ k0;
    next.x[1] = lo1;
    next.x[2] = hi0 ^ ctr.x[3] ^ k1;
    next.x[3] = lo0;
    ctr = next;
    k0 += W0;
    k1 += W1;
  }
  return ctr;
}

// The four raw 32-bit draws of element group g (elements 4g .. 4g+3).
PYPERF_HD Philox4 philox_group(uint64_t seed, uint64_t offset, uint64_t g) {
  Philox4 c;
  c.x[0] = static_cast<uint32_t>(g);
  c.x[1] = static_cast<uint32_t>(g >> 32);
  c.x[2] = static_cast<uint32_t>(offset);
  c.x[3] = static_cast<uint32_t>(offset >> 32);
  return philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A uniform float in [0, 1) with 24 random bits (exactly representable, never 1.0).
PYPERF_HD float philox_to_uniform(uint32_t r) { return static_cast<float>(r >> 8) * (1.0f / 16777216.0f); }

// The uniform of element i alone (kernels that handle 4 consecutive elements should call philox_group once).
PYPERF_HD float philox_uniform(uint64_t seed, uint64_t offset, uint64_t i) {
  Philox4 r = philox_group(seed, offset, i >> 2);
  return philox_to_uniform(r.x[i & 3]);
}

}  // namespace pyperf
