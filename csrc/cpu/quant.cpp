// CPU kernels of the quant ops: blockwise quantize (+ stochastic rounding, + fused error feedback), dequantize
// (+ scale, + accumulate) and the fused dequantize-sum(-requantize) reduce of the two-shot all-reduce.
// at::parallel_for over quant blocks; each block is staged as fp32 in a stack buffer so the absmax pass and the
// encode pass read it from L1. The per-element math is pyperf/quant_math.h, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "pyperf/checks.h"
#include "pyperf/dispatch.h"
#include "pyperf/philox.h"
#include "pyperf/quant.h"

namespace pyperf {
namespace {

using namespace quant;

template <typename Fn>
void dispatch_format(Format f, Fn&& fn) {
  switch (f) {
    case kInt8: fn(std::integral_constant<int, kInt8>{}); break;
    case kInt4: fn(std::integral_constant<int, kInt4>{}); break;
    case kE4M3: fn(std::integral_constant<int, kE4M3>{}); break;
    case kE5M2: fn(std::integral_constant<int, kE5M2>{}); break;
  }
}

template <typename Fn>
void dispatch_bool(bool b, Fn&& fn) {
  if (b) fn(std::true_type{});
  else fn(std::false_type{});
}

// Blocks per parallel_for task: about 32K values, so small chunks stay on one thread.
int64_t grain_blocks(int64_t block_size) { return std::max<int64_t>(1, 32768 / block_size); }

// The block loops are compiled twice: for the baseline ISA and for AVX2 (chosen at run time), since the extension
// is built for generic x86-64 (SSE2). Everything they call is force-inlined so it is vectorized for AVX2 too.
// No FMA on purpose: contracting a*b+c would change the bits (the CPU, CUDA and reference results are identical).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PYPERF_CPU_INLINE __attribute__((always_inline)) inline
#define PYPERF_CPU_LAMBDA __attribute__((always_inline))
template <typename Body>
__attribute__((target("avx2"))) void run_avx2(const Body& body, int64_t b0, int64_t b1) {
  body(b0, b1);
}
// PYPERF_NO_AVX2=1 forces the baseline build (the tests run it too).
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && std::getenv("PYPERF_NO_AVX2") == nullptr;
  return has;
}
#else
#define PYPERF_CPU_INLINE inline
#define PYPERF_CPU_LAMBDA
template <typename Body>
void run_avx2(const Body& body, int64_t b0, int64_t b1) {
  body(b0, b1);
}
inline bool cpu_has_avx2() { return false; }
#endif

// at::parallel_for over blocks [0, nblocks); body(b0, b1) is a PYPERF_CPU_LAMBDA lambda.
template <typename Body>
void parallel_blocks(int64_t nblocks, int64_t block_size, const Body& body) {
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, nblocks, grain_blocks(block_size), [&](int64_t b0, int64_t b1) {
    if (avx2) run_avx2(body, b0, b1);
    else body(b0, b1);
  });
}

// Unscaled code values; fp8 goes through a 256-entry table (its decode branches on the exponent).
template <int F>
struct Decoder {
  float lut[256];
  Decoder() {
    if constexpr (F == kE4M3 || F == kE5M2) {
      for (uint32_t c = 0; c < 256; ++c) lut[c] = decode<F>(c);
    }
  }
  float operator()(uint32_t c) const {
    if constexpr (F == kE4M3 || F == kE5M2) return lut[c & 0xffu];
    else return decode<F>(c);
  }
};

// The scaled values of a block's payload into out[0, block_size): the padding decodes too (to 0 or NaN), so the
// loops have no tail and vectorize.
template <int F>
PYPERF_CPU_INLINE void decode_block(const uint8_t* payload, int64_t block_size, float scale, const Decoder<F>& dec, float* out) {
  if constexpr (F == kInt4) {
    for (int64_t j = 0; j < block_size / 2; ++j) {
      const uint32_t byte = payload[j];
      out[2 * j] = mul_rn(dec(byte & 0xfu), scale);
      out[2 * j + 1] = mul_rn(dec(byte >> 4), scale);
    }
  } else {
    for (int64_t i = 0; i < block_size; ++i) out[i] = mul_rn(dec(payload[i]), scale);
  }
}

// Quantizes the staged block v[0, block_size) (zeros beyond the n valid values) into its scale and payload;
// with EF writes residual[0, n). `first` is the element index of v[0] (a multiple of 4: one Philox group per 4).
// Separate simple passes (absmax, uniforms, encode, residual, pack) so each inner loop can vectorize.
template <int F, bool SR, bool EF>
PYPERF_CPU_INLINE void quantize_staged_block(const float* v, int64_t n, int64_t block_size, int64_t first, uint64_t seed,
                           uint64_t offset, uint8_t* scale_out, uint8_t* payload, float* residual,
                           const Decoder<F>& dec) {
  uint32_t lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent lanes: the max vectorizes
  for (int64_t i = 0; i < block_size; i += 8) {
    for (int j = 0; j < 8; ++j) {
      uint32_t a = abs_bits(v[i + j]);
      lanes[j] = a > lanes[j] ? a : lanes[j];
    }
  }
  uint32_t m = 0;
  for (int j = 0; j < 8; ++j) m = std::max(m, lanes[j]);
  const float scale = block_scale(m, static_cast<Format>(F));
  std::memcpy(scale_out, &scale, sizeof(float));
  const float inv = inv_block_scale(scale);

  float u[SR ? kMaxBlock : 1];
  if constexpr (SR) {
    for (int64_t g = 0; g < block_size; g += 4) {
      Philox4 r = philox_group(seed, offset, static_cast<uint64_t>(first + g) >> 2);
      for (int k = 0; k < 4; ++k) u[g + k] = philox_to_uniform(r.x[k]);
    }
  }
  uint8_t codes_int4[F == kInt4 ? kMaxBlock : 1];
  uint8_t* codes = F == kInt4 ? codes_int4 : payload;  // int8/fp8 codes are the payload bytes
  for (int64_t i = 0; i < block_size; ++i) {
    codes[i] = static_cast<uint8_t>(encode<F>(v[i], inv, SR, SR ? u[i] : 0.0f));
  }
  if constexpr (EF) {
    for (int64_t i = 0; i < n; ++i) residual[i] = ef_residual(v[i], mul_rn(dec(codes[i]), scale), scale);
  }
  if constexpr (F == kInt4) {
    for (int64_t j = 0; j < block_size / 2; ++j) payload[j] = pack_int4(codes[2 * j], codes[2 * j + 1]);
  }
}

// ---- quantize ----

void quantize_into_cpu(const at::Tensor& x, c10::string_view fmt, int64_t block_size, bool stochastic,
                       int64_t seed, int64_t offset, const c10::optional<at::Tensor>& residual, at::Tensor& out,
                       const c10::optional<at::Tensor>& residual_out) {
  const WireLayout w = check_quantize_args(x, fmt, block_size, residual, residual_out, out);
  if (w.numel == 0) return;
  uint8_t* wire = out.data_ptr<uint8_t>();
  const ResidualPtrs res = residual_ptrs(residual, residual_out);
  const uint64_t s = as_u64(seed), o = as_u64(offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    dispatch_format(w.fmt, [&](auto F_) {
      constexpr int F = decltype(F_)::value;
      const Decoder<F> dec;
      dispatch_bool(stochastic, [&](auto SR_) {
        dispatch_bool(res.out != nullptr, [&](auto EF_) {
          constexpr bool SR = decltype(SR_)::value, EF = decltype(EF_)::value;
          parallel_blocks(w.nblocks, block_size, [&](int64_t b0, int64_t b1) PYPERF_CPU_LAMBDA {
            float v[kMaxBlock];
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t first = b * block_size;
              const int64_t n = std::min(block_size, w.numel - first);
              const float* vb = v;
              if constexpr (std::is_same_v<scalar_t, float> && !EF) {
                if (n == block_size) vb = xp + first;  // a whole fp32 block needs no staging copy
              }
              if (vb == v) {
                // The block is staged before its residual is written, so residual_out may be residual.
                if (!EF) {
                  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(xp[first + i]);
                } else if (res.in != nullptr) {
                  for (int64_t i = 0; i < n; ++i) v[i] = add_rn(static_cast<float>(xp[first + i]), res.in[first + i]);
                } else {  // no old residual: + 0 all the same, so -0 turns +0 exactly as with a zero residual
                  for (int64_t i = 0; i < n; ++i) v[i] = add_rn(static_cast<float>(xp[first + i]), 0.0f);
                }
                for (int64_t i = n; i < block_size; ++i) v[i] = 0.0f;
              }
              quantize_staged_block<F, SR, EF>(vb, n, block_size, first, s, o, wire + 4 * b,
                                               wire + w.payload_offset + b * payload_bytes_per_block(w.fmt, block_size),
                                               EF ? res.out + first : nullptr, dec);
            }
          });
        });
      });
    });
  });
}

at::Tensor quantize_cpu(const at::Tensor& x, c10::string_view fmt, int64_t block_size, bool stochastic,
                        int64_t seed, int64_t offset, const c10::optional<at::Tensor>& residual,
                        const c10::optional<at::Tensor>& residual_out) {
  const WireLayout w = wire_layout(x.numel(), fmt, block_size);
  at::Tensor out = at::empty({w.bytes}, x.options().dtype(at::kByte));
  quantize_into_cpu(x, fmt, block_size, stochastic, seed, offset, residual, out, residual_out);
  return out;
}

// ---- dequantize ----

void dequantize_into_cpu(const at::Tensor& wire, int64_t numel, c10::string_view fmt, int64_t block_size,
                         double scale, bool accumulate, at::Tensor& out) {
  const WireLayout w = check_dequantize_args(wire, numel, fmt, block_size, out);
  if (numel == 0) return;
  const uint8_t* wp = wire.data_ptr<uint8_t>();
  const float uscale = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_format(w.fmt, [&](auto F_) {
      constexpr int F = decltype(F_)::value;
      const Decoder<F> dec;
      parallel_blocks(w.nblocks, block_size, [&](int64_t b0, int64_t b1) PYPERF_CPU_LAMBDA {
        float tmp[kMaxBlock];
        for (int64_t b = b0; b < b1; ++b) {
          float s;
          std::memcpy(&s, wp + 4 * b, sizeof(float));
          const uint8_t* payload = wp + w.payload_offset + b * payload_bytes_per_block(w.fmt, block_size);
          const int64_t first = b * block_size;
          const int64_t n = std::min(block_size, numel - first);
          scalar_t* o = op + first;
          decode_block<F>(payload, block_size, s, dec, tmp);
          if (uscale != 1.0f) {
            for (int64_t i = 0; i < n; ++i) tmp[i] = mul_rn(tmp[i], uscale);
          }
          if (accumulate) {
            for (int64_t i = 0; i < n; ++i) tmp[i] = add_rn(static_cast<float>(o[i]), tmp[i]);
          }
          for (int64_t i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(tmp[i]);
        }
      });
    });
  });
}

at::Tensor dequantize_cpu(const at::Tensor& wire, int64_t numel, c10::string_view fmt, int64_t block_size,
                          at::ScalarType out_dtype, double scale) {
  TORCH_CHECK(is_float_dtype(out_dtype), "out_dtype: expected float32, bfloat16 or float16, got ", out_dtype);
  wire_layout(numel, fmt, block_size);
  at::Tensor out = at::empty({numel}, wire.options().dtype(out_dtype));
  dequantize_into_cpu(wire, numel, fmt, block_size, scale, false, out);
  return out;
}

// ---- many tensors: quantize / dequantize the padded layout of pack(xs, align=block_size) in place of P ----

// Each tensor's data and size, and a walk over blocks [b0, b1) that hands body(b, p, n) the block's first element
// in its tensor and how many of its values are real (the rest is the layout's zero padding).
template <typename T>
struct TensorBlocks {
  const TensorsLayout& l;
  int64_t block_size;
  std::vector<T*> ptrs;
  std::vector<int64_t> numels;

  TensorBlocks(const TensorsLayout& layout, at::TensorList ts, int64_t bs) : l(layout), block_size(bs) {
    for (const auto& x : ts) {
      ptrs.push_back(x.numel() ? static_cast<T*>(x.data_ptr()) : nullptr);
      numels.push_back(x.numel());
    }
  }

  template <typename Body>
  PYPERF_CPU_INLINE void walk(int64_t b0, int64_t b1, const Body& body) const {
    int64_t t = tensor_of_block(l.bstart, b0);
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= l.bstart[t + 1]) ++t;
      const int64_t local = (b - l.bstart[t]) * block_size;
      body(b, ptrs[t] + local, std::min(block_size, numels[t] - local));
    }
  }

  // walk, with each block's pointer into `other` too: tensors of the same numels (null when other is empty)
  template <typename U, typename Body>
  PYPERF_CPU_INLINE void walk_with(const TensorBlocks<U>& other, int64_t b0, int64_t b1, const Body& body) const {
    int64_t t = tensor_of_block(l.bstart, b0);
    for (int64_t b = b0; b < b1; ++b) {
      while (b >= l.bstart[t + 1]) ++t;
      const int64_t local = (b - l.bstart[t]) * block_size;
      body(b, ptrs[t] + local, other.ptrs.empty() ? nullptr : other.ptrs[t] + local,
           std::min(block_size, numels[t] - local));
    }
  }
};

// Reading each block from its own tensor saves the pack pass (and its fp32 copy, 1.25x the gradient bytes
// of traffic) that the DDP hook did before quantize; the arithmetic is exactly quantize_into's on that layout.
void quantize_tensors_into_cpu(at::TensorList xs, c10::string_view fmt, int64_t block_size,
                               const c10::optional<at::Tensor>& residual, at::Tensor& out,
                               const c10::optional<at::Tensor>& residual_out) {
  const TensorsLayout l = check_tensors_layout(xs, "xs", fmt, block_size, out, "out");
  const WireLayout& w = l.w;
  check_residuals(residual, residual_out, w.numel, out, "out");
  if (w.nblocks == 0) return;
  uint8_t* wire = out.data_ptr<uint8_t>();
  const ResidualPtrs res = residual_ptrs(residual, residual_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xs[0].scalar_type(), "quantize_tensors_cpu", [&] {
    const TensorBlocks<const scalar_t> blocks(l, xs, block_size);
    dispatch_format(w.fmt, [&](auto F_) {
      constexpr int F = decltype(F_)::value;
      const Decoder<F> dec;
      dispatch_bool(res.out != nullptr, [&](auto EF_) {
        constexpr bool EF = decltype(EF_)::value;
        parallel_blocks(w.nblocks, block_size, [&](int64_t b0, int64_t b1) PYPERF_CPU_LAMBDA {
          float v[kMaxBlock];
          blocks.walk(b0, b1, [&](int64_t b, const scalar_t* xp, int64_t n) PYPERF_CPU_LAMBDA {
            const int64_t first = b * block_size;
            const float* vb = v;
            if constexpr (std::is_same_v<scalar_t, float> && !EF) {
              if (n == block_size) vb = xp;  // a whole fp32 block needs no staging copy
            }
            if (vb == v) {
              // Padding values are real zeros of the layout: they get v = 0 + residual and a residual_out, as in P.
              if (!EF) {
                for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(xp[i]);
                for (int64_t i = n; i < block_size; ++i) v[i] = 0.0f;
              } else if (res.in != nullptr) {
                for (int64_t i = 0; i < n; ++i) v[i] = add_rn(static_cast<float>(xp[i]), res.in[first + i]);
                for (int64_t i = n; i < block_size; ++i) v[i] = add_rn(0.0f, res.in[first + i]);
              } else {
                for (int64_t i = 0; i < n; ++i) v[i] = add_rn(static_cast<float>(xp[i]), 0.0f);
                for (int64_t i = n; i < block_size; ++i) v[i] = 0.0f;
              }
            }
            quantize_staged_block<F, false, EF>(vb, block_size, block_size, first, 0, 0, wire + 4 * b,
                                                wire + w.payload_offset + b * payload_bytes_per_block(w.fmt, block_size),
                                                EF ? res.out + first : nullptr, dec);
          });
        });
      });
    });
  });
}

// Decoding each block straight into its tensor saves the unpack pass after dequantize (and the fp32 copy).
void dequantize_tensors_cpu(const at::Tensor& wire, c10::string_view fmt, int64_t block_size, double scale,
                            at::TensorList outs) {
  const TensorsLayout l = check_tensors_layout(outs, "outs", fmt, block_size, wire, "wire");
  const WireLayout& w = l.w;
  if (w.nblocks == 0) return;
  const uint8_t* wp = wire.data_ptr<uint8_t>();
  const float uscale = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, outs[0].scalar_type(), "dequantize_tensors_cpu", [&] {
    const TensorBlocks<scalar_t> blocks(l, outs, block_size);
    dispatch_format(w.fmt, [&](auto F_) {
      constexpr int F = decltype(F_)::value;
      const Decoder<F> dec;
      parallel_blocks(w.nblocks, block_size, [&](int64_t b0, int64_t b1) PYPERF_CPU_LAMBDA {
        float tmp[kMaxBlock];
        blocks.walk(b0, b1, [&](int64_t b, scalar_t* o, int64_t n) PYPERF_CPU_LAMBDA {
          float s;
          std::memcpy(&s, wp + 4 * b, sizeof(float));
          decode_block<F>(wp + w.payload_offset + b * payload_bytes_per_block(w.fmt, block_size), block_size, s, dec,
                          tmp);
          if (uscale != 1.0f) {
            for (int64_t i = 0; i < n; ++i) tmp[i] = mul_rn(tmp[i], uscale);
          }
          for (int64_t i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(tmp[i]);
        });
      });
    });
  });
}

// ---- reduce (dequantize W chunks, fp32 sum in rank order, scale; optionally requantize) ----


// Stages the scaled fp32 sum of block b of every wire in v (zeros beyond n), in rank order. Rank r's wire starts
// at wp + r * row_stride. With own (the block's n values of the caller's own row), rank own_row's term is those
// exact values instead of its wire.
template <int F, typename T = float>
PYPERF_CPU_INLINE void stage_sum(const uint8_t* wp, int64_t W, int64_t row_stride, const WireLayout& w, int64_t b,
                                 int64_t n, float uscale, const Decoder<F>& dec, float* v, const T* own = nullptr,
                                 int64_t own_row = -1) {
  const int64_t bs = w.block_size;
  for (int64_t i = 0; i < bs; ++i) v[i] = 0.0f;
  for (int64_t r = 0; r < W; ++r) {
    if (r == own_row) {
      for (int64_t i = 0; i < n; ++i) v[i] = add_rn(v[i], static_cast<float>(own[i]));
      continue;
    }
    const uint8_t* row = wp + r * row_stride;
    float s;
    std::memcpy(&s, row + 4 * b, sizeof(float));
    const uint8_t* payload = row + w.payload_offset + b * payload_bytes_per_block(w.fmt, bs);
    if constexpr (F == kInt4) {
      for (int64_t j = 0; j < bs / 2; ++j) {
        const uint32_t byte = payload[j];
        v[2 * j] = add_rn(v[2 * j], mul_rn(dec(byte & 0xfu), s));
        v[2 * j + 1] = add_rn(v[2 * j + 1], mul_rn(dec(byte >> 4), s));
      }
    } else {
      for (int64_t i = 0; i < bs; ++i) v[i] = add_rn(v[i], mul_rn(dec(payload[i]), s));
    }
  }
  for (int64_t i = 0; i < n; ++i) v[i] = mul_rn(v[i], uscale);
  for (int64_t i = n; i < bs; ++i) v[i] = 0.0f;  // padding is 0, even in a NaN block (as on CUDA)
}

at::Tensor reduce_quantized_cpu(const at::Tensor& wires, int64_t numel, c10::string_view fmt, int64_t block_size,
                                double scale, at::ScalarType out_dtype) {
  TORCH_CHECK(is_float_dtype(out_dtype), "out_dtype: expected float32, bfloat16 or float16, got ", out_dtype);
  const WireLayout w = check_wires(wires, numel, fmt, block_size);
  at::Tensor out = at::empty({numel}, wires.options().dtype(out_dtype));
  if (numel == 0) return out;
  const uint8_t* wp = wires.data_ptr<uint8_t>();
  const int64_t W = wires.size(0);
  const float uscale = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "reduce_quantized_cpu", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    dispatch_format(w.fmt, [&](auto F_) {
      constexpr int F = decltype(F_)::value;
      const Decoder<F> dec;
      parallel_blocks(w.nblocks, block_size, [&](int64_t b0, int64_t b1) PYPERF_CPU_LAMBDA {
        float v[kMaxBlock];
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t first = b * block_size;
          const int64_t n = std::min(block_size, numel - first);
          stage_sum<F>(wp, W, w.bytes, w, b, n, uscale, dec, v);
          for (int64_t i = 0; i < n; ++i) op[first + i] = static_cast<scalar_t>(v[i]);
        }
      });
    });
  });
  return out;
}

// The all-gather form of the quantized all-reduce (every rank reduces every block) decodes W wires straight
// into the gradients: one pass, no fp32 sum buffer, no unpack.
void reduce_quantized_tensors_cpu(const at::Tensor& wires, c10::string_view fmt, int64_t block_size, double scale,
                                  at::TensorList outs, const c10::optional<at::TensorList>& own, int64_t own_row) {
  const TensorsLayout l = check_tensors_wires(outs, fmt, block_size, wires);
  check_own_row(own, own_row, outs, wires);
  const WireLayout& w = l.w;
  if (w.nblocks == 0) return;
  const uint8_t* wp = wires.data_ptr<uint8_t>();
  const int64_t W = wires.size(0);
  const int64_t row_stride = wires.stride(0);
  const float uscale = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, outs[0].scalar_type(), "reduce_quantized_tensors_cpu",
                                  [&] {
    const TensorBlocks<scalar_t> blocks(l, outs, block_size);
    // own has outs' layout: block b of own lies at the same offset of the same tensor index
    const TensorBlocks<const scalar_t> own_blocks(l, own.has_value() ? *own : at::TensorList(), block_size);
    dispatch_format(w.fmt, [&](auto F_) {
      constexpr int F = decltype(F_)::value;
      const Decoder<F> dec;
      parallel_blocks(w.nblocks, block_size, [&](int64_t b0, int64_t b1) PYPERF_CPU_LAMBDA {
        float v[kMaxBlock];
        blocks.walk_with(own_blocks, b0, b1, [&](int64_t b, scalar_t* o, const scalar_t* ob, int64_t n)
                                                 PYPERF_CPU_LAMBDA {
          stage_sum<F, scalar_t>(wp, W, row_stride, w, b, n, uscale, dec, v, ob, own_row);
          for (int64_t i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(v[i]);
        });
      });
    });
  });
}

void reduce_requantize_into_cpu(const at::Tensor& wires, int64_t numel, c10::string_view fmt, int64_t block_size,
                                double scale, bool stochastic, int64_t seed, int64_t offset,
                                const c10::optional<at::Tensor>& residual, at::Tensor& out,
                                const c10::optional<at::Tensor>& residual_out) {
  const WireLayout w = check_requantize_args(wires, numel, fmt, block_size, residual, residual_out, &out);
  if (numel == 0) return;
  const uint8_t* wp = wires.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t W = wires.size(0);
  const float uscale = static_cast<float>(scale);
  const ResidualPtrs res = residual_ptrs(residual, residual_out);
  const uint64_t s = as_u64(seed), o = as_u64(offset);
  dispatch_format(w.fmt, [&](auto F_) {
    constexpr int F = decltype(F_)::value;
    const Decoder<F> dec;
    dispatch_bool(stochastic, [&](auto SR_) {
      dispatch_bool(res.out != nullptr, [&](auto EF_) {
        constexpr bool SR = decltype(SR_)::value, EF = decltype(EF_)::value;
        parallel_blocks(w.nblocks, block_size, [&](int64_t b0, int64_t b1) PYPERF_CPU_LAMBDA {
          float v[kMaxBlock];
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t first = b * block_size;
            const int64_t n = std::min(block_size, numel - first);
            stage_sum<F>(wp, W, w.bytes, w, b, n, uscale, dec, v);
            if constexpr (EF) {
              if (res.in != nullptr) {
                for (int64_t i = 0; i < n; ++i) v[i] = add_rn(v[i], res.in[first + i]);
              } else {
                for (int64_t i = 0; i < n; ++i) v[i] = add_rn(v[i], 0.0f);
              }
            }
            quantize_staged_block<F, SR, EF>(v, n, block_size, first, s, o, op + 4 * b,
                                             op + w.payload_offset + b * payload_bytes_per_block(w.fmt, block_size),
                                             EF ? res.out + first : nullptr, dec);
          }
        });
      });
    });
  });
}

at::Tensor reduce_requantize_cpu(const at::Tensor& wires, int64_t numel, c10::string_view fmt, int64_t block_size,
                                 double scale, bool stochastic, int64_t seed, int64_t offset,
                                 const c10::optional<at::Tensor>& residual,
                                 const c10::optional<at::Tensor>& residual_out) {
  const WireLayout w = check_requantize_args(wires, numel, fmt, block_size, residual, residual_out, nullptr);
  at::Tensor out = at::empty({w.bytes}, wires.options());
  reduce_requantize_into_cpu(wires, numel, fmt, block_size, scale, stochastic, seed, offset, residual, out,
                             residual_out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyperf, CPU, m) {
  m.impl("quantize", &quantize_cpu);
  m.impl("quantize_into", &quantize_into_cpu);
  m.impl("dequantize", &dequantize_cpu);
  m.impl("dequantize_into", &dequantize_into_cpu);
  m.impl("reduce_quantized", &reduce_quantized_cpu);
  m.impl("reduce_requantize", &reduce_requantize_cpu);
  m.impl("reduce_requantize_into", &reduce_requantize_into_cpu);
  m.impl("quantize_tensors_into", &quantize_tensors_into_cpu);
  m.impl("dequantize_tensors_", &dequantize_tensors_cpu);
  m.impl("reduce_quantized_tensors_", &reduce_quantized_tensors_cpu);
}

}  // namespace pyperf
