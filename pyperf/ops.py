"""Typed wrappers over torch.ops.pyperf.*, with a fake (meta) kernel for every op and autograd where an op is
differentiable. The schemas live in csrc/pyperf.cpp; the plain-torch oracle of each op in pyperf/_reference.py.

Sections follow the features (pack, quant, norm, activation), in the same order as csrc/pyperf.cpp.
"""
from typing import List, Optional, Sequence, Tuple  # noqa: F401

import torch

_lib = torch.ops.pyperf

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


@torch.library.register_fake("pyperf::pack")
def _pack_fake(tensors, scale=1.0, out_dtype=None, align=1):
    _, total = pack_layout([t.numel() for t in tensors], align)
    dtype = out_dtype if out_dtype is not None else tensors[0].dtype
    return tensors[0].new_empty((total,), dtype=dtype)


@torch.library.register_fake("pyperf::pack_out")
def _pack_out_fake(tensors, scale, align, out):
    return None


@torch.library.register_fake("pyperf::unpack")
def _unpack_fake(flat, tensors, scale=1.0, align=1, accumulate=False):
    return None


@torch.library.register_fake("pyperf::multi_tensor_l2norm")
def _multi_tensor_l2norm_fake(tensors):
    t = tensors[0]
    return t.new_empty((), dtype=torch.float32), t.new_empty((), dtype=torch.bool)



# ---- quant ---------------------------------------------------------------------------------------------------


# ---- norm ----------------------------------------------------------------------------------------------------


# ---- activation ----------------------------------------------------------------------------------------------

