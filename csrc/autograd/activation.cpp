// Autograd of the fused activations (bias_gelu, bias_dropout_residual, gated_act), registered at the Autograd key
// so every backend uses it. Forward runs the backend kernel below autograd; backward calls the *_backward ops
// through the dispatcher. bias_gelu and gated_act keep their inputs only (backward recomputes the activation);
// bias_dropout_residual keeps (p, seed, offset) only and its backward regenerates the Philox mask.
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/SymInt.h>
#include <c10/util/string_view.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "pyperf/autograd.h"
#include "pyperf/library.h"

namespace pyperf {
namespace {

using autograd::or_none;
using autograd::or_undefined;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = std::optional<at::Tensor>;
using Grads = std::tuple<at::Tensor, at::Tensor>;

using GeluSig = at::Tensor(const at::Tensor&, const Opt&, c10::string_view);
using GeluBwdSig = Grads(const at::Tensor&, const at::Tensor&, const Opt&, c10::string_view, bool);
using BdrSig = at::Tensor(const at::Tensor&, const Opt&, const at::Tensor&, double, c10::SymInt, c10::SymInt);
using BdrBwdSig = Grads(const at::Tensor&, double, c10::SymInt, c10::SymInt, bool);
using GatedSig = at::Tensor(const at::Tensor&, const Opt&, c10::string_view);
using GatedBwdSig = Grads(const at::Tensor&, const at::Tensor&, const Opt&, c10::string_view);

PYPERF_TYPED_OP(gelu_op, GeluSig, PYPERF_OP("bias_gelu"))
PYPERF_TYPED_OP(gelu_bwd_op, GeluBwdSig, PYPERF_OP("bias_gelu_backward"))
PYPERF_TYPED_OP(bdr_op, BdrSig, PYPERF_OP("bias_dropout_residual"))
PYPERF_TYPED_OP(bdr_bwd_op, BdrBwdSig, PYPERF_OP("bias_dropout_residual_backward"))
PYPERF_TYPED_OP(gated_op, GatedSig, PYPERF_OP("gated_act"))
PYPERF_TYPED_OP(gated_bwd_op, GatedBwdSig, PYPERF_OP("gated_act_backward"))

// In bias_gelu and bias_dropout_residual the bias, when given, is the second tensor input: graph edge 1
// (needs_input_grad counts the tensors passed, not the argument positions).
constexpr size_t kBiasEdge = 1;

}  // namespace

// Named outside the anonymous namespace: the graph node shows this name (grad_fn.name(), profiler, anomaly
// mode), like aten's *Backward nodes.
namespace autograd {

struct BiasGeluBackward : torch::autograd::Function<BiasGeluBackward> {
  static constexpr bool is_traceable = true;  // compiled autograd traces backward (see autograd.h)

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Opt& bias, c10::string_view approximate) {
    at::Tensor y = autograd::call_below(gelu_op(), x, bias, approximate);
    ctx->save_for_backward({x, or_undefined(bias)});
    ctx->saved_data["approximate"] = std::string(approximate);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &bias = s[1];
    // Skipping the bias-gradient reduction when the bias is frozen.
    const bool need_bias = bias.defined() && ctx->needs_input_grad(kBiasEdge);
    autograd::BackwardOpScope scope;
    auto [gx, gb] = gelu_bwd_op().call(grads[0], x, or_none(bias), ctx->saved_data["approximate"].toStringRef(),
                                       need_bias);
    return {gx, need_bias ? gb : at::Tensor(), at::Tensor()};
  }
};

struct BiasDropoutResidualBackward : torch::autograd::Function<BiasDropoutResidualBackward> {
  static constexpr bool is_traceable = true;  // compiled autograd traces backward (see autograd.h)

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Opt& bias, const at::Tensor& residual,
                            double p, c10::SymInt seed, c10::SymInt offset) {
    at::Tensor y = autograd::call_below(bdr_op(), x, bias, residual, p, seed, offset);
    // No tensor is saved: the mask comes back from Philox(seed, offset).
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = std::move(seed);
    ctx->saved_data["offset"] = std::move(offset);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const bool need_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(kBiasEdge);
    const at::Tensor& grad = grads[0];
    autograd::BackwardOpScope scope;
    auto [gx, gb] = bdr_bwd_op().call(grad, ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toSymInt(),
                                      ctx->saved_data["offset"].toSymInt(), need_bias);
    return {gx, need_bias ? gb : at::Tensor(), grad, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct GatedActBackward : torch::autograd::Function<GatedActBackward> {
  static constexpr bool is_traceable = true;  // compiled autograd traces backward (see autograd.h)

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const Opt& b, c10::string_view activation) {
    at::Tensor y = autograd::call_below(gated_op(), a, b, activation);
    ctx->save_for_backward({a, or_undefined(b)});
    ctx->saved_data["activation"] = std::string(activation);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &a = s[0], &b = s[1];
    autograd::BackwardOpScope scope;
    auto [ga, gb] = gated_bwd_op().call(grads[0], a, or_none(b), ctx->saved_data["activation"].toStringRef());
    return {ga, b.defined() ? gb : at::Tensor(), at::Tensor()};
  }
};

}  // namespace autograd

namespace {

at::Tensor bias_gelu_autograd(const at::Tensor& x, const Opt& bias, c10::string_view approximate) {
  if (!autograd::any_requires_grad(x, bias)) {
    return autograd::call_below(gelu_op(), x, bias, approximate);
  }
  return autograd::BiasGeluBackward::apply(x, bias, approximate);
}

at::Tensor bias_dropout_residual_autograd(const at::Tensor& x, const Opt& bias, const at::Tensor& residual, double p,
                                          c10::SymInt seed, c10::SymInt offset) {
  if (!autograd::any_requires_grad(x, bias, residual)) {
    return autograd::call_below(bdr_op(), x, bias, residual, p, std::move(seed), std::move(offset));
  }
  return autograd::BiasDropoutResidualBackward::apply(x, bias, residual, p, std::move(seed), std::move(offset));
}

at::Tensor gated_act_autograd(const at::Tensor& a, const Opt& b, c10::string_view activation) {
  if (!autograd::any_requires_grad(a, b)) {
    return autograd::call_below(gated_op(), a, b, activation);
  }
  return autograd::GatedActBackward::apply(a, b, activation);
}

}  // namespace

PYPERF_LIBRARY_IMPL(Autograd, m) {
  m.impl("bias_gelu", &bias_gelu_autograd);
  m.impl("bias_dropout_residual", &bias_dropout_residual_autograd);
  m.impl("gated_act", &gated_act_autograd);
}

}  // namespace pyperf
