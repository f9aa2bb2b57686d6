// Helpers of the C++ autograd kernels (csrc/autograd/X.cpp). The fused ops' autograd lives in C++ rather than in
// Python (torch.library.register_autograd or an autograd.Function) because the Python layer costs 5-15 us of host
// time per call, more than a whole small-shape kernel on a GPU: with it, small layers are slower than torch eager,
// whose own autograd is C++.
#pragma once
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>

#include <optional>
#include <utility>

namespace pyperf {
namespace autograd {

// Every Function here sets is_traceable: its backward reads only what torch::autograd::Function hands to compiled
// autograd (ctx->saved_data, the saved variables, needs_input_grad, materialize_grads) and calls ops through the
// dispatcher, so torch.compile's compiled autograd can trace it into its graph instead of calling it opaquely
// (a graph break, and an error under fullgraph=True).

// The op through the dispatcher (so dispatch modes, fake tensors and functionalization see it), looked up once.
template <class Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// PYPERF_TYPED_OP(fn, Sig, "pyperf::op") defines fn(): the op's handle, looked up on first use.
#define PYPERF_TYPED_OP(fn, Sig, name)                              \
  const c10::TypedOperatorHandle<Sig>& fn() {                       \
    static const auto op = ::pyperf::autograd::typed_op<Sig>(name); \
    return op;                                                      \
  }

// The op's backend kernel, below autograd: the Functions' forwards, and calls that need no graph node.
template <class Sig, class... Args>
auto call_below(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  at::AutoDispatchBelowADInplaceOrView below;
  return op.call(std::forward<Args>(args)...);
}

inline bool requires_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
inline bool requires_grad(const std::optional<at::Tensor>& t) { return t.has_value() && requires_grad(*t); }

// Whether a call must record a graph node. When not (no_grad, inference, frozen inputs) the kernels skip the
// autograd Function altogether and go straight to the backend, as aten's generated autograd kernels do.
template <class... Ts>
bool any_requires_grad(const Ts&... ts) {
  return c10::GradMode::is_enabled() && (requires_grad(ts) || ...);
}

// Scope of a *_backward op call. Those ops have no autograd kernel: through the dispatcher they would pass torch's
// boxed autograd fallback (a few us on the host). Outside double backward (grad mode off) they go straight to the
// backend kernel; with create_graph=True they take the fallback as before, which warns that they are not
// differentiable rather than silently returning a detached gradient.
class BackwardOpScope {
 public:
  BackwardOpScope() {
    if (!c10::GradMode::is_enabled()) below_.emplace();
  }

 private:
  std::optional<at::AutoDispatchBelowADInplaceOrView> below_;
};

inline at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
inline std::optional<at::Tensor> or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

}  // namespace autograd
}  // namespace pyperf
