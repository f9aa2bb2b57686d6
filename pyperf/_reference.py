"""Plain-torch reference of every pyperf op: the oracle for the tests and the eager baseline of the benchmarks.
Written for clarity, not speed; each function mirrors the op of the same name in pyperf/ops.py."""
import math  # noqa: F401

import torch  # noqa: F401

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


# ---- norm ----------------------------------------------------------------------------------------------------


# ---- activation ----------------------------------------------------------------------------------------------

