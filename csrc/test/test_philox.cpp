// Philox4x32-10 against the known-answer vectors published with Random123 (kat_vectors), and the element
// mapping every kernel relies on.
#include <cstdio>
#include <cstdlib>

#include "pyperf/philox.h"

#include "expect.h"

static void kat(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, uint32_t e0,
                uint32_t e1, uint32_t e2, uint32_t e3) {
  pyperf::Philox4 c{{c0, c1, c2, c3}};
  pyperf::Philox4 r = pyperf::philox4x32_10(c, k0, k1);
  EXPECT(r.x[0] == e0 && r.x[1] == e1 && r.x[2] == e2 && r.x[3] == e3);
}

int main() {
  kat(0, 0, 0, 0, 0, 0, 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u);
  kat(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0x408f276du, 0x41c83b0eu,
      0xa20bc7c6u, 0x6d5451fdu);
  kat(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u, 0xd16cfe09u, 0x94fdccebu,
      0x5001e420u, 0x24126ea1u);

  // Element i takes lane i % 4 of group i / 4; seed and offset split into their 32-bit halves.
  const uint64_t seed = 0x0123456789abcdefull, offset = 0xfedcba9876543210ull;
  for (uint64_t i = 0; i < 64; ++i) {
    pyperf::Philox4 g = pyperf::philox_group(seed, offset, i / 4);
    EXPECT(pyperf::philox_uniform(seed, offset, i) == pyperf::philox_to_uniform(g.x[i % 4]));
  }
  // Uniforms are in [0, 1) and roughly centred.
  double sum = 0.0;
  const int n = 1 << 16;
  for (int i = 0; i < n; ++i) {
    float u = pyperf::philox_uniform(1, 2, i);
    EXPECT(u >= 0.0f && u < 1.0f);
    sum += u;
  }
  EXPECT(sum / n > 0.49 && sum / n < 0.51);
  EXPECT(pyperf::philox_to_uniform(0xffffffffu) < 1.0f);

  if (failures) {
    std::fprintf(stderr, "test_philox: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_philox: ok\n");
  return 0;
}
