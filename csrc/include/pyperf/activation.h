// Argument parsing and validation shared by the CPU (csrc/cpu/activation.cpp) and CUDA (csrc/cuda/activation.cu)
// kernels of the fused activations, so both backends accept and reject exactly the same inputs.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <vector>

#include "pyperf/checks.h"

namespace pyperf {

enum class GeluApprox : int { None = 0, Tanh = 1 };
// The activation of a gated linear unit: silu(a) * b (SwiGLU), gelu(a) * b (GeGLU, erf or tanh form).
enum class GatedAct : int { Silu = 0, Gelu = 1, GeluTanh = 2 };

inline GeluApprox parse_gelu_approx(c10::string_view s) {
  if (s == "tanh") return GeluApprox::Tanh;
  if (s == "none") return GeluApprox::None;
  TORCH_CHECK(false, "approximate: expected \"tanh\" or \"none\" (like torch.nn.functional.gelu), got \"",
              std::string(s), "\"");
}

inline GatedAct parse_gated_act(c10::string_view s) {
  if (s == "silu") return GatedAct::Silu;
  if (s == "gelu") return GatedAct::Gelu;
  if (s == "gelu_tanh") return GatedAct::GeluTanh;
  TORCH_CHECK(false, "activation: expected \"silu\", \"gelu\" or \"gelu_tanh\", got \"", std::string(s), "\"");
}

// x is any shape [..., hidden]; hidden is its last dim (1 for a 0-dim tensor).
inline int64_t last_dim(const at::Tensor& x) { return x.dim() == 0 ? 1 : x.size(-1); }

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(), " like ",
              ref_name, ", got ", t.scalar_type());
  check_same_device(t, ref, name, ref_name);
}

inline void check_same_shape(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, ": expected shape ", ref.sizes(), " like ", ref_name, ", got ",
              t.sizes());
}

inline void check_float_or_double(const at::Tensor& t, const char* name) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()) || t.scalar_type() == c10::kDouble, name,
              ": expected dtype float32, bfloat16, float16 (or float64), got ", t.scalar_type());
}

// bias, when given, is a vector over the last dim of x with x's dtype and device.
inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& x, const char* x_name) {
  if (!bias.has_value() || !bias->defined()) return;
  check_like(*bias, x, "bias", x_name);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == last_dim(x), "bias: expected shape [", last_dim(x),
              "] (the last dim of ", x_name, "), got ", bias->sizes());
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "p: expected a dropout probability in [0, 1], got ", p);
}

// The keep test and the scale shared by every dropout kernel: element i is kept iff its Philox uniform u_i
// (philox_uniform(seed, offset, i), i the flat index into x) satisfies u_i >= p in float32, and kept elements are
// scaled by 1/(1-p). p == 1 drops everything (scale 0 so no inf*0).
struct DropoutParams {
  float p;
  float scale;
  uint64_t seed;
  uint64_t offset;
};

inline DropoutParams make_dropout_params(double p, int64_t seed, int64_t offset) {
  check_dropout_p(p);
  DropoutParams d;
  d.p = static_cast<float>(p);
  d.scale = p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f;
  d.seed = static_cast<uint64_t>(seed);
  d.offset = static_cast<uint64_t>(offset);
  return d;
}

// The two operands of a gated unit: a and b given separately (same shape), or one x split in half on the last
// dim (a = x[..., :h], b = x[..., h:]). Both live in rows of `hidden` elements at row strides a_stride/b_stride.
struct GatedShape {
  int64_t rows, hidden, in_stride;  // in_stride: row stride of a and b (hidden, or 2*hidden when split)
  bool split;
};

inline GatedShape check_gated(const at::Tensor& a, const std::optional<at::Tensor>& b) {
  check_float_or_double(a, "a");
  GatedShape g;
  g.split = !has(b);
  if (g.split) {
    TORCH_CHECK(a.dim() >= 1, "a: expected at least 1 dim (the last one is split in half), got a 0-dim tensor");
    TORCH_CHECK(a.size(-1) % 2 == 0, "a: expected an even last dim to split into a and b halves, got shape ",
                a.sizes());
    g.hidden = a.size(-1) / 2;
    g.in_stride = 2 * g.hidden;
  } else {
    check_like(*b, a, "b", "a");
    check_same_shape(*b, a, "b", "a");
    g.hidden = last_dim(a);
    g.in_stride = g.hidden;
  }
  g.rows = g.hidden == 0 ? 0 : a.numel() / (g.in_stride == 0 ? 1 : g.in_stride);
  return g;
}

// The output shape of a gated unit: a's shape, with the last dim halved when a holds both halves.
inline std::vector<int64_t> gated_out_shape(const at::Tensor& a, const GatedShape& s) {
  std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end());
  if (s.split) shape.back() = s.hidden;
  return shape;
}

// ---- the argument checks of each op, called by its CPU and CUDA kernels --------------------------------------

inline void check_bias_gelu(const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_float_or_double(x, "x");
  check_bias(bias, x, "x");
}

inline void check_bias_gelu_backward(const at::Tensor& grad, const at::Tensor& x,
                                     const std::optional<at::Tensor>& bias, bool bias_grad) {
  check_float_or_double(x, "x");
  check_like(grad, x, "grad", "x");
  check_same_shape(grad, x, "grad", "x");
  check_bias(bias, x, "x");
  TORCH_CHECK(!bias_grad || has(bias), "bias_grad: True needs a bias, got bias=None");
}

inline void check_bias_dropout_residual(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                                        const at::Tensor& residual) {
  check_float_or_double(x, "x");
  check_bias(bias, x, "x");
  check_like(residual, x, "residual", "x");
  check_same_shape(residual, x, "residual", "x");
}

inline void check_bias_dropout_residual_backward(const at::Tensor& grad) { check_float_or_double(grad, "grad"); }

// grad has the output's shape (gated_out_shape) and a's dtype and device.
inline GatedShape check_gated_backward(const at::Tensor& grad, const at::Tensor& a,
                                       const std::optional<at::Tensor>& b) {
  const GatedShape s = check_gated(a, b);
  check_like(grad, a, "grad", "a");
  const auto out_shape = gated_out_shape(a, s);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_shape), "grad: expected shape ", at::IntArrayRef(out_shape),
              " (the output's), got ", grad.sizes());
  return s;
}

}  // namespace pyperf
