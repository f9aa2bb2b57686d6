"""Typed wrappers over torch.ops.pyperf.*, with a fake (meta) kernel for every op and autograd where an op is
differentiable. The schemas live in csrc/pyperf.cpp; the plain-torch oracle of each op in pyperf/_reference.py.

Sections follow the features (pack, quant, norm, activation), in the same order as csrc/pyperf.cpp.
"""
from typing import List, Optional, Sequence, Tuple  # noqa: F401

import torch

_lib = torch.ops.pyperf

# ---- pack ----------------------------------------------------------------------------------------------------


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
             offset: int = 0, residual: Optional[torch.Tensor] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantizes contiguous `x` (fp32/bf16/fp16, any shape, read flattened) into a uint8 wire of
    wire_bytes(x.numel(), fmt, block_size) bytes: one fp32 absmax scale per block, then the payload.

    stochastic: round up with probability equal to the distance (Philox keyed by (seed, offset) and the element
    index: the same call gives the same bits, on CPU and CUDA). Use a distinct offset per step and per chunk.
    residual: fp32, x.numel() values, error feedback in the same pass: v = x + residual is quantized and
    residual <- v - dequantize(q) in place (0 for a block holding inf/nan, see docs/quant.md).
    out: a preallocated contiguous uint8 tensor of wire_bytes bytes (e.g. one rank's slice of a send buffer,
    4-byte aligned); it is written and returned."""
    if out is None:
        return _lib.quantize(x, fmt, block_size, stochastic, seed, offset, residual)
    _lib.quantize_into(x, fmt, block_size, stochastic, seed, offset, residual, out)
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
                     residual: Optional[torch.Tensor] = None, stochastic: bool = False, seed: int = 0,
                     offset: int = 0) -> torch.Tensor:
    """The reduce step of the two-shot all-reduce, one kernel: wires is uint8 [W, wire_bytes(numel)] (the chunk
    each rank sent); each row is dequantized and summed in fp32 in rank order 0..W-1 (deterministic), times
    `scale`. Returns the 1-D out_dtype sum, or with requantize=True the wire of the sum, quantized like
    quantize() (stochastic/seed/offset, server-side error feedback through `residual`)."""
    if requantize:
        return _lib.reduce_requantize(wires, numel, fmt, block_size, scale, stochastic, seed, offset, residual)
    if residual is not None or stochastic:
        raise ValueError("reduce_quantized: residual and stochastic apply only with requantize=True")
    return _lib.reduce_quantized(wires, numel, fmt, block_size, scale, out_dtype)


@torch.library.register_fake("pyperf::quantize")
def _quantize_fake(x, fmt, block_size, stochastic, seed, offset, residual):
    return x.new_empty((wire_bytes(x.numel(), fmt, block_size),), dtype=torch.uint8)


@torch.library.register_fake("pyperf::quantize_into")
def _quantize_into_fake(x, fmt, block_size, stochastic, seed, offset, residual, out):
    _check_quant_args(fmt, block_size)
    return None


@torch.library.register_fake("pyperf::dequantize")
def _dequantize_fake(wire, numel, fmt, block_size, out_dtype, scale):
    _check_quant_args(fmt, block_size)
    return wire.new_empty((numel,), dtype=out_dtype)


@torch.library.register_fake("pyperf::dequantize_into")
def _dequantize_into_fake(wire, numel, fmt, block_size, scale, accumulate, out):
    _check_quant_args(fmt, block_size)
    return None


@torch.library.register_fake("pyperf::reduce_quantized")
def _reduce_quantized_fake(wires, numel, fmt, block_size, scale, out_dtype):
    _check_quant_args(fmt, block_size)
    return wires.new_empty((numel,), dtype=out_dtype)


@torch.library.register_fake("pyperf::reduce_requantize")
def _reduce_requantize_fake(wires, numel, fmt, block_size, scale, stochastic, seed, offset, residual):
    return wires.new_empty((wire_bytes(numel, fmt, block_size),), dtype=torch.uint8)



# ---- norm ----------------------------------------------------------------------------------------------------


# ---- activation ----------------------------------------------------------------------------------------------

