// CPU kernels of pack / pack_out / unpack / multi_tensor_l2norm. Work is split over the concatenated element space
// of all tensors (not one task per tensor), so a list of one huge tensor and many tiny ones balances the same way;
// inner loops are plain indexed loops over raw pointers, which the compiler vectorizes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <vector>

#include "pyperf/dispatch.h"
#include "pyperf/pack_common.h"

namespace pyperf {
namespace {

// Elements per parallel task: large enough to amortize task overhead, small enough to balance two threads.
constexpr int64_t kGrain = 1 << 15;
// Fixed reduction chunk of multi_tensor_l2norm: the result does not depend on the thread count.
constexpr int64_t kNormChunk = 1 << 16;

// bfloat16 is handled as raw bits: the branch-free round-to-nearest-even below (the same rule, NaN included, as
// c10::BFloat16) vectorizes, the c10 constructor does not.
inline float bf16_bits_to_float(uint16_t b) { return std::bit_cast<float>(uint32_t(b) << 16); }
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t(0x7fc0) : uint16_t(rounded);
}

// float16 likewise: the branch-free IEEE conversions of the FP16 library (the algorithm c10::Half uses, round to
// nearest even, inf/nan preserved), written on raw bits so that they inline and vectorize; through c10::Half
// the same loops run ~30x slower.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  // selects by mask, not ?:, so that the compiler need not branch around float ops (trapping math) and vectorizes
  const uint32_t m = 0u - uint32_t(two_w < (1u << 27));
  const uint32_t bits = (std::bit_cast<uint32_t>(denormalized) & m) | (std::bit_cast<uint32_t>(normalized) & ~m);
  return std::bit_cast<float>(sign | bits);
}
inline uint16_t float_to_half_bits(float f) {
  const uint32_t w = std::bit_cast<uint32_t>(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = std::max(bias, 0x71000000u);
  const float abs_f = std::bit_cast<float>(w & 0x7fffffffu);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  base = std::bit_cast<float>((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = std::bit_cast<uint32_t>(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t nan_m = 0u - uint32_t(shl1_w > 0xFF000000u);
  return uint16_t((sign >> 16) | (0x7E00u & nan_m) | (nonsign & ~nan_m));
}

template <typename T> struct Raw { using type = T; };
template <> struct Raw<c10::BFloat16> { using type = uint16_t; };
template <> struct Raw<c10::Half> { using type = uint16_t; };

template <typename T> inline float load_f(typename Raw<T>::type v) { return static_cast<float>(v); }
template <> inline float load_f<c10::BFloat16>(uint16_t v) { return bf16_bits_to_float(v); }
template <> inline float load_f<c10::Half>(uint16_t v) { return half_bits_to_float(v); }
template <typename T> inline typename Raw<T>::type store_f(float f) { return static_cast<T>(f); }
template <> inline uint16_t store_f<c10::BFloat16>(float f) { return float_to_bf16_bits(f); }
template <> inline uint16_t store_f<c10::Half>(float f) { return float_to_half_bits(f); }

// The hot loops are compiled twice, for AVX2 and for the baseline, and picked at load time (GCC/Clang function
// multi-versioning): the extension stays portable while the loops run at full vector width where available.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__SANITIZE_ADDRESS__)
#define PYPERF_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PYPERF_CPU_CLONES
#endif

// dst[i] = cast(scale * src[i])
template <typename in_t, typename out_t>
PYPERF_CPU_CLONES void scale_cast(const void* src_v, void* dst_v, int64_t n, float scale) {
  using ri = typename Raw<in_t>::type;
  using ro = typename Raw<out_t>::type;
  const ri* __restrict__ src = static_cast<const ri*>(src_v);
  ro* __restrict__ dst = static_cast<ro*>(dst_v);
  for (int64_t i = 0; i < n; ++i) dst[i] = store_f<out_t>(load_f<in_t>(src[i]) * scale);
}

// dst[i] = cast(dst[i] + scale * src[i])
template <typename in_t, typename out_t>
PYPERF_CPU_CLONES void scale_cast_acc(const void* src_v, void* dst_v, int64_t n, float scale) {
  using ri = typename Raw<in_t>::type;
  using ro = typename Raw<out_t>::type;
  const ri* __restrict__ src = static_cast<const ri*>(src_v);
  ro* __restrict__ dst = static_cast<ro*>(dst_v);
  for (int64_t i = 0; i < n; ++i) dst[i] = store_f<out_t>(load_f<out_t>(dst[i]) + load_f<in_t>(src[i]) * scale);
}

// Cumulative element counts of the tensors (without padding): starts[i] .. starts[i+1] is tensor i.
std::vector<int64_t> element_starts(at::TensorList tensors) {
  std::vector<int64_t> s(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) s[i + 1] = s[i] + tensors[i].numel();
  return s;
}

// Calls fn(tensor index, begin, end) for the pieces of the tensors that global elements [b, e) cover, in order.
template <typename Fn>
void for_pieces(const std::vector<int64_t>& starts, int64_t b, int64_t e, Fn&& fn) {
  const int64_t count = static_cast<int64_t>(starts.size()) - 1;
  int64_t t = std::upper_bound(starts.begin(), starts.end(), b) - starts.begin() - 1;
  for (; t < count && starts[t] < e; ++t) {
    const int64_t lo = std::max(b, starts[t]), hi = std::min(e, starts[t + 1]);
    if (hi > lo) fn(t, lo - starts[t], hi - starts[t]);
  }
}

void pack_into(at::TensorList tensors, double scale, int64_t align, const PackLayout& layout, at::Tensor& out) {
  if (tensors.empty()) return;
  const auto starts = element_starts(tensors);
  const int64_t n_total = starts.back();
  const float s = static_cast<float>(scale);
  const int64_t out_es = out.element_size();
  char* out_base = static_cast<char*>(out.data_ptr());
  dispatch_float3_pair(tensors[0].scalar_type(), "tensors", out.scalar_type(), "out", [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    const int64_t in_es = sizeof(in_t);
    at::parallel_for(0, n_total, kGrain, [&](int64_t b, int64_t e) {
      for_pieces(starts, b, e, [&](int64_t t, int64_t lo, int64_t hi) {
        const int64_t off = layout.offsets[t];
        scale_cast<in_t, out_t>(static_cast<const char*>(tensors[t].data_ptr()) + lo * in_es,
                                out_base + (off + lo) * out_es, hi - lo, s);
        const int64_t n = tensors[t].numel();
        if (hi == n) {  // whoever writes a tensor's last element zero-fills the padding after it
          const int64_t pad_end = round_up(off + n, align);
          std::memset(out_base + (off + n) * out_es, 0, (pad_end - off - n) * out_es);
        }
      });
    });
  });
}

at::Tensor pack_cpu(at::TensorList tensors, double scale, std::optional<c10::ScalarType> out_dtype, int64_t align) {
  check_pack_list(tensors, "tensors");
  check_pack_align(align);
  TORCH_CHECK(!tensors.empty(), "tensors: expected at least one tensor (the Python wrapper handles empty lists)");
  const auto dtype = out_dtype.value_or(tensors[0].scalar_type());
  check_pack_dtype(dtype, "out_dtype");
  const auto layout = pack_layout(tensors, align);
  at::Tensor out = at::empty({layout.total}, tensors[0].options().dtype(dtype));
  pack_into(tensors, scale, align, layout, out);
  return out;
}

void pack_out_cpu(at::TensorList tensors, double scale, int64_t align, at::Tensor out) {
  check_pack_list(tensors, "tensors");
  check_pack_align(align);
  const auto layout = pack_layout(tensors, align);
  check_flat(out, "out", tensors, layout.total);
  pack_into(tensors, scale, align, layout, out);
}

void unpack_cpu(const at::Tensor& flat, at::TensorList tensors, double scale, int64_t align, bool accumulate) {
  check_pack_list(tensors, "tensors", &flat);
  check_pack_align(align);
  const auto layout = pack_layout(tensors, align);
  check_flat(flat, "flat", tensors, layout.total);
  if (tensors.empty()) return;
  const auto starts = element_starts(tensors);
  const float s = static_cast<float>(scale);
  const char* flat_base = static_cast<const char*>(flat.data_ptr());
  const int64_t in_es = flat.element_size();
  dispatch_float3_pair(flat.scalar_type(), "flat", tensors[0].scalar_type(), "tensors", [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    const int64_t out_es = sizeof(out_t);
    at::parallel_for(0, starts.back(), kGrain, [&](int64_t b, int64_t e) {
      for_pieces(starts, b, e, [&](int64_t t, int64_t lo, int64_t hi) {
        const char* src = flat_base + (layout.offsets[t] + lo) * in_es;
        char* dst = static_cast<char*>(tensors[t].data_ptr()) + lo * out_es;
        if (accumulate) {
          scale_cast_acc<in_t, out_t>(src, dst, hi - lo, s);
        } else {
          scale_cast<in_t, out_t>(src, dst, hi - lo, s);
        }
      });
    });
  });
}

// Sum of squares and a non-finite flag of n elements. Independent float lanes (vectorizable without
// reassociation), combined in double. x * 0 is 0 for finite x and nan for inf/nan, so the `zero` lanes turn nan
// exactly when an input is non-finite (no -ffast-math here, so the compiler keeps the multiply).
template <typename T>
PYPERF_CPU_CLONES void sumsq(const void* p_v, int64_t n, double& acc, bool& nonfinite) {
  using r = typename Raw<T>::type;
  const r* __restrict__ p = static_cast<const r*>(p_v);
  constexpr int L = 32;
  float lanes[L] = {};
  float zero[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    for (int j = 0; j < L; ++j) {
      const float x = load_f<T>(p[i + j]);
      lanes[j] += x * x;
      zero[j] += x * 0.0f;
    }
  }
  for (; i < n; ++i) {
    const float x = load_f<T>(p[i]);
    lanes[0] += x * x;
    zero[0] += x * 0.0f;
  }
  double sum = 0.0;
  float z = 0.0f;
  for (int j = 0; j < L; ++j) {
    sum += lanes[j];
    z += zero[j];
  }
  acc += sum;
  nonfinite = nonfinite || z != z;
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_l2norm_cpu(at::TensorList tensors) {
  check_pack_list(tensors, "tensors");
  TORCH_CHECK(!tensors.empty(), "tensors: expected at least one tensor (the Python wrapper handles empty lists)");
  const auto starts = element_starts(tensors);
  const int64_t n_total = starts.back();
  const int64_t n_chunks = (n_total + kNormChunk - 1) / kNormChunk;
  std::vector<double> partial(n_chunks, 0.0);
  std::vector<char> bad(n_chunks, 0);
  dispatch_float3(tensors[0].scalar_type(), "tensors", [&](auto tag) {
    using T = decltype(tag);
    at::parallel_for(0, n_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        double acc = 0.0;
        bool nf = false;
        for_pieces(starts, c * kNormChunk, std::min(n_total, (c + 1) * kNormChunk),
                   [&](int64_t t, int64_t lo, int64_t hi) {
                     sumsq<T>(static_cast<const T*>(tensors[t].data_ptr()) + lo, hi - lo, acc, nf);
                   });
        partial[c] = acc;
        bad[c] = nf;
      }
    });
  });
  double total = 0.0;
  bool nonfinite = false;
  for (int64_t c = 0; c < n_chunks; ++c) {  // fixed order: deterministic whatever the thread count
    total += partial[c];
    nonfinite = nonfinite || bad[c];
  }
  auto opts = tensors[0].options();
  at::Tensor sq = at::empty({}, opts.dtype(c10::kFloat));
  at::Tensor flag = at::empty({}, opts.dtype(c10::kBool));
  *sq.data_ptr<float>() = static_cast<float>(total);
  *flag.data_ptr<bool>() = nonfinite;
  return {sq, flag};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyperf, CPU, m) {
  m.impl("pack", &pack_cpu);
  m.impl("pack_out", &pack_out_cpu);
  m.impl("unpack", &unpack_cpu);
  m.impl("multi_tensor_l2norm", &multi_tensor_l2norm_cpu);
}

}  // namespace pyperf
