"""pack / unpack / multi_tensor_l2norm against pyperf/_reference.py, on fresh random inputs.

On the CUDA kernels (device "cuda", or "emu": the same kernels under the SIMT emulation): "many" (200 tensors)
takes several multi-tensor-apply launches (64 tensors per launch) and carries a tensor across launches; the 1M and
65537-element tensors span several 64K chunks; align 1, 3 and 5 put tensors off the 16-byte vector path (scalar
copies), align 4, 8, 16 and 64 keep them on it, with scalar tails for the odd sizes; the l2norm tests run the
per-chunk partials and the one-block finalize kernel, with non-finite values in a middle chunk."""
import itertools
import math

import pytest
import torch
from conftest import dev, devices, lib, stable_seed

import pyperf  # noqa: F401
from pyperf import _reference as ref
from pyperf import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAIRS = list(itertools.product(DTYPES, DTYPES))
# Sizes: empty, one element, primes, not a multiple of any vector width, and one spanning several parallel chunks.
SIZE_SETS = {
    "mixed": [1, 0, 7, 13, 0, 257, 1021, 4099],
    "single_large": [1_000_003],
    "many": None,  # 200 random tensors, built in _shapes
}


def _shapes(kind, gen):
    if kind == "many":
        return [tuple(torch.randint(0, 40, (int(torch.randint(1, 3, (1,), generator=gen)),), generator=gen).tolist())
                for _ in range(200)]
    return [(n,) if i % 2 else (n, 1) for i, n in enumerate(SIZE_SETS[kind])]


def _rand(shapes, dtype, device, gen):
    return [torch.randn(s, generator=gen).to(device=dev(device), dtype=dtype) for s in shapes]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(a, b, device, dtype):
    # CPU matches the reference bit for bit; CUDA may fuse accumulate's multiply-add (one rounding less).
    if device == "cpu":
        torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=True)
    else:
        torch.testing.assert_close(a, b, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype ==
                                   torch.float32 else 1e-2, equal_nan=True)


# ---- layout ---------------------------------------------------------------------------------------------------

def test_pack_layout():
    assert ops.pack_layout([], 8) == ([], 0)
    assert ops.pack_layout([5, 0, 3], 1) == ([0, 5, 5], 8)
    assert ops.pack_layout([5, 0, 3], 4) == ([0, 8, 8], 12)
    assert ops.pack_layout([4, 4], 4) == ([0, 4], 8)
    for bad in (0, -1, 1.5, 1 << 31):
        with pytest.raises(ValueError, match="align"):
            ops.pack_layout([1], bad)


# ---- pack -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("in_dtype,out_dtype", PAIRS)
@pytest.mark.parametrize("kind", ["mixed", "many"])
@pytest.mark.parametrize("align,scale", [(1, 1.0), (4, 0.125), (3, -3.0), (64, 1.0)])
def test_pack_matches_reference(device, in_dtype, out_dtype, kind, align, scale):
    gen = _gen(stable_seed(str(in_dtype), str(out_dtype), kind, align))
    ts = _rand(_shapes(kind, gen), in_dtype, device, gen)
    got = ops.pack(ts, scale=scale, out_dtype=out_dtype, align=align)
    want = ref.pack(ts, scale=scale, out_dtype=out_dtype, align=align)
    assert got.dtype == out_dtype and got.shape == want.shape and got.device == ts[0].device
    _close(got, want, device, out_dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.float32)])
def test_pack_large(device, in_dtype, out_dtype):
    gen = _gen(1)
    ts = _rand(_shapes("single_large", gen) + [(3, 5)] + [(65537,)], in_dtype, device, gen)
    _close(ops.pack(ts, 0.25, out_dtype, 8), ref.pack(ts, 0.25, out_dtype, 8), device, out_dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("in_dtype,out_dtype", PAIRS)
@pytest.mark.parametrize("align", [1, 5, 16])
def test_pack_out_poisoned(device, in_dtype, out_dtype, align):
    """out[:total] gets the tensors and zero padding; nothing beyond total is written."""
    gen = _gen(7)
    ts = _rand(_shapes("mixed", gen), in_dtype, device, gen)
    _, total = ops.pack_layout([t.numel() for t in ts], align)
    out = torch.full((total + 37,), float("nan"), dtype=out_dtype, device=dev(device))
    got = ops.pack(ts, scale=0.5, align=align, out=out)
    assert got is out
    _close(out[:total], ref.pack(ts, 0.5, out_dtype, align), device, out_dtype)
    assert torch.isnan(out[total:]).all(), "pack wrote beyond total"


def test_pack_out_dtype_must_match_out():
    with pytest.raises(ValueError, match="out_dtype"):
        ops.pack([torch.ones(3)], out_dtype=torch.float16, out=torch.empty(3))


@pytest.mark.parametrize("device", devices())
def test_pack_padding_is_zero_over_stale_memory(device):
    # a fresh buffer from the caching allocator may hold old data: padding must still come out as zeros
    ts = [torch.randn(n, device=dev(device)) for n in (3, 5, 1)]
    for _ in range(3):
        junk = torch.full((1000,), float("nan"), device=dev(device))
        del junk
        flat = ops.pack(ts, align=8)
        assert flat.numel() == 24
        assert torch.equal(flat[3:8], torch.zeros(5, device=dev(device)))
        assert torch.equal(flat[13:16], torch.zeros(3, device=dev(device)))
        assert torch.equal(flat[17:], torch.zeros(7, device=dev(device)))


@pytest.mark.parametrize("device", devices())
def test_pack_nonfinite_passes_through(device):
    t = torch.tensor([1.0, float("inf"), float("-inf"), float("nan"), 7e4], device=dev(device))
    for out_dtype in DTYPES:
        got = ops.pack([t], scale=2.0, out_dtype=out_dtype)
        assert torch.isposinf(got[1]) and torch.isneginf(got[2]) and torch.isnan(got[3])
        if out_dtype == torch.float16:
            assert torch.isposinf(got[4]), "overflow to float16 must give inf, not a clamped value"


@pytest.mark.parametrize("device", devices())
def test_pack_empty(device):
    assert ops.pack([]).numel() == 0
    assert ops.pack([], out_dtype=torch.bfloat16).dtype == torch.bfloat16
    out = torch.full((4,), 5.0, device=dev(device))
    assert ops.pack([], out=out) is out and torch.equal(out, torch.full((4,), 5.0, device=dev(device)))
    z = ops.pack([torch.empty(0, device=dev(device)), torch.empty(0, 3, device=dev(device))], align=4)
    assert z.numel() == 0 and z.device.type == dev(device)


# ---- unpack ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("flat_dtype,dtype", PAIRS)
@pytest.mark.parametrize("kind", ["mixed", "many"])
@pytest.mark.parametrize("align,scale,accumulate", [(1, 1.0, False), (4, 0.25, False), (3, -2.0, True),
                                                    (16, 1.0, True)])
def test_unpack_matches_reference(device, flat_dtype, dtype, kind, align, scale, accumulate):
    gen = _gen(stable_seed(str(flat_dtype), str(dtype), kind, align, accumulate))
    shapes = _shapes(kind, gen)
    _, total = ops.pack_layout([math.prod(s) for s in shapes], align)
    flat = torch.randn(total + 11, generator=gen).to(device=dev(device), dtype=flat_dtype)
    if accumulate:
        got = _rand(shapes, dtype, device, gen)
        want = [t.clone() for t in got]
    else:  # poisoned: every element must be written
        got = [torch.full(s, float("nan"), dtype=dtype, device=dev(device)) for s in shapes]
        want = [t.clone() for t in got]
    ops.unpack(flat, got, scale=scale, align=align, accumulate=accumulate)
    ref.unpack(flat, want, scale=scale, align=align, accumulate=accumulate)
    for g, w in zip(got, want):
        _close(g, w, device, dtype)


@pytest.mark.parametrize("device", devices())
def test_unpack_large_and_roundtrip(device):
    gen = _gen(3)
    ts = _rand([(1_000_003,), (2, 3), (65537,)], torch.float32, device, gen)
    flat = ops.pack(ts, align=4)
    back = [torch.full_like(t, float("nan")) for t in ts]
    ops.unpack(flat, back, align=4)
    for a, b in zip(ts, back):
        assert torch.equal(a, b)
    ops.unpack(flat, back, scale=-1.0, align=4, accumulate=True)
    for b in back:
        assert torch.equal(b, torch.zeros_like(b))


@pytest.mark.parametrize("device", devices())
def test_unpack_empty(device):
    ops.unpack(torch.empty(0, device=dev(device)), [])
    ops.unpack(torch.empty(0, device=dev(device)), [torch.empty(0, 2, device=dev(device))], align=8)


# ---- multi_tensor_l2norm -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mixed", "many", "single_large"])
def test_l2norm_matches_reference(device, dtype, kind):
    gen = _gen(11)
    ts = _rand(_shapes(kind, gen), dtype, device, gen)
    sq, flag = ops.multi_tensor_l2norm(ts)
    want_sq, want_flag = ref.multi_tensor_l2norm(ts)
    assert sq.dtype == torch.float32 and sq.dim() == 0 and sq.device == ts[0].device
    assert flag.dtype == torch.bool and flag.dim() == 0 and not flag.item() and not want_flag.item()
    torch.testing.assert_close(sq.cpu(), want_sq, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_l2norm_nonfinite(device, dtype, bad):
    ts = [torch.randn(n, device=dev(device), dtype=dtype) for n in (5, 70000, 3)]
    ts[1][12345] = bad
    sq, flag = ops.multi_tensor_l2norm(ts)
    assert flag.item()
    assert (torch.isnan(sq) if bad != bad else torch.isposinf(sq)).item(), "the norm must become inf/nan too"


@pytest.mark.parametrize("device", devices())
def test_l2norm_overflow_is_not_nonfinite(device):
    sq, flag = ops.multi_tensor_l2norm([torch.full((4,), 3e38, device=dev(device))])
    assert torch.isposinf(sq).item() and not flag.item()


@pytest.mark.parametrize("device", devices())
def test_l2norm_deterministic(device):
    ts = [torch.randn(n, device=dev(device)) for n in (1_000_003, 17, 300_001)]
    first = ops.multi_tensor_l2norm(ts)[0]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(ops.multi_tensor_l2norm(ts)[0], first)
    finally:
        torch.set_num_threads(threads)


def test_l2norm_empty():
    sq, flag = ops.multi_tensor_l2norm([])
    assert sq.item() == 0.0 and not flag.item()
    sq, flag = ops.multi_tensor_l2norm([torch.empty(0), torch.empty(0, 4)])
    assert sq.item() == 0.0 and not flag.item()


# ---- errors ---------------------------------------------------------------------------------------------------

def test_errors():
    a, b = torch.randn(4), torch.randn(5)
    with pytest.raises(RuntimeError, match=r"tensors\[1\]: expected dtype Float like tensors\[0\], got Half"):
        ops.pack([a, b.half()])
    with pytest.raises(RuntimeError, match=r"tensors\[1\]: expected a contiguous tensor"):
        ops.pack([a, torch.randn(4, 6).t()])
    with pytest.raises(RuntimeError, match=r"tensors\[0\]: expected dtype float32, bfloat16 or float16, got Double"):
        ops.pack([a.double()])
    with pytest.raises(RuntimeError, match=r"tensors\[0\]: expected dtype float32, bfloat16 or float16, got Int"):
        ops.multi_tensor_l2norm([torch.ones(3, dtype=torch.int32)])
    with pytest.raises(RuntimeError, match=r"out_dtype: expected dtype float32, bfloat16 or float16, got Double"):
        ops.pack([a], out_dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"out: expected at least 9 elements .* got 8"):
        ops.pack([a, b], out=torch.empty(8))
    with pytest.raises(RuntimeError, match=r"out: expected a 1-D tensor"):
        ops.pack([a], out=torch.empty(2, 2))
    with pytest.raises(RuntimeError, match=r"align: expected a number of elements in \[1, 2\^30\], got 0"):
        torch.ops.pyperf.pack([a], 1.0, None, 0)
    with pytest.raises(RuntimeError, match=r"align: expected .* got -3"):
        ops.pack([a], align=-3)
    with pytest.raises(RuntimeError, match=r"flat: expected at least 16 elements .* got 11"):
        ops.unpack(torch.empty(11), [a, b], align=8)
    with pytest.raises(RuntimeError, match=r"tensors\[1\]: expected dtype Float like tensors\[0\], got BFloat16"):
        ops.unpack(torch.empty(9), [a, b.bfloat16()])
    with pytest.raises(RuntimeError, match=r"tensors\[1\]: expected a contiguous tensor"):
        ops.multi_tensor_l2norm([a, torch.randn(4, 6)[:, 1]])


@pytest.mark.parametrize("device", ["cuda"])   # the emulation computes on CPU tensors: no device to mismatch
def test_errors_devices(device):
    a, b = torch.randn(4), torch.randn(5, device=dev(device))
    with pytest.raises(RuntimeError, match=r"tensors\[1\]: expected device"):
        ops.pack([b, a])
    with pytest.raises(RuntimeError, match=r"out: expected a tensor on"):
        ops.pack([b], out=torch.empty(5))
    with pytest.raises(RuntimeError, match=r"expected tensors on|expected device"):
        ops.unpack(torch.empty(9, device=dev(device)), [a])


# ---- opcheck --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    ts = [torch.randn(s, device=dev(device)) for s in ((3, 4), (5,), (0,), (7,))]
    bf = [t.bfloat16() for t in ts]
    _, total = ops.pack_layout([t.numel() for t in ts], 4)
    for args in ((ts, 0.5, torch.bfloat16, 4), (bf, 1.0, None, 1), (ts, 2.0, torch.float16, 3)):
        torch.library.opcheck(lib(device).pack.default, args)
    torch.library.opcheck(lib(device).pack_out.default, (ts, 0.5, 4, torch.empty(total + 3, device=dev(device))))
    flat = torch.randn(total, device=dev(device))
    torch.library.opcheck(lib(device).unpack.default, (flat, [t.clone() for t in ts], 0.5, 4, False))
    torch.library.opcheck(lib(device).unpack.default, (flat.half(), [t.clone() for t in bf], 2.0, 4, True))
    torch.library.opcheck(lib(device).multi_tensor_l2norm.default, (ts,))
    torch.library.opcheck(lib(device).multi_tensor_l2norm.default, (bf,))


# ---- casts: every 16-bit pattern, and floats around every rounding boundary ------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_every_16bit_pattern(device, dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).to(dev(device))
    h = bits.view(dtype)
    got = ops.pack([h], out_dtype=torch.float32)
    torch.testing.assert_close(got, h.float(), atol=0, rtol=0, equal_nan=True)
    # and back: float32 -> 16 bit is exact for these values
    back = ops.pack([got], out_dtype=dtype)
    nan = torch.isnan(h)
    assert torch.equal(back.view(torch.int16)[~nan], bits[~nan]) and torch.isnan(back[nan]).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cast_rounding_matches_torch(device, dtype):
    g = _gen(5)
    # random float32 bit patterns (all exponents: subnormal, overflow, ties), plus exact ties
    x = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)
    ties = (torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
            .view(torch.int32) + (1 << (12 if dtype == torch.float16 else 15))).view(torch.float32)
    x = torch.cat([x, ties, torch.tensor([65504.0, 65519.99, 65520.0, 6e-8, 3e-8, 2.9e-8, 1e-45, -0.0])]).to(dev(device))
    got = ops.pack([x], out_dtype=dtype)
    want = x.to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    assert torch.isnan(got[nan]).all()
