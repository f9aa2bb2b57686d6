"""Plain-torch reference of every pyperf op: the oracle for the tests and the eager baseline of the benchmarks.
Written for clarity, not speed; each function mirrors the op of the same name in pyperf/ops.py."""
import math  # noqa: F401

import torch  # noqa: F401

# ---- pack ----------------------------------------------------------------------------------------------------


# ---- quant ---------------------------------------------------------------------------------------------------


# ---- norm ----------------------------------------------------------------------------------------------------


def _norm_acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def add_rms_norm(x, residual=None, weight=None, eps=1e-6, save_output=False):
    h = x + residual if residual is not None else x
    hf = h.to(_norm_acc(x))
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    y = hf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    return y.to(x.dtype), (h if residual is not None else x.new_empty(0)), rstd


def add_layer_norm(x, residual=None, weight=None, bias=None, eps=1e-5, save_output=False):
    h = x + residual if residual is not None else x
    hf = h.to(_norm_acc(x))
    mean = hf.mean(-1)
    var = (hf - mean.unsqueeze(-1)).pow(2).mean(-1)
    rstd = torch.rsqrt(var + eps)
    y = (hf - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(hf.dtype)
    if bias is not None:
        y = y + bias.to(hf.dtype)
    return y.to(x.dtype), (h if residual is not None else x.new_empty(0)), mean, rstd


def _norm_backward(dy, dh, saved, weight, bias, mean, rstd, saved_is_output, layer_norm):
    acc = _norm_acc(saved)
    s = saved.to(acc)
    if saved_is_output:
        xhat = s - bias.to(acc) if (layer_norm and bias is not None) else s
        xhat = xhat / weight.to(acc) if weight is not None else xhat
    else:
        xhat = (s - mean.unsqueeze(-1)) if layer_norm else s
        xhat = xhat * rstd.unsqueeze(-1)
    d = dy.to(acc)
    g = d * weight.to(acc) if weight is not None else d
    n = saved.shape[-1]
    c2 = (g * xhat).sum(-1, keepdim=True) / n
    dx = g - xhat * c2
    if layer_norm:
        dx = dx - g.sum(-1, keepdim=True) / n
    dx = dx * rstd.unsqueeze(-1)
    if dh is not None:
        dx = dx + dh.to(acc)
    rows = d.reshape(-1, n)
    xr = xhat.reshape(-1, n)
    dw = (rows * xr).sum(0).to(weight.dtype) if weight is not None else saved.new_empty(0)
    db = rows.sum(0).to(bias.dtype) if bias is not None else saved.new_empty(0)
    return dx.to(saved.dtype), dw, db


def add_rms_norm_backward(dy, dh, saved, weight, rstd, saved_is_output):
    dx, dw, _ = _norm_backward(dy, dh, saved, weight, None, None, rstd, saved_is_output, False)
    return dx, dw


def add_layer_norm_backward(dy, dh, saved, weight, bias, mean, rstd, saved_is_output):
    return _norm_backward(dy, dh, saved, weight, bias, mean, rstd, saved_is_output, True)



# ---- activation ----------------------------------------------------------------------------------------------

