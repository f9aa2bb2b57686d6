"""Typed wrappers over torch.ops.pyperf.*, with a fake (meta) kernel for every op and autograd where an op is
differentiable. The schemas live in csrc/pyperf.cpp; the plain-torch oracle of each op in pyperf/_reference.py.

Sections follow the features (pack, quant, norm, activation), in the same order as csrc/pyperf.cpp.
"""
from typing import List, Optional, Sequence, Tuple  # noqa: F401

import torch

_lib = torch.ops.pyperf

# ---- pack ----------------------------------------------------------------------------------------------------


# ---- quant ---------------------------------------------------------------------------------------------------


# ---- norm ----------------------------------------------------------------------------------------------------


# ---- activation ----------------------------------------------------------------------------------------------

# Fused elementwise layers that save as little as possible for backward: bias+GeLU and SwiGLU/GeGLU save their
# inputs only (backward recomputes the activation), bias+dropout+residual saves only (p, seed, offset): its mask is
# regenerated from Philox, never stored. Math in float32 (float64 for float64 inputs, CPU gradcheck).

_GELU_APPROX = ("tanh", "none")


def _as_int64(v, name):
    """seed/offset are 64-bit patterns; accept Python ints in [-2^63, 2^64) and pass them as int64."""
    v = int(v)
    if not -(1 << 63) <= v < (1 << 64):
        raise ValueError("%s: expected a 64-bit integer, got %d" % (name, v))
    return v - (1 << 64) if v >= (1 << 63) else v


def _fake_bias_grad(x, bias, bias_grad):
    return x.new_empty(bias.shape) if bias_grad else x.new_empty(0)


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fast_function(name, op, setup_context, backward):
    """An autograd.Function running the same setup_context/backward as the op's register_autograd formula.
    The wrappers below use it when a gradient is needed: torch's generic autograd kernel for custom ops re-reads
    the op schema on every call (tens of microseconds, growing with the argument count), which would make small
    shapes slower than eager. Calls through torch.ops.pyperf.* go through register_autograd and give the same
    gradients."""
    def forward(ctx, *args):
        out = op(*args)
        setup_context(ctx, args, out)
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(bwd)})


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor] = None, approximate: str = "tanh") -> torch.Tensor:
    """gelu(x + bias), bias over the last dim (or None); approximate "tanh" or "none" as in F.gelu.
    Saves x and bias for backward (not x + bias, not the output)."""
    if _needs_grad(x, bias):
        return _BiasGeLUFn.apply(x, bias, approximate)
    return _lib.bias_gelu.default(x, bias, approximate)


@torch.library.register_fake("pyperf::bias_gelu")
def _bias_gelu_fake(x, bias, approximate):
    torch._check(bias is None or (bias.dim() == 1 and bias.shape[0] == x.shape[-1]),
                 lambda: "bias: expected shape [%s]" % x.shape[-1])
    return x.new_empty(x.shape)


@torch.library.register_fake("pyperf::bias_gelu_backward")
def _bias_gelu_backward_fake(grad, x, bias, approximate, bias_grad):
    return x.new_empty(x.shape), _fake_bias_grad(x, bias, bias_grad)


def _bias_gelu_setup(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _bias_gelu_bwd(ctx, grad):
    x, bias = ctx.saved_tensors
    need_bias = bias is not None and ctx.needs_input_grad[1]
    gx, gb = _lib.bias_gelu_backward(grad, x, bias, ctx.approximate, need_bias)
    return gx, (gb if need_bias else None), None


torch.library.register_autograd("pyperf::bias_gelu", _bias_gelu_bwd, setup_context=_bias_gelu_setup)
_BiasGeLUFn = _fast_function("_BiasGeLUFn", _lib.bias_gelu.default, _bias_gelu_setup, _bias_gelu_bwd)


def bias_dropout_residual(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, p: float,
                          seed: int, offset: int = 0, training: bool = True) -> torch.Tensor:
    """residual + dropout(x + bias, p). The mask is Philox(seed, offset) at each element's flat index: the same
    (seed, offset) gives the same mask on CPU and CUDA, in forward, backward and any recompute, and the global RNG
    is never touched. Kept elements are scaled by 1/(1-p); p == 0 or training=False is exactly residual + x + bias;
    p == 1 drops everything. Saves nothing but (p, seed, offset) for backward."""
    if not training:
        p = 0.0
    args = (x, bias, residual, float(p), _as_int64(seed, "seed"), _as_int64(offset, "offset"))
    if _needs_grad(x, bias, residual):
        return _BiasDropoutResidualFn.apply(*args)
    return _lib.bias_dropout_residual.default(*args)


@torch.library.register_fake("pyperf::bias_dropout_residual")
def _bias_dropout_residual_fake(x, bias, residual, p, seed, offset):
    torch._check(residual.shape == x.shape, lambda: "residual: expected shape %s like x" % (tuple(x.shape),))
    return x.new_empty(x.shape)


@torch.library.register_fake("pyperf::bias_dropout_residual_backward")
def _bias_dropout_residual_backward_fake(grad, p, seed, offset, bias_grad):
    return grad.new_empty(grad.shape), (grad.new_empty(grad.shape[-1:]) if bias_grad else grad.new_empty(0))


def _bdr_setup(ctx, inputs, output):
    x, bias, residual, p, seed, offset = inputs
    ctx.has_bias = bias is not None
    ctx.p, ctx.seed, ctx.offset = p, seed, offset


def _bdr_bwd(ctx, grad):
    need_bias = ctx.has_bias and ctx.needs_input_grad[1]
    gx, gb = _lib.bias_dropout_residual_backward(grad, ctx.p, ctx.seed, ctx.offset, need_bias)
    return gx, (gb if need_bias else None), grad, None, None, None


torch.library.register_autograd("pyperf::bias_dropout_residual", _bdr_bwd, setup_context=_bdr_setup)
_BiasDropoutResidualFn = _fast_function("_BiasDropoutResidualFn", _lib.bias_dropout_residual.default, _bdr_setup,
                                        _bdr_bwd)


def gated_act(a: torch.Tensor, b: Optional[torch.Tensor] = None, activation: str = "silu") -> torch.Tensor:
    """act(a) * b with activation "silu" | "gelu" | "gelu_tanh". b None: a is split in half on the last dim
    (a[..., :h] is gated, a[..., h:] is the linear half). Saves the inputs only."""
    if _needs_grad(a, b):
        return _GatedActFn.apply(a, b, activation)
    return _lib.gated_act.default(a, b, activation)


def swiglu(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """silu(a) * b; swiglu(x) splits x in half on the last dim."""
    return gated_act(a, b, "silu")


def geglu(a: torch.Tensor, b: Optional[torch.Tensor] = None, approximate: str = "tanh") -> torch.Tensor:
    """gelu(a) * b (approximate "tanh" or "none"); geglu(x) splits x in half on the last dim."""
    if approximate not in _GELU_APPROX:
        raise ValueError('approximate: expected "tanh" or "none", got %r' % (approximate,))
    return gated_act(a, b, "gelu_tanh" if approximate == "tanh" else "gelu")


def _gated_out_shape(a, b):
    if b is None:
        torch._check(a.dim() >= 1 and a.shape[-1] % 2 == 0, lambda: "a: expected an even last dim to split")
        return (*a.shape[:-1], a.shape[-1] // 2)
    torch._check(b.shape == a.shape, lambda: "b: expected shape %s like a" % (tuple(a.shape),))
    return tuple(a.shape)


@torch.library.register_fake("pyperf::gated_act")
def _gated_act_fake(a, b, activation):
    return a.new_empty(_gated_out_shape(a, b))


@torch.library.register_fake("pyperf::gated_act_backward")
def _gated_act_backward_fake(grad, a, b, activation):
    return a.new_empty(a.shape), (a.new_empty(0) if b is None else a.new_empty(a.shape))


def _gated_setup(ctx, inputs, output):
    a, b, activation = inputs
    ctx.save_for_backward(a, b)
    ctx.activation = activation


def _gated_bwd(ctx, grad):
    a, b = ctx.saved_tensors
    ga, gb = _lib.gated_act_backward(grad, a, b, ctx.activation)
    return ga, (gb if b is not None else None), None


torch.library.register_autograd("pyperf::gated_act", _gated_bwd, setup_context=_gated_setup)
_GatedActFn = _fast_function("_GatedActFn", _lib.gated_act.default, _gated_setup, _gated_bwd)
