// Autograd of the norm ops (add_rms_norm, add_layer_norm), registered at the Autograd key so every backend uses
// it. Forward runs the backend kernel below autograd; backward calls add_*_norm_backward through the dispatcher.
// Backward keeps either the input stream h (x when there is no residual) or, with save_output, the output y.
#include <ATen/core/Tensor.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

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

using RmsSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, const Opt&, double,
                                                                bool);
using LnSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, const Opt&,
                                                                           const Opt&, double, bool);
using RmsBwdSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, const at::Tensor&, const Opt&,
                                                     const at::Tensor&, bool);
using LnBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const Opt&, const at::Tensor&,
                                                                const Opt&, const Opt&, const Opt&, const at::Tensor&,
                                                                bool);

PYPERF_TYPED_OP(rms_op, RmsSig, PYPERF_OP("add_rms_norm"))
PYPERF_TYPED_OP(ln_op, LnSig, PYPERF_OP("add_layer_norm"))
PYPERF_TYPED_OP(rms_bwd_op, RmsBwdSig, PYPERF_OP("add_rms_norm_backward"))
PYPERF_TYPED_OP(ln_bwd_op, LnBwdSig, PYPERF_OP("add_layer_norm_backward"))

// What backward keeps of the forward: y with save_output, else h (x itself when there is no residual).
at::Tensor saved_stream(const at::Tensor& x, bool has_residual, const at::Tensor& y, const at::Tensor& h,
                        bool save_output) {
  if (save_output) return y;
  return has_residual ? h : x;
}

void remember_flags(AutogradContext* ctx, bool has_residual, bool save_output) {
  // An unused y or h output then arrives as an undefined tensor instead of a materialized M x N zero tensor.
  ctx->set_materialize_grads(false);
  ctx->saved_data["has_residual"] = has_residual;
  ctx->saved_data["save_output"] = save_output;
}

// (dy, dh) as the backward kernels take them: dy contiguous (zeros when only h was used), dh only with a residual.
std::pair<at::Tensor, Opt> incoming(const variable_list& grads, const at::Tensor& saved, bool has_residual) {
  at::Tensor dy = grads[0].defined() ? grads[0].contiguous() : at::zeros_like(saved);
  Opt dh = (has_residual && grads[1].defined()) ? Opt(grads[1].contiguous()) : std::nullopt;
  return {dy, dh};
}

}  // namespace

// Named outside the anonymous namespace: the graph node shows this name (grad_fn.name(), profiler, anomaly
// mode), like aten's *Backward nodes.
namespace autograd {

struct AddRmsNormBackward : torch::autograd::Function<AddRmsNormBackward> {
  static constexpr bool is_traceable = true;  // compiled autograd traces backward (see autograd.h)

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const Opt& residual, const Opt& weight,
                               double eps, bool save_output) {
    auto [y, h, rstd] = autograd::call_below(rms_op(), x, residual, weight, eps, save_output);
    const bool has_residual = residual.has_value() && residual->defined();
    remember_flags(ctx, has_residual, save_output);
    ctx->save_for_backward({saved_stream(x, has_residual, y, h, save_output), or_undefined(weight), rstd});
    return {y, h, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &saved = s[0], &weight = s[1], &rstd = s[2];
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    auto [dy, dh] = incoming(grads, saved, has_residual);
    autograd::BackwardOpScope scope;
    auto [dx, dw] = rms_bwd_op().call(dy, dh, saved, or_none(weight), rstd, ctx->saved_data["save_output"].toBool());
    return {dx, has_residual ? dx : at::Tensor(), weight.defined() ? dw : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct AddLayerNormBackward : torch::autograd::Function<AddLayerNormBackward> {
  static constexpr bool is_traceable = true;  // compiled autograd traces backward (see autograd.h)

  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const Opt& residual, const Opt& weight,
                               const Opt& bias, double eps, bool save_output) {
    auto [y, h, mean, rstd] = autograd::call_below(ln_op(), x, residual, weight, bias, eps, save_output);
    const bool has_residual = residual.has_value() && residual->defined();
    remember_flags(ctx, has_residual, save_output);
    // With save_output the mean is not needed: xhat comes from y.
    ctx->save_for_backward({saved_stream(x, has_residual, y, h, save_output), or_undefined(weight),
                            or_undefined(bias), save_output ? at::Tensor() : mean, rstd});
    return {y, h, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &saved = s[0], &weight = s[1], &bias = s[2], &mean = s[3], &rstd = s[4];
    const bool has_residual = ctx->saved_data["has_residual"].toBool();
    auto [dy, dh] = incoming(grads, saved, has_residual);
    autograd::BackwardOpScope scope;
    auto [dx, dw, db] = ln_bwd_op().call(dy, dh, saved, or_none(weight), or_none(bias), or_none(mean), rstd,
                                         ctx->saved_data["save_output"].toBool());
    return {dx, has_residual ? dx : at::Tensor(), weight.defined() ? dw : at::Tensor(),
            bias.defined() ? db : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace autograd

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_rms_norm_autograd(const at::Tensor& x, const Opt& residual,
                                                                     const Opt& weight, double eps,
                                                                     bool save_output) {
  if (!autograd::any_requires_grad(x, residual, weight)) {
    return autograd::call_below(rms_op(), x, residual, weight, eps, save_output);
  }
  variable_list out = autograd::AddRmsNormBackward::apply(x, residual, weight, eps, save_output);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> add_layer_norm_autograd(const at::Tensor& x,
                                                                                   const Opt& residual,
                                                                                   const Opt& weight, const Opt& bias,
                                                                                   double eps, bool save_output) {
  if (!autograd::any_requires_grad(x, residual, weight, bias)) {
    return autograd::call_below(ln_op(), x, residual, weight, bias, eps, save_output);
  }
  variable_list out = autograd::AddLayerNormBackward::apply(x, residual, weight, bias, eps, save_output);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

PYPERF_LIBRARY_IMPL(Autograd, m) {
  m.impl("add_rms_norm", &add_rms_norm_autograd);
  m.impl("add_layer_norm", &add_layer_norm_autograd);
}

}  // namespace pyperf
