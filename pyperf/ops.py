"""Typed wrappers over torch.ops.pyperf.*, with a fake (meta) kernel for every op. The schemas live in
csrc/pyperf.cpp; the autograd of the differentiable ops in C++ (csrc/autograd/X.cpp, at the Autograd key, so
torch.ops.pyperf.* and these wrappers share it); the plain-torch oracle of each op in pyperf/_reference.py.

Sections follow the features (pack, quant, norm, activation), in the same order as csrc/pyperf.cpp.
"""
from typing import List, Optional, Sequence, Tuple  # noqa: F401

import torch

_lib = torch.ops.pyperf

# op name -> its fake (meta) kernel, kept so the test-only emulated copy of the ops (torch.ops.pyperf_emu, see
# csrc/emu) can register the same ones.
FAKES = {}


def _fake(name):
    def register(fn):
        FAKES[name] = fn
        return torch.library.register_fake("pyperf::" + name)(fn)
    return register

# ---- pack ----------------------------------------------------------------------------------------------------
# Many tensors <-> one flat buffer in one launch, with the scale and dtype cast fused into the copy (csrc/cpu/pack.cpp,
# csrc/cuda/pack.cu); multi_tensor_l2norm: fused squared L2 norm of a list plus a non-finite flag.

_PACK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _round_up(x, a):
    return (x + a - 1) // a * a


def pack_layout(numels: Sequence[int], align: int = 1) -> Tuple[List[int], int]:
    """Where pack puts each tensor: (offsets, total). Tensor i occupies flat[offsets[i] : offsets[i] + numels[i]];
    each offset is a multiple of `align`, and so is `total` (the padding in between is zero-filled by pack)."""
    if not isinstance(align, int) or isinstance(align, bool) or not 1 <= align <= 1 << 30:
        raise ValueError("align: expected an int number of elements in [1, 2^30], got %r" % (align,))
    offsets, pos = [], 0
    for n in numels:
        pos = _round_up(pos, align)
        offsets.append(pos)
        pos = pos + n
    return offsets, _round_up(pos, align)


def pack(tensors: Sequence[torch.Tensor], scale: float = 1.0, out_dtype: Optional[torch.dtype] = None,
         align: int = 1, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Copies contiguous same-dtype tensors into one flat 1-D buffer: flat[off_i : off_i + n_i] = scale * t_i,
    cast to `out_dtype` (default: the tensors' dtype; float32, bfloat16, float16 either way), in one launch.

    Offsets follow pack_layout(numels, align); padding is zero. With `out` (1-D, contiguous, at least `total`
    elements, its dtype is the output dtype) writes out[:total] only and returns `out` (like torch's out=);
    otherwise returns a new tensor of `total` elements."""
    tensors = list(tensors)
    if out is not None:
        if out_dtype is not None and out.dtype != out_dtype:
            raise ValueError("out: expected dtype %s (out_dtype), got %s" % (out_dtype, out.dtype))
        _lib.pack_out(tensors, float(scale), align, out)
        return out
    if not tensors:
        pack_layout([], align)
        return torch.empty(0, dtype=out_dtype or torch.float32)
    return _lib.pack(tensors, float(scale), out_dtype, align)


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0, align: int = 1,
           accumulate: bool = False) -> None:
    """The inverse of pack, in place and in one launch: t_i = scale * flat[off_i : off_i + n_i] (or
    t_i += scale * ... with accumulate), cast to the tensors' dtype. Same layout rule as pack (pack_layout)."""
    _lib.unpack(flat, list(tensors), float(scale), align, accumulate)


def multi_tensor_l2norm(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of squares of all elements as a float32 0-dim tensor, bool 0-dim tensor: any inf/nan in the inputs),
    in one launch plus a fixed-order final reduction (deterministic). An inf/nan input makes the sum inf/nan too;
    the flag tells it apart from a finite sum that overflowed float32. sqrt() of the first is the global norm."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.bool)
    return _lib.multi_tensor_l2norm(tensors)


@_fake("pack")
def _pack_fake(tensors, scale=1.0, out_dtype=None, align=1):
    _, total = pack_layout([t.numel() for t in tensors], align)
    dtype = out_dtype if out_dtype is not None else tensors[0].dtype
    return tensors[0].new_empty((total,), dtype=dtype)


@_fake("pack_out")
def _pack_out_fake(tensors, scale, align, out):
    return None


@_fake("unpack")
def _unpack_fake(flat, tensors, scale=1.0, align=1, accumulate=False):
    return None


@_fake("multi_tensor_l2norm")
def _multi_tensor_l2norm_fake(tensors):
    t = tensors[0]
    return t.new_empty((), dtype=torch.float32), t.new_empty((), dtype=torch.bool)



# ---- quant ---------------------------------------------------------------------------------------------------
# Blockwise gradient quantization for the two-shot quantized all-reduce (docs/quant.md). A chunk travels as ONE
# uint8 "wire": [nblocks fp32 scales][payload], so one collective moves both.

QUANT_FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
QUANT_QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
QUANT_MIN_BLOCK, QUANT_MAX_BLOCK = 32, 4096


def _check_quant_args(fmt, block_size):
    if fmt not in QUANT_QMAX:
        raise ValueError("fmt: expected one of %s, got %r" % (", ".join(QUANT_FORMATS), fmt))
    if (not isinstance(block_size, int) or block_size < QUANT_MIN_BLOCK or block_size > QUANT_MAX_BLOCK
            or block_size & (block_size - 1)):
        raise ValueError("block_size: expected a power of two in [%d, %d], got %r"
                         % (QUANT_MIN_BLOCK, QUANT_MAX_BLOCK, block_size))


def quant_nblocks(numel, block_size=256):
    """Blocks (= fp32 scales) of a chunk of `numel` values; the last one is zero-padded."""
    return (numel + block_size - 1) // block_size


def wire_bytes(numel, fmt, block_size=256):
    """Bytes of the wire of a chunk of `numel` values: 4 * nblocks scales + nblocks * block_size payload values
    (1 byte each for int8 and fp8, two per byte for int4). Always a multiple of 4."""
    _check_quant_args(fmt, block_size)
    nb = quant_nblocks(numel, block_size)
    payload = nb * block_size // 2 if fmt == "int4" else nb * block_size
    return 4 * nb + payload


def quantize(x: torch.Tensor, fmt: str, block_size: int = 256, *, stochastic: bool = False, seed: int = 0,
             offset: int = 0, residual: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantizes contiguous `x` (fp32/bf16/fp16, any shape, read flattened) into a uint8 wire of
    wire_bytes(x.numel(), fmt, block_size) bytes: one fp32 absmax scale per block, then the payload.

    stochastic: round up with probability equal to the distance (Philox keyed by (seed, offset) and the element
    index: the same call gives the same bits, on CPU and CUDA). Use a distinct offset per step and per chunk.
    residual: fp32, x.numel() values, error feedback in the same pass: v = x + residual is quantized and
    residual <- v - dequantize(q) in place (0 for a block holding inf/nan, see docs/quant.md).
    residual_out: fp32, contiguous, x.numel() values: the new residual goes here instead and `residual` is only
    read (None: zeros), so a caller can double-buffer the residuals (keep the old ones to undo a skipped step).
    It may be `residual` itself (in place again) but must not partially overlap it. Same bits as the in-place form.
    out: a preallocated contiguous uint8 tensor of wire_bytes bytes (e.g. one rank's slice of a send buffer,
    4-byte aligned); it is written and returned."""
    if out is None:
        return _lib.quantize(x, fmt, block_size, stochastic, seed, offset, residual, residual_out)
    _lib.quantize_into(x, fmt, block_size, stochastic, seed, offset, residual, out, residual_out)
    return out


def dequantize(wire: torch.Tensor, numel: int, fmt: str, block_size: int = 256, *,
               out_dtype: torch.dtype = torch.float32, scale: float = 1.0, out: Optional[torch.Tensor] = None,
               accumulate: bool = False) -> torch.Tensor:
    """The `numel` values of a wire, times `scale`, as a 1-D out_dtype tensor; or written into `out` (contiguous,
    numel values, its own dtype), with accumulate=True adding to it: out += scale * dequantized."""
    if out is None:
        if accumulate:
            raise ValueError("dequantize: accumulate=True needs out= (the tensor to add to)")
        return _lib.dequantize(wire, numel, fmt, block_size, out_dtype, scale)
    _lib.dequantize_into(wire, numel, fmt, block_size, scale, accumulate, out)
    return out


def reduce_quantized(wires: torch.Tensor, numel: int, fmt: str, block_size: int = 256, *, scale: float = 1.0,
                     out_dtype: torch.dtype = torch.float32, requantize: bool = False,
                     residual: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None,
                     out: Optional[torch.Tensor] = None, stochastic: bool = False, seed: int = 0,
                     offset: int = 0) -> torch.Tensor:
    """The reduce step of the two-shot all-reduce, one kernel: wires is uint8 [W, wire_bytes(numel)] (the chunk
    each rank sent); each row is dequantized and summed in fp32 in rank order 0..W-1 (deterministic), times
    `scale`. Returns the 1-D out_dtype sum, or with requantize=True the wire of the sum, quantized like
    quantize() (stochastic/seed/offset, server-side error feedback through `residual`, or out of place through
    `residual` and `residual_out` as in quantize()). With requantize=True, `out` (a preallocated contiguous uint8
    tensor of wire_bytes(numel) bytes, 4-byte aligned, apart from `wires`, e.g. a slice of the all-gather buffer)
    receives the wire and is returned."""
    if requantize:
        if out is None:
            return _lib.reduce_requantize(wires, numel, fmt, block_size, scale, stochastic, seed, offset, residual,
                                          residual_out)
        _lib.reduce_requantize_into(wires, numel, fmt, block_size, scale, stochastic, seed, offset, residual, out,
                                    residual_out)
        return out
    if residual is not None or residual_out is not None or out is not None or stochastic:
        raise ValueError("reduce_quantized: residual, residual_out, out and stochastic apply only with "
                         "requantize=True")
    return _lib.reduce_quantized(wires, numel, fmt, block_size, scale, out_dtype)


def quantize_tensors(xs: Sequence[torch.Tensor], fmt: str, block_size: int = 256, *, out: torch.Tensor,
                     residual: Optional[torch.Tensor] = None,
                     residual_out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """quantize(pack(xs, out_dtype=float32, align=block_size), fmt, block_size, residual=..., residual_out=...,
    out=out) without the packed copy: each tensor (one float dtype, contiguous) starts a new block and is padded
    with zeros to whole blocks; residual/residual_out span that padded layout (pack_layout). Round to nearest
    only (stochastic rounding keyed per tensor: call quantize() per tensor). Writes and returns `out`, a uint8 wire
    of wire_bytes(padded numel) bytes. The CPU kernel reads the tensors in place; on CUDA it is composed of
    pack + quantize through a temporary buffer."""
    _lib.quantize_tensors_into(list(xs), fmt, block_size, residual, out, residual_out)
    return out


def dequantize_tensors(wire: torch.Tensor, outs: Sequence[torch.Tensor], fmt: str, block_size: int = 256, *,
                       scale: float = 1.0) -> None:
    """The inverse of quantize_tensors: outs (one float dtype, contiguous) <- scale * the dequantized values of
    their padded layout, i.e. unpack(dequantize(wire, padded numel, fmt, block_size, scale=scale), outs,
    align=block_size) without the fp32 copy."""
    _lib.dequantize_tensors_(wire, fmt, block_size, float(scale), list(outs))


def reduce_quantized_tensors(wires: torch.Tensor, outs: Sequence[torch.Tensor], fmt: str, block_size: int = 256, *,
                             scale: float = 1.0, own: Optional[Sequence[torch.Tensor]] = None,
                             own_row: Optional[int] = None) -> None:
    """outs (one float dtype, contiguous) <- scale * the fp32 sum, in rank order 0..W-1, of the W wires of
    `wires` (uint8 [W, wire_bytes], each the quantize_tensors wire of the padded layout of outs), i.e.
    unpack(reduce_quantized(wires, padded numel, fmt, block_size, scale=scale), outs, align=block_size) without
    the fp32 sum buffer. The all-gather form of the quantized all-reduce reduces with it.

    own, own_row (both or neither): row own_row's term of the sum is own's exact values (tensors like outs: same
    count, numels and dtype) instead of its wire, whose bytes are not read. A reduce-scatter never sends the
    caller's own row, so it need not quantize it (pyperf.fsdp)."""
    if (own is None) != (own_row is None):
        raise ValueError("reduce_quantized_tensors: own and own_row go together (got own=%s, own_row=%r)"
                         % ("None" if own is None else "a list", own_row))
    _lib.reduce_quantized_tensors_(wires, fmt, block_size, float(scale), list(outs),
                                   None if own is None else list(own), -1 if own_row is None else int(own_row))


@_fake("quantize")
def _quantize_fake(x, fmt, block_size, stochastic, seed, offset, residual, residual_out=None):
    return x.new_empty((wire_bytes(x.numel(), fmt, block_size),), dtype=torch.uint8)


@_fake("quantize_into")
def _quantize_into_fake(x, fmt, block_size, stochastic, seed, offset, residual, out, residual_out=None):
    _check_quant_args(fmt, block_size)
    return None


@_fake("dequantize")
def _dequantize_fake(wire, numel, fmt, block_size, out_dtype, scale):
    _check_quant_args(fmt, block_size)
    return wire.new_empty((numel,), dtype=out_dtype)


@_fake("dequantize_into")
def _dequantize_into_fake(wire, numel, fmt, block_size, scale, accumulate, out):
    _check_quant_args(fmt, block_size)
    return None


@_fake("reduce_quantized")
def _reduce_quantized_fake(wires, numel, fmt, block_size, scale, out_dtype):
    _check_quant_args(fmt, block_size)
    return wires.new_empty((numel,), dtype=out_dtype)


@_fake("reduce_requantize")
def _reduce_requantize_fake(wires, numel, fmt, block_size, scale, stochastic, seed, offset, residual,
                            residual_out=None):
    return wires.new_empty((wire_bytes(numel, fmt, block_size),), dtype=torch.uint8)


@_fake("reduce_requantize_into")
def _reduce_requantize_into_fake(wires, numel, fmt, block_size, scale, stochastic, seed, offset, residual, out,
                                 residual_out=None):
    _check_quant_args(fmt, block_size)
    return None


@_fake("quantize_tensors_into")
def _quantize_tensors_into_fake(xs, fmt, block_size, residual, out, residual_out=None):
    _check_quant_args(fmt, block_size)
    return None


@_fake("dequantize_tensors_")
def _dequantize_tensors_fake(wire, fmt, block_size, scale, outs):
    _check_quant_args(fmt, block_size)
    return None


@_fake("reduce_quantized_tensors_")
def _reduce_quantized_tensors_fake(wires, fmt, block_size, scale, outs, own=None, own_row=-1):
    _check_quant_args(fmt, block_size)
    return None


# ---- norm ----------------------------------------------------------------------------------------------------

# Residual-add + RMSNorm / LayerNorm (csrc/cpu/norm.cpp, csrc/cuda/norm.cu; docs/norm.md). The forward returns the
# per-row statistics for the backward. The autograd is C++ (csrc/autograd/norm.cpp): it saves either the input
# stream h (save="input") or the output y (save="output": backward reconstructs xhat = (y - bias) / weight, so weight
# must have no zeros).


def _norm_stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _norm_save_output(save):
    if save not in ("input", "output"):
        raise ValueError("save: expected \"input\" or \"output\", got %r" % (save,))
    return save == "output"


def rms_norm_default_eps(dtype: torch.dtype) -> float:
    """torch.nn.RMSNorm's eps=None: the epsilon of the compute (opmath) dtype, not of the activation dtype."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def _norm_fake_fwd(x, residual):
    torch._check(x.dim() >= 1, lambda: "x: expected at least 1 dim, got a 0-dim tensor")
    if residual is not None:
        torch._check(residual.shape == x.shape,
                     lambda: "residual: expected sizes %s like x, got %s" % (tuple(x.shape), tuple(residual.shape)))
    y = x.new_empty(x.shape)
    h = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return y, h


@_fake("add_rms_norm")
def _add_rms_norm_fake(x, residual, weight, eps, save_output=False):
    y, h = _norm_fake_fwd(x, residual)
    return y, h, x.new_empty(x.shape[:-1], dtype=_norm_stat_dtype(x))


@_fake("add_layer_norm")
def _add_layer_norm_fake(x, residual, weight, bias, eps, save_output=False):
    y, h = _norm_fake_fwd(x, residual)
    stat = x.new_empty(x.shape[:-1], dtype=_norm_stat_dtype(x))
    return y, h, stat, stat.new_empty(stat.shape)


def _affine_grad_fake(p, saved):
    return p.new_empty(p.shape) if p is not None else saved.new_empty((0,))


@_fake("add_rms_norm_backward")
def _add_rms_norm_backward_fake(dy, dh, saved, weight, rstd, saved_is_output):
    return saved.new_empty(saved.shape), _affine_grad_fake(weight, saved)


@_fake("add_layer_norm_backward")
def _add_layer_norm_backward_fake(dy, dh, saved, weight, bias, mean, rstd, saved_is_output):
    return saved.new_empty(saved.shape), _affine_grad_fake(weight, saved), _affine_grad_fake(bias, saved)


def _contig(t):
    return None if t is None else t.contiguous()


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                 eps: float = 1e-6, save: str = "input") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = x + residual (if given); y = h / sqrt(mean(h^2, -1) + eps) * weight. Returns (y, h, rstd); h is an
    empty tensor when residual is None. save="output" makes backward keep y instead of h (weight: no zeros)."""
    return _lib.add_rms_norm.default(x.contiguous(), _contig(residual), _contig(weight), float(eps),
                                     _norm_save_output(save))


def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-5, save: str = "input"
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = x + residual (if given); y = (h - mean) / sqrt(var + eps) * weight + bias over the last dim.
    Returns (y, h, mean, rstd); h is an empty tensor when residual is None."""
    return _lib.add_layer_norm.default(x.contiguous(), _contig(residual), _contig(weight), _contig(bias), float(eps),
                                       _norm_save_output(save))


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: Optional[float] = None,
             residual: Optional[torch.Tensor] = None, save: str = "input"):
    """Like torch.nn.functional.rms_norm over the last dim (eps=None: torch's default, the machine epsilon of the
    compute dtype: float32's for float32/bfloat16/float16, float64's for float64). With a residual, returns
    (y, h) where h = x + residual is the new residual stream."""
    if eps is None:
        eps = rms_norm_default_eps(x.dtype)
    y, h, _ = add_rms_norm(x, residual, weight, eps, save)
    return y if residual is None else (y, h)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5, residual: Optional[torch.Tensor] = None, save: str = "input"):
    """Like torch.nn.functional.layer_norm over the last dim. With a residual, returns (y, h), h = x + residual."""
    y, h, _, _ = add_layer_norm(x, residual, weight, bias, eps, save)
    return y if residual is None else (y, h)



# ---- activation ----------------------------------------------------------------------------------------------

# Fused elementwise layers that save as little as possible for backward: bias+GeLU and SwiGLU/GeGLU save their
# inputs only (backward recomputes the activation), bias+dropout+residual saves only (p, seed, offset): its mask is
# regenerated from Philox, never stored. Math in float32 (float64 for float64 inputs, CPU gradcheck). The autograd
# is C++ (csrc/autograd/activation.cpp), so a call costs about what an aten op's does on the host.

_GELU_APPROX = ("tanh", "none")


def _as_int64(v, name):
    """seed/offset are 64-bit patterns; accept Python ints in [-2^63, 2^64) and pass them as int64."""
    v = int(v)
    if not -(1 << 63) <= v < (1 << 64):
        raise ValueError("%s: expected a 64-bit integer, got %d" % (name, v))
    return v - (1 << 64) if v >= (1 << 63) else v


def _fake_bias_grad(x, bias, bias_grad):
    return x.new_empty(bias.shape) if bias_grad else x.new_empty(0)


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor] = None, approximate: str = "tanh") -> torch.Tensor:
    """gelu(x + bias), bias over the last dim (or None); approximate "tanh" or "none" as in F.gelu.
    Saves x and bias for backward (not x + bias, not the output)."""
    return _lib.bias_gelu.default(x, bias, approximate)


@_fake("bias_gelu")
def _bias_gelu_fake(x, bias, approximate):
    torch._check(bias is None or (bias.dim() == 1 and bias.shape[0] == x.shape[-1]),
                 lambda: "bias: expected shape [%s]" % x.shape[-1])
    return x.new_empty(x.shape)


@_fake("bias_gelu_backward")
def _bias_gelu_backward_fake(grad, x, bias, approximate, bias_grad):
    return x.new_empty(x.shape), _fake_bias_grad(x, bias, bias_grad)


def bias_dropout_residual(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor, p: float,
                          seed: int, offset: int = 0, training: bool = True) -> torch.Tensor:
    """residual + dropout(x + bias, p). The mask is Philox(seed, offset) at each element's flat index: the same
    (seed, offset) gives the same mask on CPU and CUDA, in forward, backward and any recompute, and the global RNG
    is never touched. Kept elements are scaled by 1/(1-p); p == 0 or training=False is exactly residual + x + bias;
    p == 1 drops everything. Saves nothing but (p, seed, offset) for backward."""
    if not training:
        p = 0.0
    return _lib.bias_dropout_residual.default(x, bias, residual, float(p), _as_int64(seed, "seed"),
                                              _as_int64(offset, "offset"))


@_fake("bias_dropout_residual")
def _bias_dropout_residual_fake(x, bias, residual, p, seed, offset):
    torch._check(residual.shape == x.shape, lambda: "residual: expected shape %s like x" % (tuple(x.shape),))
    return x.new_empty(x.shape)


@_fake("bias_dropout_residual_backward")
def _bias_dropout_residual_backward_fake(grad, p, seed, offset, bias_grad):
    return grad.new_empty(grad.shape), (grad.new_empty(grad.shape[-1:]) if bias_grad else grad.new_empty(0))


def gated_act(a: torch.Tensor, b: Optional[torch.Tensor] = None, activation: str = "silu") -> torch.Tensor:
    """act(a) * b with activation "silu" | "gelu" | "gelu_tanh". b None: a is split in half on the last dim
    (a[..., :h] is gated, a[..., h:] is the linear half). Saves the inputs only."""
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


@_fake("gated_act")
def _gated_act_fake(a, b, activation):
    return a.new_empty(_gated_out_shape(a, b))


@_fake("gated_act_backward")
def _gated_act_backward_fake(grad, a, b, activation):
    return a.new_empty(a.shape), (a.new_empty(0) if b is None else a.new_empty(a.shape))
