// Per-element math of blockwise quantization (docs/quant.md), shared by the CPU and CUDA kernels and tested
// without torch by csrc/test/test_quant_math.cpp. pyperf/_reference.py mirrors it operation for operation.
//
// Bit-identical on CPU and CUDA: divisions, products and differences go through *_rn helpers, which on the
// device are IEEE intrinsics immune to --use_fast_math and to FMA contraction (the SIMT emulation, csrc/emu, takes
// the device branch too, with its exact host intrinsics). Scales below FLT_MIN are sent as
// 0 (CUDA flushes subnormals), so a block whose absmax is under qmax * FLT_MIN is sent as zeros and stays in the
// error-feedback residual on both backends.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "pyperf/macros.h"

namespace pyperf {
namespace quant {

enum Format : int { kInt8 = 0, kInt4 = 1, kE4M3 = 2, kE5M2 = 3 };

constexpr int kMinBlock = 32;
constexpr int kMaxBlock = 4096;
constexpr uint32_t kNonFiniteBits = 0x7f800000u;  // abs bits >= this: inf or nan
constexpr uint32_t kFltMinBits = 0x00800000u;
constexpr uint32_t kNanBits = 0x7fc00000u;

PYPERF_HD uint32_t f2u(float f) {
#if defined(__CUDA_ARCH__) || defined(PYPERF_CUDA_EMU)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

PYPERF_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__) || defined(PYPERF_CUDA_EMU)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

PYPERF_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(PYPERF_CUDA_EMU)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

PYPERF_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(PYPERF_CUDA_EMU)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

PYPERF_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(PYPERF_CUDA_EMU)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

PYPERF_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(PYPERF_CUDA_EMU)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// Largest code magnitude: the absmax of a block maps to it.
PYPERF_HD float qmax(Format f) {
  return f == kInt8 ? 127.0f : f == kInt4 ? 7.0f : f == kE4M3 ? 448.0f : 57344.0f;
}

// Payload bytes of a block of `block_size` values.
PYPERF_HD int64_t payload_bytes_per_block(Format f, int64_t block_size) {
  return f == kInt4 ? block_size / 2 : block_size;
}

// |v| as bits: their unsigned order is the order of magnitudes, and inf/nan sort at or above kNonFiniteBits, so a
// plain integer max gives the absmax and the non-finite test at once (and vectorizes).
PYPERF_HD uint32_t abs_bits(float v) { return f2u(v) & 0x7fffffffu; }

// The block scale from the max abs_bits of its values: absmax / qmax; NaN when the block holds inf/nan (the
// whole block then dequantizes to NaN, so non-finite gradients are never laundered); 0 below FLT_MIN.
PYPERF_HD float block_scale(uint32_t absmax_bits, Format f) {
  if (absmax_bits >= kNonFiniteBits) return u2f(kNanBits);
  float s = div_rn(u2f(absmax_bits), qmax(f));
  return s >= u2f(kFltMinBits) ? s : 0.0f;
}

// Round to nearest even for |t| < 2^22 (all t here are below 2^16): adding 1.5 * 2^23 leaves no fraction bits.
// Unlike rintf it needs no SSE4.1 to vectorize and cannot be changed by the rounding mode of a math library.
PYPERF_HD float rint_small(float t) {
  const float magic = 12582912.0f;
  return sub_rn(add_rn(t, magic), magic);
}

// What values are multiplied by: 1 / scale (one IEEE division per block, not per value); 0 for a block sent as
// zeros (scale 0 or NaN).
PYPERF_HD float inv_block_scale(float scale) { return scale > 0.0f ? div_rn(1.0f, scale) : 0.0f; }

// t rounded to an integer-valued float: to nearest even, or stochastically: up with probability frac(t), from a
// uniform u in [0, 1) (t - floor(t) is exact here, so this is unbiased to 2^-24).
// 1.0f or 0.0f from an integer mask. Branch-free on purpose: with `c ? 1.0f : 0.0f` the compiler folds x - 0 and
// sinks x - 1 into a branch it will not if-convert (a float op may trap), and an unpredictable branch per value
// made the CPU stochastic rounding 10x slower; the mask keeps the loop vectorizable.
PYPERF_HD float one_if(bool c) { return u2f(0x3f800000u & (0u - static_cast<uint32_t>(c))); }

// (r is never -0, so adding or subtracting 0 leaves every value as the select form would.)
PYPERF_HD float round_to_int(float t, bool stochastic, float u) {
  const float r = rint_small(t);
  if (!stochastic) return r;
  const float fl = sub_rn(r, one_if(r > t));
  return add_rn(fl, one_if(u < sub_rn(t, fl)));
}

// fp8 layout: mantissa bits, exponent bias, largest finite code (saturation, never inf/nan).
template <int F>
struct Fp8Spec;
template <>
struct Fp8Spec<kE4M3> {
  static constexpr int mbits = 3, bias = 7;
  static constexpr uint32_t maxcode = 0x7e;  // 448; 0x7f is NaN in e4m3fn
};
template <>
struct Fp8Spec<kE5M2> {
  static constexpr int mbits = 2, bias = 15;
  static constexpr uint32_t maxcode = 0x7b;  // 57344; 0x7c is inf
};

// The code (low 8 bits; int4: low 4 bits, two's complement) of v in a block with inv_block_scale `inv_scale`.
// Blocks with scale 0 or NaN (inv_scale 0) send code 0. For fp8, t = v * inv_scale is rounded on the grid of its binade (quantum 2^(e - mbits), with e
// clamped to the smallest normal exponent so subnormals share one quantum): stochastic rounding therefore picks
// one of the two neighbouring representable values with probability by distance. Codes are monotonic in
// magnitude, so saturation is a clamp of the code.
template <int F>
PYPERF_HD uint32_t encode(float v, float inv_scale, bool stochastic, float u) {
  if (!(inv_scale > 0.0f)) return 0u;
  float t = mul_rn(v, inv_scale);  // |t| <= qmax up to rounding; saturation below absorbs the excess
  if constexpr (F == kInt8 || F == kInt4) {
    const float q = F == kInt8 ? 127.0f : 7.0f;
    float r = round_to_int(t, stochastic, u);
    r = r < -q ? -q : (r > q ? q : r);  // t may exceed qmax by an ulp; ternaries (not fminf) vectorize
    return static_cast<uint32_t>(static_cast<int32_t>(r)) & (F == kInt8 ? 0xffu : 0xfu);
  } else {
    using S = Fp8Spec<F>;
    uint32_t bits = f2u(t);
    uint32_t sign = (bits >> 24) & 0x80u;
    int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
    if (e < 1 - S::bias) e = 1 - S::bias;
    float inv_quantum = u2f(static_cast<uint32_t>(127 - e + S::mbits) << 23);  // 2^(mbits - e): exact product
    float m = mul_rn(u2f(bits & 0x7fffffffu), inv_quantum);
    uint32_t r = static_cast<uint32_t>(round_to_int(m, stochastic, u));
    uint32_t code = (static_cast<uint32_t>(e + S::bias - 1) << S::mbits) + r;
    return sign | (code < S::maxcode ? code : S::maxcode);
  }
}

// The unscaled value of a code (int4: a nibble). e4m3fn 0x7f/0xff decode to NaN and e5m2 exponent 31 to inf/nan,
// though encode never produces them.
template <int F>
PYPERF_HD float decode(uint32_t code) {
  if constexpr (F == kInt8) {
    return static_cast<float>(static_cast<int8_t>(static_cast<uint8_t>(code)));
  } else if constexpr (F == kInt4) {
    return static_cast<float>(static_cast<int32_t>((code & 0xfu) ^ 0x8u) - 8);
  } else {
    using S = Fp8Spec<F>;
    uint32_t sign = (code & 0x80u) << 24;
    uint32_t mag = code & 0x7fu;
    uint32_t E = mag >> S::mbits, M = mag & ((1u << S::mbits) - 1u);
    if (F == kE4M3 && mag == 0x7fu) return u2f(sign | kNanBits);
    if (F == kE5M2 && E == 31u) return u2f(sign | (M == 0u ? 0x7f800000u : kNanBits));
    float val;
    if (E == 0u) {
      val = static_cast<float>(M) * u2f(static_cast<uint32_t>(127 + 1 - S::bias - S::mbits) << 23);
    } else {
      val = u2f(((E + 127u - static_cast<uint32_t>(S::bias)) << 23) | (M << (23 - S::mbits)));
    }
    return u2f(f2u(val) | sign);
  }
}

// What the receiver reconstructs from a code: decode(code) * block scale (NaN for a non-finite block).
template <int F>
PYPERF_HD float dequant(uint32_t code, float scale) {
  return mul_rn(decode<F>(code), scale);
}

// Error feedback: what was not sent, v - dequant. A non-finite block's step is skipped by the loss scaler, so its
// residual is reset to 0 rather than kept as inf/nan, which would poison every later step.
PYPERF_HD float ef_residual(float v, float deq, float scale) { return scale == scale ? sub_rn(v, deq) : 0.0f; }

// Packs two int4 codes, the even element in the low nibble.
PYPERF_HD uint8_t pack_int4(uint32_t lo, uint32_t hi) { return static_cast<uint8_t>((lo & 0xfu) | (hi << 4)); }

}  // namespace quant
}  // namespace pyperf
