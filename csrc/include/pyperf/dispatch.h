// dtype dispatch over the floating dtypes pyperf supports: float32, bfloat16, float16 (compute in float32), and
// float64 (so the CPU kernels can be gradchecked in double precision).
#pragma once
#include <ATen/Dispatch.h>

// Runs __VA_ARGS__ with `scalar_t` bound to float, double, c10::BFloat16 or c10::Half; other dtypes raise an error
// that names NAME.
#define PYPERF_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace pyperf {

// Calls fn(tag) with a value of the storage type of t (float, c10::BFloat16 or c10::Half), the three gradient
// dtypes. Unlike PYPERF_DISPATCH_FLOAT it nests, so an input and an output dtype can be dispatched together, and
// its error names the argument (`name`).
template <typename Fn>
void dispatch_float3(c10::ScalarType t, const char* name, Fn&& fn) {
  switch (t) {
    case c10::kFloat: fn(float{}); return;
    case c10::kBFloat16: fn(c10::BFloat16{}); return;
    case c10::kHalf: fn(c10::Half{}); return;
    default: TORCH_CHECK(false, name, ": expected dtype float32, bfloat16 or float16, got ", t);
  }
}

// fn(in_tag, out_tag) for the nine (float32, bfloat16, float16) pairs.
template <typename Fn>
void dispatch_float3_pair(c10::ScalarType in, const char* in_name, c10::ScalarType out, const char* out_name,
                          Fn&& fn) {
  dispatch_float3(in, in_name, [&](auto in_tag) {
    dispatch_float3(out, out_name, [&](auto out_tag) { fn(in_tag, out_tag); });
  });
}

}  // namespace pyperf
