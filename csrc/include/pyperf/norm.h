// Argument checks and output allocation shared by the CPU and CUDA kernels of the norm ops
// (add_rms_norm, add_layer_norm and their backwards), so both backends accept exactly the same inputs.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <vector>

#include "pyperf/checks.h"

namespace pyperf {
namespace norm {

struct Rows {
  int64_t M;  // rows: the product of all but the last dim
  int64_t N;  // the normalized (last) dim
};

inline bool is_norm_dtype(c10::ScalarType t, bool allow_double) {
  return is_float_dtype(t) || (allow_double && t == c10::kDouble);
}

inline Rows rows_of(const at::Tensor& x) {
  int64_t M = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  return {M, x.size(-1)};
}

// The statistics (mean, rstd) have one entry per row, shape x.shape[:-1]; float32, float64 for float64 input.
inline std::vector<int64_t> stat_sizes(const at::Tensor& x) {
  auto s = x.sizes().vec();
  s.pop_back();
  return s;
}
inline c10::ScalarType stat_dtype(const at::Tensor& x) {
  return x.scalar_type() == c10::kDouble ? c10::kDouble : c10::kFloat;
}

// weight / bias: 1-D of size N, contiguous, on x's device, dtype of x or float32 (fp32 master weights).
inline void check_affine(const c10::optional<at::Tensor>& p, const at::Tensor& x, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  const at::Tensor& t = *p;
  check_same_device(t, x, name, "x");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(-1), name, ": expected a 1-D tensor of size ", x.size(-1),
              " (x's last dim), got sizes ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() || t.scalar_type() == c10::kFloat, name, ": expected dtype ",
              x.scalar_type(), " (like x) or float32, got ", t.scalar_type());
  check_contiguous(t, name);
}

inline void check_affine_pair(const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  if (weight.has_value() && weight->defined() && bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == weight->scalar_type(), "bias: expected the dtype of weight (",
                weight->scalar_type(), "), got ", bias->scalar_type());
  }
}

// A tensor of x's shape, dtype and device, contiguous (residual, dy, dh, saved).
inline void check_like_x(const at::Tensor& t, const at::Tensor& x, const char* name, const char* x_name) {
  check_same_device(t, x, name, x_name);
  TORCH_CHECK(t.sizes() == x.sizes(), name, ": expected sizes ", x.sizes(), " like ", x_name, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, ": expected dtype ", x.scalar_type(), " like ", x_name,
              ", got ", t.scalar_type());
  check_contiguous(t, name);
}

inline void check_x(const at::Tensor& x, const char* name, bool allow_double) {
  TORCH_CHECK(x.dim() >= 1, name, ": expected a tensor with at least 1 dim (the normalized dim last), got a "
              "0-dim tensor");
  TORCH_CHECK(is_norm_dtype(x.scalar_type(), allow_double), name, ": expected dtype float32, bfloat16 or float16",
              allow_double ? " (or float64)" : " (float64 is supported on CPU only)", ", got ", x.scalar_type());
  check_contiguous(x, name);
}

inline Rows check_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
                      bool allow_double) {
  check_x(x, "x", allow_double);
  if (residual.has_value() && residual->defined()) check_like_x(*residual, x, "residual", "x");
  check_affine(weight, x, "weight");
  check_affine(bias, x, "bias");
  check_affine_pair(weight, bias);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "eps: expected a finite number >= 0, got ", eps);
  return rows_of(x);
}

// A per-row statistic passed back to the backward: shape x.shape[:-1], the stat dtype, contiguous.
inline void check_stat(const at::Tensor& s, const at::Tensor& x, const char* name) {
  check_same_device(s, x, name, "saved");
  TORCH_CHECK(s.sizes() == at::IntArrayRef(stat_sizes(x)), name, ": expected sizes ", stat_sizes(x),
              " (saved.shape[:-1]), got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == stat_dtype(x), name, ": expected dtype ", stat_dtype(x), ", got ",
              s.scalar_type());
  check_contiguous(s, name);
}

inline Rows check_bwd(const at::Tensor& dy, const c10::optional<at::Tensor>& dh, const at::Tensor& saved,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& mean, const at::Tensor& rstd, bool saved_is_output,
                      bool layer_norm, bool allow_double) {
  check_x(saved, "saved", allow_double);
  check_like_x(dy, saved, "dy", "saved");
  if (dh.has_value() && dh->defined()) check_like_x(*dh, saved, "dh", "saved");
  check_affine(weight, saved, "weight");
  check_affine(bias, saved, "bias");
  check_affine_pair(weight, bias);
  check_stat(rstd, saved, "rstd");
  if (layer_norm && !saved_is_output) {
    TORCH_CHECK(mean.has_value() && mean->defined(),
                "mean: expected the per-row mean when saved is the input (saved_is_output=False), got None");
  }
  if (mean.has_value() && mean->defined()) check_stat(*mean, saved, "mean");
  return rows_of(saved);
}

inline at::Tensor empty_like_x(const at::Tensor& x) { return at::empty(x.sizes(), x.options()); }
inline at::Tensor empty_stat(const at::Tensor& x) {
  return at::empty(stat_sizes(x), x.options().dtype(stat_dtype(x)));
}
// The placeholder for an absent output (h without residual, dweight without weight).
inline at::Tensor empty_none(const at::Tensor& x) { return at::empty({0}, x.options()); }

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// dweight / dbias of a backward: like the parameter, zero when there are no rows (no kernel writes it then), the
// empty placeholder when the parameter is absent.
inline at::Tensor affine_grad_out(const c10::optional<at::Tensor>& p, const at::Tensor& like, int64_t M) {
  if (!present(p)) return empty_none(like);
  return M == 0 ? at::zeros(p->sizes(), p->options()) : at::empty(p->sizes(), p->options());
}

}  // namespace norm
}  // namespace pyperf
