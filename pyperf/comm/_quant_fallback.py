"""TEMPORARY plain-torch stand-in for pyperf.ops quantize/dequantize/reduce_quantized/wire_bytes until the quant
branch lands (same signatures; used only when pyperf.ops lacks them). Delete after `git merge quant`."""
import math

import torch

_QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}


def _nb(numel, block_size):
    return (numel + block_size - 1) // block_size


def wire_bytes(numel, fmt, block_size=256):
    payload = (numel + 1) // 2 if fmt == "int4" else numel
    return 4 * _nb(numel, block_size) + payload


def _rand(numel, seed, offset):
    g = torch.Generator().manual_seed((seed * 1000003 + offset) & 0x7FFFFFFF)
    return torch.rand(numel, generator=g)


def _q(v, fmt, block_size, stochastic, seed, offset):
    n = v.numel()
    nb = _nb(n, block_size)
    vp = torch.zeros(nb * block_size)
    vp[:n] = v
    vb = vp.view(nb, block_size)
    amax = vb.abs().amax(1)
    amax = torch.where(torch.isfinite(vb).all(1), amax, torch.full_like(amax, float("nan")))
    scale = amax / _QMAX[fmt]
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    y = vb / safe[:, None]
    if fmt.startswith("int"):
        y = torch.floor(y + _rand(y.numel(), seed, offset).view_as(y)) if stochastic else torch.round(y)
        y = y.clamp(-_QMAX[fmt], _QMAX[fmt])
    else:
        y = y.to(torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2).float()
    return scale, y.reshape(-1)[:n]


def _pack_wire(scale, y, fmt):
    if fmt.startswith("int"):
        q = y.to(torch.int8)
        if fmt == "int4":
            q = q.to(torch.int16)
            if q.numel() % 2:
                q = torch.cat([q, q.new_zeros(1)])
            lo, hi = (q[0::2] & 15), (q[1::2] & 15)
            payload = (lo | (hi << 4)).to(torch.uint8)
        else:
            payload = q.view(torch.uint8)
    else:
        payload = y.to(torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2).view(torch.uint8)
    return torch.cat([scale.float().contiguous().view(torch.uint8), payload.reshape(-1)])


def _unpack_wire(wire, numel, fmt, block_size):
    nb = _nb(numel, block_size)
    scale = wire[: 4 * nb].clone().view(torch.float32)
    p = wire[4 * nb:]
    if fmt == "int8":
        y = p.view(torch.int8).float()
    elif fmt == "int4":
        b = p.to(torch.int16)
        lo, hi = b & 15, (b >> 4) & 15
        lo = torch.where(lo > 7, lo - 16, lo)
        hi = torch.where(hi > 7, hi - 16, hi)
        y = torch.stack([lo, hi], 1).reshape(-1)[:numel].float()
    else:
        y = p.view(torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2).float()
    yp = torch.zeros(nb * block_size)
    yp[:numel] = y[:numel]
    return (yp.view(nb, block_size) * scale[:, None]).reshape(-1)[:numel]


def quantize(x, fmt, block_size=256, *, stochastic=False, seed=0, offset=0, residual=None, out=None):
    v = x.reshape(-1).float()
    if residual is not None:
        v = v + residual.reshape(-1)
    scale, y = _q(v, fmt, block_size, stochastic, seed, offset)
    w = _pack_wire(scale, y, fmt)
    if residual is not None:
        residual.reshape(-1).copy_(v - _unpack_wire(w, v.numel(), fmt, block_size))
    if out is not None:
        out.copy_(w)
        return out
    return w


def dequantize(wire, numel, fmt, block_size=256, *, out_dtype=torch.float32, scale=1.0, out=None, accumulate=False):
    y = _unpack_wire(wire, numel, fmt, block_size) * scale
    if out is None:
        return y.to(out_dtype)
    if accumulate:
        out.add_(y.to(out.dtype))
    else:
        out.copy_(y)
    return out


def reduce_quantized(wires, numel, fmt, block_size=256, *, scale=1.0, out_dtype=torch.float32, requantize=False,
                     residual=None, stochastic=False, seed=0, offset=0):
    s = torch.zeros(numel)
    for r in range(wires.shape[0]):
        s += _unpack_wire(wires[r], numel, fmt, block_size)
    s = s * scale
    if requantize:
        return quantize(s, fmt, block_size, stochastic=stochastic, seed=seed, offset=offset, residual=residual)
    return s.to(out_dtype)
