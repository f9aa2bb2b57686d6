"""Fused activation layers: bias + GeLU, bias + dropout + residual-add, SwiGLU / GeGLU (activation and MLP).

Design: the activation modules hold only what the fused op needs (a bias vector, p), so they slot in after a
bias-free nn.Linear (Megatron style: Linear(bias=False) -> BiasGeLU). SwiGLU/GeGLU are parameter-free
activations (forward(x) splits x in half on the last dim, forward(a, b) takes two tensors); SwiGLUMLP/GeGLUMLP
are the full gated MLP: one fused gate+up projection, the gated activation, the down projection.
Parameters are kept in the module's dtype; under autocast the (small) bias is cast to the activation's dtype.
"""
from typing import Optional, Tuple

import torch
from torch import nn

from pyperf import ops

__all__ = ["BiasGeLU", "BiasDropoutResidual", "SwiGLU", "GeGLU", "SwiGLUMLP", "GeGLUMLP", "draw_seed_offset"]


def _bias_for(bias: Optional[torch.Tensor], x: torch.Tensor) -> Optional[torch.Tensor]:
    return None if bias is None else bias.to(x.dtype)


def draw_seed_offset(generator: Optional[torch.Generator] = None) -> Tuple[int, int]:
    """A fresh (seed, offset) from a CPU generator (torch's default one unless given). Drawing on the CPU never
    syncs a GPU, and torch.utils.checkpoint restores the CPU RNG state before it recomputes, so a recomputed
    forward draws the same pair and reproduces the same mask."""
    s = torch.empty(2, dtype=torch.int64).random_(generator=generator).tolist()
    return int(s[0]), int(s[1])


class BiasGeLU(nn.Module):
    """y = gelu(x + bias) over the last dim (hidden), approximate "tanh" (default) or "none" (erf, F.gelu's
    default). bias=False gives a plain GeLU. Saves only x (and the bias) for backward."""

    def __init__(self, hidden: int, approximate: str = "tanh", bias: bool = True, device=None, dtype=None):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError('approximate: expected "tanh" or "none", got %r' % (approximate,))
        self.hidden = hidden
        self.approximate = approximate
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.bias_gelu(x, _bias_for(self.bias, x), self.approximate)

    def extra_repr(self):
        return "hidden=%d, approximate=%r, bias=%s" % (self.hidden, self.approximate, self.bias is not None)


class BiasDropoutResidual(nn.Module):
    """y = residual + dropout(x + bias, p): forward(x, residual).

    The dropout mask is never stored: each training call draws a (seed, offset) (draw_seed_offset, from
    `generator` or torch's default CPU generator) and the kernels regenerate the mask from Philox in forward and
    backward. Pass seed= (and offset=) to forward to choose them yourself: then the global RNG is not touched at
    all. The pair used by the last call is in `last_seed_offset`. In eval mode, or with p == 0, y is exactly
    residual + x + bias."""

    def __init__(self, hidden: int, p: float = 0.1, bias: bool = True, generator: Optional[torch.Generator] = None,
                 device=None, dtype=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError("p: expected a dropout probability in [0, 1], got %r" % (p,))
        self.hidden = hidden
        self.p = float(p)
        self.generator = generator
        self.last_seed_offset: Optional[Tuple[int, int]] = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(hidden, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, seed: Optional[int] = None,
                offset: Optional[int] = None) -> torch.Tensor:
        bias = _bias_for(self.bias, x)
        if not self.training or self.p == 0.0:
            return ops.bias_dropout_residual(x, bias, residual, 0.0, 0, 0)
        if seed is None:
            seed, drawn_offset = draw_seed_offset(self.generator)
            offset = drawn_offset if offset is None else offset
        offset = 0 if offset is None else offset
        self.last_seed_offset = (seed, offset)
        return ops.bias_dropout_residual(x, bias, residual, self.p, seed, offset)

    def extra_repr(self):
        return "hidden=%d, p=%g, bias=%s" % (self.hidden, self.p, self.bias is not None)


class SwiGLU(nn.Module):
    """silu(a) * b, parameter-free: forward(x) splits x in half on the last dim (first half gated), forward(a, b)
    takes the two halves as separate tensors. Saves only its inputs for backward."""

    def forward(self, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.swiglu(a, b)


class GeGLU(nn.Module):
    """gelu(a) * b (approximate "tanh" default, or "none"), parameter-free; same calling forms as SwiGLU."""

    def __init__(self, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError('approximate: expected "tanh" or "none", got %r' % (approximate,))
        self.approximate = approximate

    def forward(self, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.geglu(a, b, self.approximate)

    def extra_repr(self):
        return "approximate=%r" % (self.approximate,)


class _GatedMLP(nn.Module):
    def __init__(self, in_features, hidden_features, out_features=None, bias=False, device=None, dtype=None):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        # gate_up.weight = cat([W_gate, W_up]): rows [0, hidden) feed the activation, [hidden, 2*hidden) the
        # linear half (LLaMA's w1 and w3); down is LLaMA's w2.
        self.gate_up = nn.Linear(in_features, 2 * hidden_features, bias=bias, device=device, dtype=dtype)
        self.down = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self._act(self.gate_up(x)))


class SwiGLUMLP(_GatedMLP):
    """down(silu(x W_gate^T) * (x W_up^T)): the LLaMA feed-forward block with a fused gate+up projection.
    out_features defaults to in_features."""

    def _act(self, h):
        return ops.swiglu(h)


class GeGLUMLP(_GatedMLP):
    """down(gelu(x W_gate^T) * (x W_up^T)) with a fused gate+up projection; approximate "tanh" or "none"."""

    def __init__(self, in_features, hidden_features, out_features=None, bias=False, approximate="tanh",
                 device=None, dtype=None):
        super().__init__(in_features, hidden_features, out_features, bias, device, dtype)
        if approximate not in ("tanh", "none"):
            raise ValueError('approximate: expected "tanh" or "none", got %r' % (approximate,))
        self.approximate = approximate

    def _act(self, h):
        return ops.geglu(h, None, self.approximate)
