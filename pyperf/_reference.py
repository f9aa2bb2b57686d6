"""Plain-torch reference of every pyperf op: the oracle for the tests and the eager baseline of the benchmarks.
Written for clarity, not speed; each function mirrors the op of the same name in pyperf/ops.py."""
import math  # noqa: F401

import torch  # noqa: F401

# ---- shared: Philox (stochastic rounding and dropout draw from the same stream) -----------------------------

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


# ---- pack ----------------------------------------------------------------------------------------------------


def _pack_offsets(numels, align):
    offsets, pos = [], 0
    for n in numels:
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += n
    return offsets, -(-pos // align) * align


def pack(tensors, scale=1.0, out_dtype=None, align=1):
    tensors = list(tensors)
    dtype = out_dtype or (tensors[0].dtype if tensors else torch.float32)
    offsets, total = _pack_offsets([t.numel() for t in tensors], align)
    device = tensors[0].device if tensors else "cpu"
    flat = torch.zeros(total, dtype=dtype, device=device)
    for t, off in zip(tensors, offsets):
        flat[off: off + t.numel()] = (t.reshape(-1).float() * scale).to(dtype)
    return flat


def unpack(flat, tensors, scale=1.0, align=1, accumulate=False):
    offsets, _ = _pack_offsets([t.numel() for t in tensors], align)
    for t, off in zip(tensors, offsets):
        piece = flat[off: off + t.numel()].float() * scale
        if accumulate:
            piece = t.reshape(-1).float() + piece
        t.copy_(piece.to(t.dtype).view(t.shape))


def multi_tensor_l2norm(tensors):
    sq = sum((t.double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.float64))
    bad = any(bool((~torch.isfinite(t)).any()) for t in tensors)
    return sq.float(), torch.tensor(bad)



# ---- quant ---------------------------------------------------------------------------------------------------
# Bit-exact oracle of the quant ops (same fp32 operations in the same order as csrc/include/pyperf/quant_math.h),
# and the eager baseline a user would write. `uniform=` lets a benchmark feed torch.rand instead of Philox.

_M32 = 0xFFFFFFFF
_FLT_MIN = 1.1754943508222875e-38
_FP8 = {"fp8_e4m3": (3, 7, 0x7E), "fp8_e5m2": (2, 15, 0x7B)}   # mantissa bits, bias, largest finite code


_QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}   # = ops.QUANT_QMAX


def _quant_qmax(fmt):
    if fmt not in _QMAX:
        raise ValueError("fmt: expected one of %s, got %r" % (", ".join(_QMAX), fmt))
    return _QMAX[fmt]


def _round_to_int(t, stochastic, u):
    if not stochastic:
        return torch.round(t)                # half to even, like rint_small
    fl = torch.floor(t)
    return torch.where(u < t - fl, fl + 1.0, fl)


def _fp8_codes(t, fmt, stochastic, u):
    mbits, bias, maxcode = _FP8[fmt]
    bits = t.view(torch.int32)
    sign = torch.where(bits < 0, 0x80, 0)
    e = ((bits >> 23) & 0xFF) - 127
    e = torch.clamp(e, min=1 - bias)
    inv_quantum = ((127 - e + mbits) << 23).to(torch.int32).view(torch.float32)      # 2^(mbits - e)
    m = t.abs() * inv_quantum
    r = _round_to_int(m, stochastic, u).to(torch.int32)
    code = torch.clamp(((e + bias - 1) << mbits) + r, max=maxcode)
    return (code | sign).to(torch.uint8)


_FP8_TABLES = {}


def fp8_decode_table(fmt, device="cpu"):
    """fp32 value of each of the 256 codes (e4m3fn: 0x7F/0xFF NaN; e5m2: IEEE-like inf/nan)."""
    key = (fmt, str(device))
    if key not in _FP8_TABLES:
        _FP8_TABLES[key] = _fp8_decode_table(fmt).to(device)
    return _FP8_TABLES[key]


def _fp8_decode_table(fmt):
    mbits, bias, _ = _FP8[fmt]
    vals = []
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        mag = c & 0x7F
        E, M = mag >> mbits, mag & ((1 << mbits) - 1)
        if fmt == "fp8_e4m3" and mag == 0x7F:
            v = float("nan")
        elif fmt == "fp8_e5m2" and E == 31:
            v = float("inf") if M == 0 else float("nan")
        elif E == 0:
            v = M * 2.0 ** (1 - bias - mbits)
        else:
            v = (1 + M / 2 ** mbits) * 2.0 ** (E - bias)
        vals.append(sign * v)
    return torch.tensor(vals, dtype=torch.float32)


def _decode_codes(codes, fmt):
    """Unscaled fp32 values of uint8 codes (int4: one code per nibble, already unpacked)."""
    if fmt in ("int8", "int4"):
        return codes.view(torch.int8).to(torch.float32)
    return fp8_decode_table(fmt, codes.device)[codes.long()]


def _quantize_blocks(v, numel, fmt, block_size, stochastic, seed, offset, residual, uniform):
    """v: fp32 [numel] (x + residual). Returns the wire; updates residual in place."""
    qmax = _quant_qmax(fmt)
    nb = (numel + block_size - 1) // block_size
    vp = torch.zeros(nb * block_size, dtype=torch.float32, device=v.device)
    vp[:numel] = v
    blocks = vp.view(nb, block_size)
    absmax = blocks.abs().amax(dim=1) if nb else torch.zeros(0, device=v.device)
    scale = absmax / qmax
    scale = torch.where(scale >= _FLT_MIN, scale, torch.zeros_like(scale))
    scale = torch.where(torch.isfinite(absmax), scale, torch.full_like(scale, float("nan")))
    ok = (scale > 0)[:, None]
    inv = torch.where(scale > 0, 1.0 / torch.where(scale > 0, scale, 1.0), 0.0)   # inv_block_scale
    t = torch.where(ok, blocks * inv[:, None], 0.0)
    if stochastic:
        u = philox_uniform(seed, offset, nb * block_size, v.device) if uniform is None else uniform
        u = u.reshape(-1)
        u = torch.cat([u, u.new_zeros(nb * block_size - u.numel())]).view(nb, block_size)
    else:
        u = None
    if fmt in ("int8", "int4"):
        q = torch.clamp(_round_to_int(t, stochastic, u), -qmax, qmax)
        codes = torch.where(ok, q, 0.0).to(torch.int8).view(torch.uint8)
    else:
        codes = torch.where(ok, _fp8_codes(t, fmt, stochastic, u), 0).to(torch.uint8)
    if residual is not None:
        deq = _decode_codes(codes, fmt) * scale[:, None]
        new = torch.where(torch.isnan(scale)[:, None], 0.0, blocks - deq)
        residual.view(-1).copy_(new.reshape(-1)[:numel])
    if fmt == "int4":
        nib = codes & 0xF
        payload = nib[:, 0::2] | (nib[:, 1::2] << 4)
    else:
        payload = codes
    return torch.cat([scale.view(torch.uint8).reshape(-1), payload.reshape(-1)])


def _add_residual(v, residual, residual_out):
    """v + the old residual (zeros when only residual_out is given: -0 turns +0 as in the kernels)."""
    if residual is not None:
        return v + residual.reshape(-1)
    return v + 0.0 if residual_out is not None else v


def quantize(x, fmt, block_size=256, *, stochastic=False, seed=0, offset=0, residual=None, residual_out=None,
             out=None, uniform=None):
    v = _add_residual(x.reshape(-1).to(torch.float32), residual, residual_out)
    new_res = residual_out if residual_out is not None else residual
    wire = _quantize_blocks(v, x.numel(), fmt, block_size, stochastic, seed, offset, new_res, uniform)
    if out is not None:
        out.copy_(wire)
        return out
    return wire


def _dequantize_fp32(wire, numel, fmt, block_size):
    """Unscaled-by-user fp32 values of the padded blocks, [nblocks * block_size]."""
    nb = (numel + block_size - 1) // block_size
    scales = wire[:4 * nb].clone().view(torch.float32)     # clone: a fresh, aligned storage
    payload = wire[4 * nb:]
    if fmt == "int4":
        lo = (payload & 0xF).view(torch.int8)
        hi = (payload >> 4).view(torch.int8)
        nib = torch.stack([lo, hi], dim=1).reshape(-1)
        codes = torch.where(nib > 7, nib - 16, nib).view(torch.uint8)
    else:
        codes = payload
    vals = _decode_codes(codes, fmt).view(nb, block_size) * scales[:, None]
    return vals.reshape(-1)


def dequantize(wire, numel, fmt, block_size=256, *, out_dtype=torch.float32, scale=1.0, out=None,
               accumulate=False):
    vals = _dequantize_fp32(wire, numel, fmt, block_size)[:numel] * scale
    if out is None:
        return vals.to(out_dtype)
    flat = out.view(-1)
    if accumulate:
        vals = flat.to(torch.float32) + vals
    flat.copy_(vals)
    return out


def quantize_tensors(xs, fmt, block_size=256, *, out, residual=None, residual_out=None):
    return quantize(pack(xs, out_dtype=torch.float32, align=block_size), fmt, block_size, residual=residual,
                    residual_out=residual_out, out=out)


def dequantize_tensors(wire, outs, fmt, block_size=256, *, scale=1.0):
    _, total = _pack_offsets([t.numel() for t in outs], block_size)
    unpack(dequantize(wire, total, fmt, block_size, scale=scale), outs, align=block_size)


def reduce_quantized_tensors(wires, outs, fmt, block_size=256, *, scale=1.0, own=None, own_row=None):
    _, total = _pack_offsets([t.numel() for t in outs], block_size)
    if own is None:
        unpack(reduce_quantized(wires, total, fmt, block_size, scale=scale), outs, align=block_size)
        return
    own_flat = pack(own, out_dtype=torch.float32, align=block_size)
    acc = torch.zeros(total, dtype=torch.float32, device=wires.device)
    for w in range(wires.shape[0]):                 # rank order, own_row's term exact
        acc = acc + (own_flat if w == own_row else _dequantize_fp32(wires[w], total, fmt, block_size))
    unpack((acc * scale).to(outs[0].dtype) if outs else acc, outs, align=block_size)


def reduce_quantized(wires, numel, fmt, block_size=256, *, scale=1.0, out_dtype=torch.float32, requantize=False,
                     residual=None, residual_out=None, out=None, stochastic=False, seed=0, offset=0, uniform=None):
    nb = (numel + block_size - 1) // block_size
    acc = torch.zeros(nb * block_size, dtype=torch.float32, device=wires.device)
    for w in range(wires.shape[0]):                 # fixed rank order: deterministic
        acc = acc + _dequantize_fp32(wires[w], numel, fmt, block_size)
    acc = acc[:numel] * scale
    if not requantize:
        return acc.to(out_dtype)
    acc = _add_residual(acc, residual, residual_out)
    new_res = residual_out if residual_out is not None else residual
    wire = _quantize_blocks(acc, numel, fmt, block_size, stochastic, seed, offset, new_res, uniform)
    if out is not None:
        out.copy_(wire)
        return out
    return wire



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
