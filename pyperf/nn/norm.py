"""FusedLayerNorm / FusedRMSNorm: drop-in replacements for torch.nn.LayerNorm / torch.nn.RMSNorm (same constructor
arguments, same parameters and state_dict keys), backed by pyperf's fused residual-add + norm kernels, plus
residual-add variants: forward(x, residual) -> (y, x + residual). docs/norm.md has the details."""
import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import nn

from pyperf import ops

_Shape = Union[int, Tuple[int, ...], torch.Size]


def _as_shape(normalized_shape):
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


def _check_save(save):
    if save not in ("input", "output"):
        raise ValueError('save: expected "input" or "output", got %r' % (save,))
    return save


class _FusedNorm(nn.Module):
    def _rows(self, x, residual):
        """x (and residual) viewed as rows of the flattened normalized dims, plus the shape to restore."""
        k = len(self.normalized_shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise RuntimeError("%s: expected input with shape [*, %s], got %s" % (
                type(self).__name__, ", ".join(map(str, self.normalized_shape)), list(x.shape)))
        if residual is not None and residual.shape != x.shape:
            raise RuntimeError("%s: residual must have the input's shape %s, got %s"
                               % (type(self).__name__, list(x.shape), list(residual.shape)))
        n = math.prod(self.normalized_shape)
        flat = x.shape[:x.dim() - k] + (n,)
        return x.reshape(flat), (residual.reshape(flat) if residual is not None else None), x.shape

    @staticmethod
    def _flat(p):
        return p.reshape(-1) if p is not None else None


class FusedRMSNorm(_FusedNorm):
    """torch.nn.RMSNorm with a fused kernel. forward(x) -> y; forward(x, residual) -> (y, x + residual).

    save="output" keeps the output instead of the input for backward (less memory when the next layer keeps the
    output anyway); it requires weight entries to be nonzero (a zero weight yields nan gradients).
    """

    def __init__(self, normalized_shape: _Shape, eps: Optional[float] = None, elementwise_affine: bool = True,
                 device=None, dtype=None, *, save: str = "input"):
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.save = _check_save(save)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        xr, rr, shape = self._rows(x, residual)
        eps = self.eps if self.eps is not None else ops.rms_norm_default_eps(x.dtype)
        y, h, _ = ops.add_rms_norm(xr, rr, self._flat(self.weight), eps, self.save)
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    def extra_repr(self):
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, save={save}".format(
            **self.__dict__)


class FusedLayerNorm(_FusedNorm):
    """torch.nn.LayerNorm with a fused kernel. forward(x) -> y; forward(x, residual) -> (y, x + residual).

    save="output": see FusedRMSNorm (weight entries must be nonzero)."""

    def __init__(self, normalized_shape: _Shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None, *, save: str = "input"):
        super().__init__()
        self.normalized_shape = _as_shape(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.save = _check_save(save)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            if bias:
                self.bias = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        xr, rr, shape = self._rows(x, residual)
        y, h, _, _ = ops.add_layer_norm(xr, rr, self._flat(self.weight), self._flat(self.bias), self.eps, self.save)
        if residual is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    def extra_repr(self):
        return "{normalized_shape}, eps={eps}, elementwise_affine={elementwise_affine}, save={save}".format(
            **self.__dict__)


def _is_torch_norm(m: nn.Module) -> bool:
    # Exact types only: a subclass may override forward (and model-specific norms such as LlamaRMSNorm are
    # different classes anyway), so swapping it could change the model.
    return type(m) in (nn.LayerNorm, nn.RMSNorm)


def _fused_from(m: nn.Module, save: str) -> nn.Module:
    if type(m) is nn.LayerNorm:
        new = FusedLayerNorm(m.normalized_shape, m.eps, m.elementwise_affine, bias=m.bias is not None,
                             device="meta", save=save)
        new.weight, new.bias = m.weight, m.bias
    else:
        new = FusedRMSNorm(m.normalized_shape, m.eps, m.elementwise_affine, device="meta", save=save)
        new.weight = m.weight
    new.train(m.training)
    return new


def replace_norms(model: nn.Module, save: str = "input") -> nn.Module:
    """Swaps every torch.nn.LayerNorm and torch.nn.RMSNorm in `model` (in place) for FusedLayerNorm /
    FusedRMSNorm and returns the model. The new modules take over the same Parameter objects, so an optimizer
    built before the swap keeps working and the state_dict is unchanged. A model that is itself a norm is
    returned replaced. Only exact torch.nn.LayerNorm / RMSNorm instances are swapped (not subclasses, not
    model-specific classes such as transformers' LlamaRMSNorm)."""
    _check_save(save)
    if _is_torch_norm(model):
        return _fused_from(model, save)
    for name, child in list(model.named_children()):
        if _is_torch_norm(child):
            setattr(model, name, _fused_from(child, save))
        else:
            replace_norms(child, save)
    return model
