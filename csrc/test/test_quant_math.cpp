// The torch-independent quantization math (pyperf/quant_math.h): scales, rounding, fp8 codes against the
// e4m3fn / e5m2 tables, stochastic rounding by distance, int4 packing, non-finite blocks, error feedback.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "pyperf/philox.h"
#include "pyperf/quant_math.h"

using namespace pyperf::quant;

#include "expect.h"

// Every finite fp8 code decodes to a value that encodes back to the same code (scale 1), and decoding matches
// the format's definition at a few known points.
template <int F>
static void fp8_roundtrip(uint32_t maxcode, float maxval, float min_sub) {
  for (uint32_t c = 0; c < 256; ++c) {
    if ((c & 0x7fu) > maxcode) continue;
    float v = decode<F>(c);
    EXPECT(std::isfinite(v));
    EXPECT(encode<F>(v, 1.0f, false, 0.0f) == c);
  }
  EXPECT(decode<F>(maxcode) == maxval);
  EXPECT(decode<F>(0x80u | maxcode) == -maxval);
  EXPECT(decode<F>(1) == min_sub);
  EXPECT(encode<F>(maxval * 1.5f, 1.0f, false, 0.0f) == maxcode);  // saturates, never inf/nan
  EXPECT(encode<F>(-maxval * 4.0f, 1.0f, true, 0.5f) == (0x80u | maxcode));
  EXPECT(encode<F>(min_sub * 0.5f, 1.0f, false, 0.0f) == 0u);  // tie to even (0)
  EXPECT(encode<F>(min_sub * 0.75f, 1.0f, false, 0.0f) == 1u);
  // Stochastic rounding between the two neighbours 1 and the next code: probability by distance.
  float one = 1.0f, next = decode<F>(encode<F>(1.0f, 1.0f, false, 0.0f) + 1);
  float t = one + 0.25f * (next - one);
  int up = 0;
  const int n = 1 << 14;
  for (int i = 0; i < n; ++i) {
    float u = pyperf::philox_uniform(7, 1, i);
    float d = decode<F>(encode<F>(t, 1.0f, true, u));
    EXPECT(d == one || d == next);
    up += d == next;
  }
  EXPECT(std::fabs(up / static_cast<double>(n) - 0.25) < 0.02);
}

int main() {
  // Scales: absmax / qmax; NaN for inf/nan; 0 when subnormal or zero.
  EXPECT(block_scale(abs_bits(127.0f), kInt8) == 1.0f);
  EXPECT(block_scale(abs_bits(-7.0f), kInt4) == 1.0f);
  EXPECT(block_scale(abs_bits(448.0f), kE4M3) == 1.0f);
  EXPECT(block_scale(abs_bits(57344.0f), kE5M2) == 1.0f);
  EXPECT(std::isnan(block_scale(abs_bits(INFINITY), kInt8)));
  EXPECT(std::isnan(block_scale(abs_bits(-NAN), kInt8)));
  EXPECT(abs_bits(NAN) > abs_bits(INFINITY) && abs_bits(INFINITY) > abs_bits(3.0e38f));
  EXPECT(block_scale(0u, kInt8) == 0.0f);
  EXPECT(block_scale(abs_bits(1e-37f), kInt8) == 0.0f);
  EXPECT(block_scale(abs_bits(1.0f), kInt8) > 0.0f);

  // Round to nearest even; stochastic rounding by distance with the 24-bit uniforms.
  EXPECT(rint_small(2.5f) == 2.0f && rint_small(3.5f) == 4.0f && rint_small(-2.5f) == -2.0f);
  EXPECT(rint_small(-0.4f) == 0.0f && rint_small(126.6f) == 127.0f);
  EXPECT(round_to_int(2.25f, true, 0.0f) == 3.0f && round_to_int(2.25f, true, 0.2499f) == 3.0f);
  EXPECT(round_to_int(2.25f, true, 0.25f) == 2.0f && round_to_int(-2.25f, true, 0.7f) == -2.0f);
  EXPECT(round_to_int(-2.25f, true, 0.8f) == -3.0f && round_to_int(5.0f, true, 0.0f) == 5.0f);

  // int8 / int4: integers in range are exact; out of range clamps; codes are two's complement.
  for (int q = -127; q <= 127; ++q) {
    uint32_t c = encode<kInt8>(static_cast<float>(q) * 0.5f, inv_block_scale(0.5f), false, 0.0f);
    EXPECT(c <= 0xffu && decode<kInt8>(c) == static_cast<float>(q));
  }
  for (int q = -7; q <= 7; ++q) {
    uint32_t c = encode<kInt4>(static_cast<float>(q), 1.0f, true, 0.999f);
    EXPECT(c <= 0xfu && decode<kInt4>(c) == static_cast<float>(q));
  }
  EXPECT(encode<kInt8>(127.4f, 1.0f, true, 0.0f) == 127u);  // rounding up past qmax clamps
  EXPECT(encode<kInt4>(-7.6f, 1.0f, false, 0.0f) == 9u);    // -7 = 0b1001
  EXPECT(inv_block_scale(0.0f) == 0.0f && inv_block_scale(NAN) == 0.0f && inv_block_scale(0.25f) == 4.0f);
  EXPECT(encode<kInt8>(5.0f, inv_block_scale(0.0f), false, 0.0f) == 0u);  // zero block
  EXPECT(encode<kInt8>(NAN, inv_block_scale(NAN), true, 0.5f) == 0u);     // non-finite block: scale carries NaN
  EXPECT(std::isnan(dequant<kInt8>(0u, NAN)));
  uint8_t b = pack_int4(encode<kInt4>(-3.0f, 1.0f, false, 0.0f), encode<kInt4>(6.0f, 1.0f, false, 0.0f));
  EXPECT(decode<kInt4>(b & 0xfu) == -3.0f && decode<kInt4>(b >> 4) == 6.0f && b == 0x6du);

  // |err| <= scale / 2 for round to nearest, < scale for stochastic rounding.
  for (int i = 0; i < 4096; ++i) {
    float v = (pyperf::philox_uniform(3, 0, i) * 2.0f - 1.0f) * 9.0f;
    float s = block_scale(abs_bits(9.0f), kInt8);
    float u = pyperf::philox_uniform(3, 1, i);
    EXPECT(std::fabs(dequant<kInt8>(encode<kInt8>(v, inv_block_scale(s), false, 0.0f), s) - v) <= s * 0.5f * 1.0001f);
    EXPECT(std::fabs(dequant<kInt8>(encode<kInt8>(v, inv_block_scale(s), true, u), s) - v) < s);
    float s4 = block_scale(abs_bits(9.0f), kInt4);
    EXPECT(std::fabs(dequant<kInt4>(encode<kInt4>(v, inv_block_scale(s4), false, 0.0f), s4) - v) <= s4 * 0.5f * 1.0001f);
  }

  fp8_roundtrip<kE4M3>(0x7eu, 448.0f, std::ldexp(1.0f, -9));
  fp8_roundtrip<kE5M2>(0x7bu, 57344.0f, std::ldexp(1.0f, -16));
  EXPECT(std::isnan(decode<kE4M3>(0x7fu)) && std::isnan(decode<kE4M3>(0xffu)));
  EXPECT(decode<kE5M2>(0x7cu) == INFINITY && std::isnan(decode<kE5M2>(0x7du)));
  EXPECT(decode<kE4M3>(0x38u) == 1.0f && decode<kE5M2>(0x3cu) == 1.0f && decode<kE4M3>(0xb8u) == -1.0f);
  EXPECT(encode<kE4M3>(1.0625f, 1.0f, false, 0.0f) == 0x38u);  // halfway 1 and 1.125: to even
  EXPECT(encode<kE4M3>(1.1875f, 1.0f, false, 0.0f) == 0x3au);  // halfway 1.125 and 1.25: to even (1.25)

  // Error feedback: v = deq + residual exactly here; a non-finite block resets its residual to 0.
  EXPECT(ef_residual(1.3f, 1.25f, 0.25f) == 1.3f - 1.25f);
  EXPECT(ef_residual(1.3f, NAN, NAN) == 0.0f);

  if (failures) {
    std::fprintf(stderr, "test_quant_math: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_quant_math: ok\n");
  return 0;
}
