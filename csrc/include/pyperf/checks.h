// Input validation shared by the CPU and CUDA kernels. Every message names the argument, what was expected
// and what came, so a user can act on it.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace pyperf {

inline bool is_float_dtype(c10::ScalarType t) {
  return t == c10::kFloat || t == c10::kBFloat16 || t == c10::kHalf;
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name, ": expected dtype float32, bfloat16 or float16, got ",
              t.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor (call .contiguous()), got sizes ",
              t.sizes(), " strides ", t.strides());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " like ", ref_name,
              ", got one on ", t.device());
}

// A list of tensors that kernels read as raw memory: one dtype, one device, each contiguous.
// `dtype_ref` may be undefined, in which case tensors[0]'s dtype is the reference.
inline void check_tensor_list(at::TensorList tensors, const char* name, const at::Tensor* device_ref = nullptr) {
  if (tensors.empty()) return;
  const auto& first = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.defined(), name, "[", i, "]: expected a tensor, got None/undefined");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), name, "[", i, "]: expected dtype ", first.scalar_type(),
                " like ", name, "[0], got ", t.scalar_type());
    TORCH_CHECK(t.device() == first.device(), name, "[", i, "]: expected device ", first.device(), " like ", name,
                "[0], got ", t.device());
    TORCH_CHECK(t.is_contiguous(), name, "[", i, "]: expected a contiguous tensor, got sizes ", t.sizes(),
                " strides ", t.strides());
  }
  if (device_ref != nullptr) {
    TORCH_CHECK(first.device() == device_ref->device(), name, ": expected tensors on ", device_ref->device(),
                ", got ", first.device());
  }
}

}  // namespace pyperf
