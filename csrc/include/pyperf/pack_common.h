// Layout and input validation shared by the pack/unpack/multi_tensor_l2norm kernels (CPU and CUDA). The layout
// must agree with pyperf.ops.pack_layout (Python), which the fakes and the bucketer use.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

#include "pyperf/checks.h"

namespace pyperf {

// Cap keeps round_up free of overflow for any realistic buffer and catches nonsense values.
constexpr int64_t kMaxPackAlign = int64_t(1) << 30;

inline int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

inline void check_pack_align(int64_t align) {
  TORCH_CHECK(align >= 1 && align <= kMaxPackAlign, "align: expected a number of elements in [1, 2^30], got ",
              align);
}

inline bool is_pack_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

inline void check_pack_dtype(c10::ScalarType t, const char* name) {
  TORCH_CHECK(is_pack_dtype(t), name, ": expected dtype float32, bfloat16 or float16, got ", t);
}

// Tensor i occupies [offsets[i], offsets[i] + numel_i); offsets[i] = round_up(end of tensor i-1, align);
// total = round_up(end of the last tensor, align).
struct PackLayout {
  std::vector<int64_t> offsets;
  int64_t total = 0;
};

inline PackLayout pack_layout(at::TensorList tensors, int64_t align) {
  PackLayout l;
  l.offsets.reserve(tensors.size());
  int64_t pos = 0;
  for (const auto& t : tensors) {
    pos = round_up(pos, align);
    l.offsets.push_back(pos);
    pos += t.numel();
  }
  l.total = round_up(pos, align);
  return l;
}

// One dtype (float32/bfloat16/float16), one device, each contiguous; `name` is the argument's name.
inline void check_pack_list(at::TensorList tensors, const char* name, const at::Tensor* device_ref = nullptr) {
  check_tensor_list(tensors, name, device_ref);
  if (!tensors.empty()) {
    TORCH_CHECK(is_pack_dtype(tensors[0].scalar_type()), name,
                "[0]: expected dtype float32, bfloat16 or float16, got ", tensors[0].scalar_type());
  }
}

// The flat side of pack_out / unpack: 1-D, contiguous, a supported dtype, on the tensors' device, long enough.
inline void check_flat(const at::Tensor& flat, const char* name, at::TensorList tensors, int64_t total) {
  TORCH_CHECK(flat.defined(), name, ": expected a tensor, got None/undefined");
  TORCH_CHECK(flat.dim() == 1, name, ": expected a 1-D tensor, got ", flat.dim(), " dimensions (sizes ",
              flat.sizes(), ")");
  TORCH_CHECK(flat.is_contiguous(), name, ": expected a contiguous tensor, got strides ", flat.strides());
  check_pack_dtype(flat.scalar_type(), name);
  if (!tensors.empty()) {
    TORCH_CHECK(flat.device() == tensors[0].device(), name, ": expected a tensor on ", tensors[0].device(),
                " like tensors[0], got one on ", flat.device());
  }
  TORCH_CHECK(flat.numel() >= total, name, ": expected at least ", total,
              " elements (the packed size of the tensors, see pyperf.ops.pack_layout), got ", flat.numel());
}

}  // namespace pyperf
