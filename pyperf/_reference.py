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

# Every activation reference computes in float32 (float64 for float64 inputs) and rounds once, like the kernels.

def _acc(t):
    return t.double() if t.dtype == torch.float64 else t.float()


_GELU_APPROX = {"tanh": "tanh", "none": "none"}


def bias_gelu(x, bias=None, approximate="tanh"):
    """gelu(x + bias) over the last dim."""
    v = _acc(x) + (_acc(bias) if bias is not None else 0)
    return torch.nn.functional.gelu(v, approximate=_GELU_APPROX[approximate]).to(x.dtype)


_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def philox_uniform(seed, offset, n, device="cpu"):
    """The Philox4x32-10 uniforms of elements 0..n-1 under (seed, offset), in plain torch (the convention of
    csrc/include/pyperf/philox.h: element i uses counter {i/4, (i/4)>>32, offset, offset>>32}, key {seed,
    seed>>32}, lane i%4, uniform = (r >> 8) * 2^-24). int64 products wrap mod 2^64, so their bits are the uint64
    products the kernels compute."""
    seed &= _U64
    offset &= _U64
    groups = (n + 3) // 4
    g = torch.arange(groups, dtype=torch.int64, device=device)
    c0, c1 = g & _U32, (g >> 32) & _U32
    c2 = torch.full_like(g, offset & _U32)
    c3 = torch.full_like(g, offset >> 32)
    k0, k1 = seed & _U32, seed >> 32
    for _ in range(10):
        p0 = c0 * 0xD2511F53
        p1 = c2 * 0xCD9E8D57
        hi0, lo0 = (p0 >> 32) & _U32, p0 & _U32
        hi1, lo1 = (p1 >> 32) & _U32, p1 & _U32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _U32, (k1 + 0xBB67AE85) & _U32
    r = torch.stack([c0, c1, c2, c3], dim=1).reshape(-1)[:n]
    return (r >> 8).to(torch.float32) * (1.0 / 16777216.0)


def dropout_scale(p, seed, offset, shape, device="cpu"):
    """The dropout multiplier of every element (float32): 1/(1-p) where kept (uniform >= p in float32), else 0."""
    n = math.prod(shape)
    u = philox_uniform(seed, offset, n, device).reshape(shape)
    scale = 1.0 / (1.0 - p) if p < 1.0 else 0.0
    keep = u >= torch.tensor(p, dtype=torch.float32)
    return keep.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


def bias_dropout_residual(x, bias, residual, p, seed, offset, training=True):
    """residual + dropout(x + bias, p) with the Philox mask of (seed, offset); p == 0 or eval: residual + x + bias."""
    v = _acc(x) + (_acc(bias) if bias is not None else 0)
    if training and p > 0:
        v = v * dropout_scale(p, seed, offset, x.shape, x.device).to(v.dtype)
    return (_acc(residual) + v).to(x.dtype)


_GATED = {
    "silu": torch.nn.functional.silu,
    "gelu": lambda v: torch.nn.functional.gelu(v, approximate="none"),
    "gelu_tanh": lambda v: torch.nn.functional.gelu(v, approximate="tanh"),
}


def gated_act(a, b=None, activation="silu"):
    """act(a) * b; with b None, a is split in half on the last dim (first half gated, second half linear)."""
    if b is None:
        a, b = a.chunk(2, dim=-1)
    return (_GATED[activation](_acc(a)) * _acc(b)).to(a.dtype)


def swiglu(a, b=None):
    return gated_act(a, b, "silu")


def geglu(a, b=None, approximate="tanh"):
    return gated_act(a, b, "gelu_tanh" if approximate == "tanh" else "gelu")
