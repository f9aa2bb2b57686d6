// dtype dispatch over the floating dtypes pyperf supports: float32, bfloat16, float16 (compute in float32), and
// float64 (so the CPU kernels can be gradchecked in double precision).
#pragma once
#include <ATen/Dispatch.h>

// Runs __VA_ARGS__ with `scalar_t` bound to float, double, c10::BFloat16 or c10::Half; other dtypes raise an error
// that names NAME.
#define PYPERF_DISPATCH_FLOAT(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)
