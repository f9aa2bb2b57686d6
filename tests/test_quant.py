"""Blockwise quantization ops (pyperf.ops.quantize / dequantize / reduce_quantized) against the bit-exact oracle in
pyperf/_reference.py: every format and input dtype, odd sizes, stochastic rounding, error feedback, non-finite
blocks, the fused reduce, opcheck and the error messages. CUDA cases also check CPU/CUDA bit identity.

On the CUDA kernels (device "cuda", or "emu": the same kernels under the SIMT emulation) the block sizes reach every
quantize variant: lanes per quant block 8 (bs 32) or 32; steps per lane cached in registers 1, 2, 4 and 8 (int8/fp8
bs 256..1024; int4 bs 512/1024 from fp32) or re-read in two passes (bs 2048, 4096; int4 bs 1024 from bf16/fp16);
SIZES and the odd n of the bit test give partial last blocks and scalar tails; residual_out off the vector alignment
takes the scalar residual stores; the reduce's requantize runs the same kernel with its wire-sum source."""
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import dev, devices, gpu_devices, kernels, lib
from pyperf import _reference as R
from pyperf import ops

FORMATS = ops.QUANT_FORMATS
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (0, 1, 31, 257, 1009)          # empty, single, < one block, primes that leave a partial last block
FP8_MBITS = {"fp8_e4m3": (3, -6), "fp8_e5m2": (2, -14)}   # mantissa bits, smallest normal exponent


def _randn(n, dtype, device, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    # values spread over several binades, so fp8 sees its subnormal and normal ranges
    x = torch.randn(n, generator=g) * scale * torch.exp2(torch.randint(-6, 3, (n,), generator=g).float())
    return x.to(dtype).to(dev(device))


def _block_scales(wire, numel, block_size):
    nb = ops.quant_nblocks(numel, block_size)
    return wire[:4 * nb].cpu().view(torch.float32)


def _per_elem_scale(wire, numel, block_size):
    return _block_scales(wire, numel, block_size).repeat_interleave(block_size)[:numel]


# ---- layout ----

def test_wire_bytes():
    assert R._QMAX == ops.QUANT_QMAX
    assert ops.wire_bytes(0, "int8") == 0
    assert ops.wire_bytes(1, "int8", 32) == 4 + 32
    assert ops.wire_bytes(1000, "int8", 256) == 4 * 4 + 4 * 256
    assert ops.wire_bytes(1000, "int4", 256) == 4 * 4 + 4 * 128
    assert ops.wire_bytes(513, "fp8_e5m2", 512) == 8 + 1024
    for fmt in FORMATS:
        for bs in (32, 64, 4096):
            for n in (1, 7, 100, 4097):
                assert ops.wire_bytes(n, fmt, bs) % 4 == 0
                assert ops.quantize(torch.zeros(n), fmt, bs).numel() == ops.wire_bytes(n, fmt, bs)


def test_philox_reference_matches_known_answer():
    # Random123 KAT: philox4x32-10, counter 0, key 0 -> 0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8
    u = R.philox_uniform(0, 0, 4)
    expect = torch.tensor([0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8], dtype=torch.int64)
    assert torch.equal(u, (expect >> 8).float() / 16777216.0)


def test_fp8_reference_codes_match_torch():
    for fmt, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        qmax = ops.QUANT_QMAX[fmt]
        t = (torch.rand(20000) * 2 - 1) * qmax * torch.exp2(-torch.randint(0, 24, (20000,)).float())
        assert torch.equal(R._fp8_codes(t, fmt, False, None), t.to(dt).view(torch.uint8))
        allc = torch.arange(256, dtype=torch.uint8).view(dt).float()
        assert torch.equal(R.fp8_decode_table(fmt).nan_to_num(7.0), allc.nan_to_num(7.0))


# ---- quantize / dequantize against the reference ----

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(device, fmt, dtype):
    for i, n in enumerate(SIZES):
        for bs in (32, 256):
            for sr, ef in ((False, False), (True, False), (False, True), (True, True)):
                x = _randn(n, dtype, device, seed=i * 31 + bs)
                r = torch.randn(n, device=dev(device)) * 0.05 if ef else None
                r_ref = r.cpu().clone() if ef else None
                wire = ops.quantize(x, fmt, bs, stochastic=sr, seed=11, offset=n, residual=r)
                ref = R.quantize(x.cpu(), fmt, bs, stochastic=sr, seed=11, offset=n, residual=r_ref)
                assert wire.dtype == torch.uint8 and wire.device.type == dev(device)
                assert torch.equal(wire.cpu(), ref), (fmt, dtype, n, bs, sr, ef)
                if ef:
                    assert torch.equal(r.cpu(), r_ref), (fmt, dtype, n, bs, sr)
                for out_dtype in DTYPES:
                    d = ops.dequantize(wire, n, fmt, bs, out_dtype=out_dtype, scale=0.25)
                    d_ref = R.dequantize(ref, n, fmt, bs, out_dtype=out_dtype, scale=0.25)
                    assert d.dtype == out_dtype and d.shape == (n,)
                    assert torch.equal(d.cpu(), d_ref), (fmt, dtype, n, bs, out_dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bs", (32, 128, 4096))
def test_int8_exact_on_representable_values(device, bs):
    n = 3 * bs + 5
    k = torch.randint(-127, 128, (n,))
    k[::bs] = 127                                  # every block reaches qmax, so its scale is exactly 2^e
    e = torch.randint(-10, 10, (ops.quant_nblocks(n, bs),)).repeat_interleave(bs)[:n]
    x = (k.float() * torch.exp2(e.float())).to(dev(device))
    d = ops.dequantize(ops.quantize(x, "int8", bs), n, "int8", bs)
    assert torch.equal(d, x)
    xb = x.to(torch.bfloat16)                      # |k| < 2^8: exact in bf16 too
    assert torch.equal(ops.dequantize(ops.quantize(xb, "int8", bs), n, "int8", bs, out_dtype=torch.bfloat16), xb)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_error_bounds(device, fmt):
    n, bs = 5003, 128
    x = _randn(n, torch.float32, device, seed=3)
    for sr in (False, True):
        wire = ops.quantize(x, fmt, bs, stochastic=sr, seed=1, offset=2)
        err = (ops.dequantize(wire, n, fmt, bs) - x).abs().cpu()
        s = _per_elem_scale(wire, n, bs)
        xa = x.abs().cpu()
        if fmt in ("int8", "int4"):
            bound = s * 0.5 * (1 + 1e-6) if not sr else s
        else:
            mbits, emin = FP8_MBITS[fmt]
            half = xa * 2.0 ** -(mbits + 1) + s * 2.0 ** (emin - mbits - 1)
            bound = half * (1 + 1e-6) if not sr else 2 * half
        ok = err <= bound if not sr else err < bound
        assert ok.all(), (fmt, sr, (err - bound).max())


# ---- outputs: every element written, only the requested bytes touched ----

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_into_slice_of_send_buffer(device, fmt):
    n, bs, world = 1009, 64, 3
    wb = ops.wire_bytes(n, fmt, bs)
    buf = torch.full((world * wb,), 0xAB, dtype=torch.uint8, device=dev(device))
    xs = [_randn(n, torch.bfloat16, device, seed=r) for r in range(world)]
    for r in (2, 0):                               # rank 1's chunk stays poisoned
        out = ops.quantize(xs[r], fmt, bs, stochastic=True, seed=5, offset=r, out=buf[r * wb:(r + 1) * wb])
        assert out.data_ptr() == buf[r * wb:].data_ptr()
        assert torch.equal(out.cpu(), R.quantize(xs[r].cpu(), fmt, bs, stochastic=True, seed=5, offset=r))
    assert (buf[wb:2 * wb] == 0xAB).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_into_poisoned_and_accumulate(device, fmt, out_dtype):
    n, bs = 1009, 64
    wire = ops.quantize(_randn(n, torch.float32, device, seed=7), fmt, bs)
    out = torch.full((n,), float("nan"), dtype=out_dtype, device=dev(device))
    ops.dequantize(wire, n, fmt, bs, out=out, scale=0.5)
    assert torch.equal(out.cpu(), R.dequantize(wire.cpu(), n, fmt, bs, out_dtype=out_dtype, scale=0.5))
    acc = _randn(n, out_dtype, device, seed=8)
    expect = R.dequantize(wire.cpu(), n, fmt, bs, scale=0.5, out=acc.cpu().clone(), accumulate=True)
    ops.dequantize(wire, n, fmt, bs, out=acc, scale=0.5, accumulate=True)
    assert torch.equal(acc.cpu(), expect)
    out2d = torch.full((n // 1009, 1009), float("nan"), dtype=out_dtype, device=dev(device))   # any shape, flat order
    ops.dequantize(wire, n, fmt, bs, out=out2d)
    assert torch.equal(out2d.reshape(-1).cpu(), R.dequantize(wire.cpu(), n, fmt, bs, out_dtype=out_dtype))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_unaligned_views(device, fmt):
    # views one element into their storage: the CUDA kernels must take their scalar (non-vector) path
    n, bs = 1000, 32
    for dtype in (torch.float32, torch.float16):
        x = _randn(n + 1, dtype, device, seed=21)[1:]
        r = (torch.randn(n + 1, device=dev(device)) * 0.1)[1:]
        r_ref = r.cpu().clone()
        wire = ops.quantize(x, fmt, bs, stochastic=True, seed=2, residual=r)
        assert torch.equal(wire.cpu(), R.quantize(x.cpu(), fmt, bs, stochastic=True, seed=2, residual=r_ref))
        assert torch.equal(r.cpu(), r_ref)
        out = torch.full((n + 1,), float("nan"), dtype=dtype, device=dev(device))[1:]
        ops.dequantize(wire, n, fmt, bs, out=out)
        assert torch.equal(out.cpu(), R.dequantize(wire.cpu(), n, fmt, bs, out_dtype=dtype))


# ---- stochastic rounding ----

@pytest.mark.parametrize("device", devices())
def test_stochastic_rounding_is_deterministic(device):
    x = _randn(3001, torch.float32, device, seed=9)
    for fmt in FORMATS:
        a = ops.quantize(x, fmt, 64, stochastic=True, seed=123, offset=7)
        assert torch.equal(a, ops.quantize(x, fmt, 64, stochastic=True, seed=123, offset=7))
        assert not torch.equal(a, ops.quantize(x, fmt, 64, stochastic=True, seed=123, offset=8))
        assert not torch.equal(a, ops.quantize(x, fmt, 64, stochastic=True, seed=124, offset=7))
        big = ops.quantize(x, fmt, 64, stochastic=True, seed=-1, offset=-(2 ** 63))   # full 64-bit range
        assert torch.equal(big.cpu(), R.quantize(x.cpu(), fmt, 64, stochastic=True, seed=-1, offset=-(2 ** 63)))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_stochastic_rounding_is_unbiased(device, fmt):
    n, bs, trials = 512, 64, 256
    x = _randn(n, torch.float32, device, seed=10)
    acc = torch.zeros(n, dtype=torch.float64, device=dev(device))
    for t in range(trials):
        acc += ops.dequantize(ops.quantize(x, fmt, bs, stochastic=True, seed=77, offset=t), n, fmt, bs).double()
    mean = (acc / trials).cpu()
    wire = ops.quantize(x, fmt, bs)
    gap = _per_elem_scale(wire, n, bs).double()        # a bound on the distance between neighbours
    if fmt in FP8_MBITS:
        mbits, emin = FP8_MBITS[fmt]
        gap = x.abs().cpu().double() * 2.0 ** -mbits + gap * 2.0 ** (emin - mbits)
    # per element the draw is within one gap, so its std is <= gap / 2: 6 sigma over `trials` draws
    assert ((mean - x.cpu().double()).abs() <= 6 * gap / (2 * math.sqrt(trials)) + 1e-7).all()
    rtn = ops.dequantize(wire, n, fmt, bs).cpu().double()
    assert (mean - x.cpu().double()).abs().mean() < 0.5 * (rtn - x.cpu().double()).abs().mean()


# ---- error feedback ----

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_error_feedback_identity(device, fmt):
    n, bs = 2003, 128
    r = torch.zeros(n, device=dev(device))
    sent = torch.zeros(n, dtype=torch.float64, device=dev(device))
    total = torch.zeros(n, dtype=torch.float64, device=dev(device))
    for step in range(6):
        x = _randn(n, torch.bfloat16, device, seed=100 + step)
        v = x.float() + r
        wire = ops.quantize(x, fmt, bs, stochastic=step % 2 == 1, seed=1, offset=step, residual=r)
        d = ops.dequantize(wire, n, fmt, bs)
        s = _per_elem_scale(wire, n, bs).to(dev(device))
        # x + r_old == deQ(q) + r_new within fp32 rounding (of the larger of v and what was sent)
        assert ((d + r) - v).abs().le((v.abs() + s) * 2 ** -22).all()
        sent += d.double()
        total += x.double()
    # nothing is lost over steps: everything not yet sent is in the residual
    assert (sent + r.double() - total).abs().max().item() < 1e-4


# ---- out-of-place error feedback (residual_out) and the reduce's out= ----
# The hooks double-buffer their residuals: read the old one, write the new one elsewhere. It must give the bits of
# the in-place form, leave `residual` untouched and write every element of residual_out (poisoned with NaN first).

def _ef_input(n, dtype, device, seed):
    x = _randn(n, dtype, device, seed)
    if n > 8:
        x[1::7] = -0.0                              # x + 0 turns -0 into +0: residual=None must too (fp8 sign bit)
    if n > 300:
        x[n - 2] = float("nan")                     # a non-finite block: wire NaN, residual 0 there
    return x


def _nan(n, device):
    return torch.full((n,), float("nan"), device=dev(device))


def _check_out_of_place(run, n, device, seed):
    """run(residual, residual_out) -> wire. Compares every out-of-place form with the in-place one."""
    r = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dev(device))
    r_new = r.clone()
    w_ref = run(r_new, None)                                         # in place
    keep, r_out = r.clone(), _nan(n, device)
    assert torch.equal(run(keep, r_out), w_ref)
    assert torch.equal(r_out, r_new) and torch.equal(keep, r)        # written in full; residual only read
    same = r.clone()
    assert torch.equal(run(same, same), w_ref) and torch.equal(same, r_new)
    view = r.clone()
    assert torch.equal(run(view, view.view(-1)[:]), w_ref) and torch.equal(view, r_new)  # same memory, other tensor
    unal = _nan(n + 1, device)[1:]                                   # residual_out off the vector alignment
    assert torch.equal(run(r.clone(), unal), w_ref) and torch.equal(unal, r_new)
    zero = torch.zeros(n, device=dev(device))
    w_zero = run(zero, None)                                         # residual None reads zeros
    r_out = _nan(n, device)
    assert torch.equal(run(None, r_out), w_zero) and torch.equal(r_out, zero)
    return w_ref, r_new


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_residual_out(device, fmt, dtype):
    for i, n in enumerate((0, 1, 31, 257, 1009)):
        bs = 32 if i % 2 else 256
        x = _ef_input(n, dtype, device, seed=40 + i)
        wb = ops.wire_bytes(n, fmt, bs)
        for sr in (False, True):
            def run(res, res_out):
                return ops.quantize(x, fmt, bs, stochastic=sr, seed=3, offset=i, residual=res, residual_out=res_out)

            w_ref, r_new = _check_out_of_place(run, n, device, seed=i)
            r = (torch.randn(n, generator=torch.Generator().manual_seed(i)) * 0.05).to(dev(device))
            r_ref = _nan(n, "cpu")
            ref = R.quantize(x.cpu(), fmt, bs, stochastic=sr, seed=3, offset=i, residual=r.cpu(), residual_out=r_ref)
            assert torch.equal(w_ref.cpu(), ref) and torch.equal(r_new.cpu(), r_ref), (n, sr)
            # out= (a slice of a poisoned send buffer) together with residual_out
            buf = torch.full((wb + 8,), 0xAB, dtype=torch.uint8, device=dev(device))
            keep, r_out = r.clone(), _nan(n, device)
            o = ops.quantize(x, fmt, bs, stochastic=sr, seed=3, offset=i, residual=keep, residual_out=r_out,
                             out=buf[4:4 + wb])
            assert (wb == 0 or o.data_ptr() == buf[4:].data_ptr()) and torch.equal(o, w_ref)
            assert (buf[:4] == 0xAB).all() and (buf[4 + wb:] == 0xAB).all()
            assert torch.equal(r_out, r_new) and torch.equal(keep, r)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_reduce_requantize_residual_out_and_out(device, fmt):
    for world, n in ((1, 1), (3, 257), (2, 1009)):
        bs = 64
        wires = torch.stack([ops.quantize(_ef_input(n, torch.float32, device, seed=60 + r), fmt, bs, stochastic=True,
                                          seed=r) for r in range(world)])
        wb = ops.wire_bytes(n, fmt, bs)
        for sr in (False, True):
            def run(res, res_out):
                return ops.reduce_quantized(wires, n, fmt, bs, scale=0.5, requantize=True, residual=res,
                                            residual_out=res_out, stochastic=sr, seed=8, offset=world)

            w_ref, r_new = _check_out_of_place(run, n, device, seed=world)
            r = (torch.randn(n, generator=torch.Generator().manual_seed(world)) * 0.05).to(dev(device))
            r_ref = _nan(n, "cpu")
            ref = R.reduce_quantized(wires.cpu(), n, fmt, bs, scale=0.5, requantize=True, residual=r.cpu(),
                                     residual_out=r_ref, stochastic=sr, seed=8, offset=world)
            assert torch.equal(w_ref.cpu(), ref) and torch.equal(r_new.cpu(), r_ref), (world, n, sr)
            # out=: one slice of a poisoned all-gather buffer, with and without error feedback
            for res, res_out in ((None, None), (r.clone(), None), (r.clone(), _nan(n, device))):
                buf = torch.full((3 * wb,), 0xAB, dtype=torch.uint8, device=dev(device))
                o = ops.reduce_quantized(wires, n, fmt, bs, scale=0.5, requantize=True, residual=res,
                                         residual_out=res_out, out=buf[wb:2 * wb], stochastic=sr, seed=8,
                                         offset=world)
                expect = run(None if res is None else r.clone(), None)
                assert o.data_ptr() == buf[wb:].data_ptr() and torch.equal(o, expect)
                assert (buf[:wb] == 0xAB).all() and (buf[2 * wb:] == 0xAB).all()
                if res_out is not None:
                    assert torch.equal(res_out, r_new) and torch.equal(res, r)
                elif res is not None:
                    assert torch.equal(res, r_new)


# ---- non-finite input ----

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_non_finite_blocks_stay_non_finite(device, fmt, dtype):
    n, bs = 300, 64
    x = _randn(n, dtype, device, seed=12)
    x[70] = float("inf")
    x[200] = float("nan")
    x[299] = -float("inf")                          # in the partial last block
    r = torch.full((n,), 0.01, device=dev(device))
    wire = ops.quantize(x, fmt, bs, stochastic=True, seed=3, residual=r)
    d = ops.dequantize(wire, n, fmt, bs)
    bad = torch.zeros(n, dtype=torch.bool)
    for b in (1, 3, 4):
        bad[b * bs:(b + 1) * bs] = True
    assert d.cpu()[bad].isnan().all()               # the whole block: GradScaler sees it
    assert d.cpu()[~bad].isfinite().all()
    assert (r.cpu()[bad] == 0).all()                # residual reset: the step is skipped, no lasting poison
    assert r.isfinite().all() and (r.cpu()[~bad] != 0).any()
    # next (finite) step is clean again
    d2 = ops.dequantize(ops.quantize(_randn(n, dtype, device, seed=13), fmt, bs, residual=r), n, fmt, bs)
    assert d2.isfinite().all()
    # the reduce keeps it: one rank's non-finite block makes that block of the sum non-finite
    wires = torch.stack([wire, ops.quantize(_randn(n, dtype, device, seed=14), fmt, bs)])
    s = ops.reduce_quantized(wires, n, fmt, bs)
    assert s.cpu()[bad].isnan().all() and s.cpu()[~bad].isfinite().all()
    rr = torch.ones(n, device=dev(device))
    w2 = ops.reduce_quantized(wires, n, fmt, bs, requantize=True, residual=rr)
    assert ops.dequantize(w2, n, fmt, bs).cpu()[bad].isnan().all()
    assert (rr.cpu()[bad] == 0).all() and rr.isfinite().all()


@pytest.mark.parametrize("device", devices())
def test_overflowing_sum_is_not_laundered(device):
    n = 64
    x = torch.full((n,), 3.0e38, device=dev(device))
    wires = torch.stack([ops.quantize(x, "int8", 32)] * 2)
    assert ops.reduce_quantized(wires, n, "int8", 32).isinf().all()
    assert ops.dequantize(ops.reduce_quantized(wires, n, "int8", 32, requantize=True), n, "int8", 32).isnan().all()


@pytest.mark.parametrize("device", devices())
def test_tiny_and_zero_blocks(device):
    x = torch.zeros(96, device=dev(device))
    x[32:64] = 1e-40                                # scale would be subnormal: sent as zeros, kept in residual
    r = torch.zeros(96, device=dev(device))
    wire = ops.quantize(x, "int8", 32, residual=r)
    assert (_block_scales(wire, 96, 32) == 0).all()
    assert (ops.dequantize(wire, 96, "int8", 32) == 0).all()
    expect = torch.zeros(96).index_fill_(0, torch.arange(32, 64), 1e-40)
    if device == "cpu":
        assert torch.equal(r.cpu(), expect)
    else:                                           # CUDA may flush subnormals (fast math)
        assert ((r.cpu() == expect) | (r.cpu() == 0)).all()


# ---- the fused reduce ----

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_reduce_quantized_matches_reference(device, fmt):
    for world in (1, 2, 3, 4, 5):
        n, bs = 1009 + world, 64
        wires = torch.stack([ops.quantize(_randn(n, torch.float32, device, seed=world * 10 + r), fmt, bs,
                                          stochastic=True, seed=r) for r in range(world)])
        for out_dtype in DTYPES:
            s = ops.reduce_quantized(wires, n, fmt, bs, scale=1.0 / world, out_dtype=out_dtype)
            ref = R.reduce_quantized(wires.cpu(), n, fmt, bs, scale=1.0 / world, out_dtype=out_dtype)
            assert s.dtype == out_dtype and torch.equal(s.cpu(), ref), (world, out_dtype)
        for sr in (False, True):
            r = torch.randn(n, device=dev(device)) * 0.01
            r_ref = r.cpu().clone()
            w = ops.reduce_quantized(wires, n, fmt, bs, scale=0.5, requantize=True, residual=r, stochastic=sr,
                                     seed=4, offset=world)
            ref = R.reduce_quantized(wires.cpu(), n, fmt, bs, scale=0.5, requantize=True, residual=r_ref,
                                     stochastic=sr, seed=4, offset=world)
            assert torch.equal(w.cpu(), ref) and torch.equal(r.cpu(), r_ref), (world, sr)
        w = ops.reduce_quantized(wires, n, fmt, bs, requantize=True)
        assert torch.equal(w.cpu(), R.reduce_quantized(wires.cpu(), n, fmt, bs, requantize=True))


@pytest.mark.parametrize("device", devices())
def test_reduce_quantized_sizes(device):
    for n in (0, 1, 33):
        wires = torch.stack([ops.quantize(torch.randn(n, device=dev(device)), "int4", 32) for _ in range(3)])
        assert torch.equal(ops.reduce_quantized(wires, n, "int4", 32).cpu(), R.reduce_quantized(wires.cpu(), n, "int4", 32))
    empty = torch.empty(0, ops.wire_bytes(40, "int8", 32), dtype=torch.uint8, device=dev(device))
    assert torch.equal(ops.reduce_quantized(empty, 40, "int8", 32).cpu(), torch.zeros(40))
    # the sum is in fixed rank order: the same wires give the same bits
    wires = torch.stack([ops.quantize(torch.randn(999, device=dev(device)) * 10 ** r, "fp8_e5m2") for r in range(4)])
    assert torch.equal(ops.reduce_quantized(wires, 999, "fp8_e5m2"), ops.reduce_quantized(wires, 999, "fp8_e5m2"))


# ---- CPU and CUDA give the same bits ----

@pytest.mark.cpu_vs_cuda
@pytest.mark.parametrize("device", gpu_devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_bits_match_cpu(device, fmt):
    """The CUDA kernels (on the GPU, or emulated) give the CPU kernels' bits: quantize (register-cached and two-pass
    variants: block sizes 32..4096), the reduce and its requantize, dequantize-accumulate; aligned and unaligned
    residual_out; sizes with partial blocks."""
    d = dev(device)   # .to(d, copy=True): with the emulation d is the CPU, and the two sides must not share tensors
    for n in (1, 4096 * 3 + 17, 100003):
        for bs in (32, 256, 512, 1024, 2048, 4096):
            for dtype in DTYPES:
                x = _randn(n, dtype, "cpu", seed=n + bs)
                r = torch.randn(n) * 0.1
                rc = r.to(d, copy=True)
                r0 = r.to(d, copy=True)
                with kernels(device):
                    wc = ops.quantize(x.to(d, copy=True), fmt, bs, stochastic=True, seed=9, offset=bs, residual=rc)
                w = ops.quantize(x, fmt, bs, stochastic=True, seed=9, offset=bs, residual=r)
                assert torch.equal(wc.cpu(), w) and torch.equal(rc.cpu(), r), (n, bs, dtype)
                ro = torch.full((n + 1,), float("nan"), device=d)[1:]   # out of place, unaligned
                with kernels(device):
                    wo = ops.quantize(x.to(d, copy=True), fmt, bs, stochastic=True, seed=9, offset=bs, residual=r0,
                                      residual_out=ro)
                assert torch.equal(wo.cpu(), w) and torch.equal(ro.cpu(), r), (n, bs, dtype)
            w2 = ops.quantize(_randn(n, torch.float32, "cpu", seed=n + bs + 1), fmt, bs)
            wires = torch.stack([w, w2, w])
            with kernels(device):
                got = ops.reduce_quantized(wires.to(d, copy=True), n, fmt, bs).cpu()
            assert torch.equal(got, ops.reduce_quantized(wires, n, fmt, bs))
            r = torch.randn(n) * 0.1
            rc, r0 = r.to(d, copy=True), r.to(d, copy=True)
            with kernels(device):
                wc = ops.reduce_quantized(wires.to(d, copy=True), n, fmt, bs, scale=0.5, requantize=True, residual=rc,
                                          stochastic=True, seed=1, offset=n)
            w = ops.reduce_quantized(wires, n, fmt, bs, scale=0.5, requantize=True, residual=r, stochastic=True,
                                     seed=1, offset=n)
            assert torch.equal(wc.cpu(), w) and torch.equal(rc.cpu(), r), (n, bs)
            buf = torch.full((w.numel() + 4,), 0xAB, dtype=torch.uint8, device=d)
            ro = torch.full((n,), float("nan"), device=d)
            with kernels(device):
                ops.reduce_quantized(wires.to(d, copy=True), n, fmt, bs, scale=0.5, requantize=True, residual=r0,
                                     residual_out=ro, out=buf[4:], stochastic=True, seed=1, offset=n)
            assert torch.equal(buf[4:].cpu(), w) and torch.equal(ro.cpu(), r) and (buf[:4] == 0xAB).all()
            dd = torch.randn(n, dtype=torch.bfloat16)
            dc = dd.to(d, copy=True)
            with kernels(device):
                ops.dequantize(wc, n, fmt, bs, out=dc, scale=0.25, accumulate=True)
            ops.dequantize(w, n, fmt, bs, out=dd, scale=0.25, accumulate=True)
            assert torch.equal(dc.cpu(), dd)


_BASELINE_ISA_SCRIPT = """
import torch
from pyperf import _reference as R, ops
for fmt in ops.QUANT_FORMATS:
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3001) * 5).to(dtype)
        r = torch.randn(3001) * 0.1
        rr = r.clone()
        w = ops.quantize(x, fmt, 64, stochastic=True, seed=3, residual=r)
        assert torch.equal(w, R.quantize(x, fmt, 64, stochastic=True, seed=3, residual=rr)) and torch.equal(r, rr)
        assert torch.equal(ops.dequantize(w, 3001, fmt, 64, out_dtype=dtype), R.dequantize(w, 3001, fmt, 64, out_dtype=dtype))
        ws = torch.stack([w, w, w])
        assert torch.equal(ops.reduce_quantized(ws, 3001, fmt, 64, scale=0.3), R.reduce_quantized(ws, 3001, fmt, 64, scale=0.3))
        xs = [x[:1000], x[1000:1001], x[1001:]]
        n = ops.pack_layout([1000, 1, 2000], 64)[1]
        rt = torch.randn(n) * 0.1
        rr = rt.clone()
        wt = ops.quantize_tensors(xs, fmt, 64, out=torch.empty(ops.wire_bytes(n, fmt, 64), dtype=torch.uint8), residual=rt)
        assert torch.equal(wt, R.quantize_tensors(xs, fmt, 64, out=torch.empty_like(wt), residual=rr)) and torch.equal(rt, rr)
        outs, want = [torch.empty_like(t) for t in xs], [torch.empty_like(t) for t in xs]
        ops.dequantize_tensors(wt, outs, fmt, 64, scale=0.5)
        R.dequantize_tensors(wt, want, fmt, 64, scale=0.5)
        assert all(torch.equal(a, b) for a, b in zip(outs, want))
print("ok")
"""


def test_cpu_baseline_isa_matches_reference():
    # the CPU kernels are also built for AVX2 and picked at run time; check the baseline (SSE2) build as well
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYPERF_NO_AVX2="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _BASELINE_ISA_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


# ---- torch.library contract ----

def _opcheck_cases(device):
    x = torch.randn(300, device=dev(device))
    wire = ops.quantize(x, "int8", 64)
    w4 = ops.quantize(x, "int4", 32)
    wires = torch.stack([wire, wire])
    return [
        (lib(device).quantize.default, (x, "int8", 64, True, 1, 2, torch.zeros(300, device=dev(device)))),
        (lib(device).quantize.default, (x.bfloat16(), "fp8_e4m3", 32, False, 0, 0, None)),
        (lib(device).quantize_into.default,
         (x, "int4", 32, False, 0, 0, None, torch.empty(ops.wire_bytes(300, "int4", 32), dtype=torch.uint8,
                                                        device=dev(device)))),
        (lib(device).dequantize.default, (wire, 300, "int8", 64, torch.bfloat16, 0.5)),
        (lib(device).dequantize_into.default, (w4, 300, "int4", 32, 2.0, True, torch.randn(300, device=dev(device)))),
        (lib(device).reduce_quantized.default, (wires, 300, "int8", 64, 0.5, torch.float32)),
        (lib(device).reduce_requantize.default,
         (wires, 300, "int8", 64, 0.5, True, 3, 4, torch.zeros(300, device=dev(device)))),
        # residual_out: the new residual out of place (residual only read, or None: zeros)
        (lib(device).quantize.default,
         (x, "int8", 64, True, 1, 2, torch.randn(300, device=dev(device)), torch.zeros(300, device=dev(device)))),
        (lib(device).quantize.default, (x.half(), "fp8_e5m2", 64, False, 1, 2, None, torch.zeros(300, device=dev(device)))),
        (lib(device).quantize_into.default,
         (x, "int4", 32, True, 0, 0, torch.randn(300, device=dev(device)), torch.empty(ops.wire_bytes(300, "int4", 32),
          dtype=torch.uint8, device=dev(device)), torch.zeros(300, device=dev(device)))),
        (lib(device).reduce_requantize.default,
         (wires, 300, "int8", 64, 0.5, False, 3, 4, torch.randn(300, device=dev(device)), torch.zeros(300, device=dev(device)))),
        (lib(device).reduce_requantize_into.default,
         (wires, 300, "int8", 64, 0.5, True, 3, 4, None, torch.empty_like(wire))),
        (lib(device).reduce_requantize_into.default,
         (wires, 300, "int8", 64, 0.5, True, 3, 4, torch.randn(300, device=dev(device)), torch.empty_like(wire),
          torch.zeros(300, device=dev(device)))),
    ]


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", devices())
def test_opcheck_residual_is_residual_out(device):
    # the in-place form spelled out of place: one tensor for both mutable arguments
    x = torch.randn(300, device=dev(device))
    r = torch.randn(300, device=dev(device))
    wires = torch.stack([ops.quantize(x, "int8", 64)] * 2)
    torch.library.opcheck(lib(device).quantize.default, (x, "int8", 64, True, 1, 2, r, r))
    torch.library.opcheck(lib(device).reduce_requantize.default, (wires, 300, "int8", 64, 0.5, True, 3, 4, r, r))


def test_torch_compile_fullgraph():
    def step(x, r):
        wire = ops.quantize(x, "int8", 64, stochastic=True, seed=1, offset=2, residual=r)
        return ops.dequantize(wire, x.numel(), "int8", 64, scale=0.5)

    x, r1 = torch.randn(1000), torch.zeros(1000)
    r2 = r1.clone()
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(x, r1)
    assert torch.equal(out, step(x, r2)) and torch.equal(r1, r2)

    def step_oop(x, r, r_out, wires, srv, srv_out, buf):
        wire = ops.quantize(x, "int8", 64, stochastic=True, seed=1, offset=2, residual=r, residual_out=r_out)
        ops.reduce_quantized(wires, x.numel(), "int8", 64, requantize=True, residual=srv, residual_out=srv_out,
                             out=buf)
        return wire

    x, r, srv = torch.randn(1000), torch.randn(1000), torch.randn(1000)
    wires = torch.stack([ops.quantize(x, "int8", 64)] * 2)
    a = [torch.zeros(1000), torch.zeros(1000), torch.zeros_like(wires[0])]
    b = [torch.zeros(1000), torch.zeros(1000), torch.zeros_like(wires[0])]
    w_c = torch.compile(step_oop, backend="aot_eager", fullgraph=True)(x, r, a[0], wires, srv, a[1], a[2])
    w_e = step_oop(x, r.clone(), b[0], wires, srv.clone(), b[1], b[2])
    assert torch.equal(w_c, w_e) and all(torch.equal(u, v) for u, v in zip(a, b))


# ---- bad input ----

def test_bad_input_errors():
    x = torch.randn(100)
    wire = ops.quantize(x, "int8", 32)
    with pytest.raises((RuntimeError, ValueError), match="dtype float32, bfloat16 or float16"):
        ops.quantize(x.double(), "int8")
    with pytest.raises((RuntimeError, ValueError), match="dtype float32, bfloat16 or float16"):
        ops.quantize(torch.ones(10, dtype=torch.int32), "int8")
    for bs in (16, 48, 8192, 0):
        with pytest.raises(ValueError, match="block_size: expected a power of two in"):
            ops.quantize(x, "int8", bs)
        with pytest.raises(ValueError, match="block_size"):
            ops.wire_bytes(100, "int8", bs)
    with pytest.raises(ValueError, match="fmt: expected one of"):
        ops.quantize(x, "int2")
    with pytest.raises(ValueError, match="fmt: expected one of"):
        ops.wire_bytes(10, "fp8")
    with pytest.raises(RuntimeError, match="expected a contiguous tensor"):
        ops.quantize(torch.randn(10, 10).t(), "int8")
    with pytest.raises(RuntimeError, match="wire_bytes.*got 140"):
        ops.dequantize(wire[:-4], 100, "int8", 32)
    with pytest.raises(RuntimeError, match="wire_bytes"):
        ops.dequantize(wire, 200, "int8", 32)
    with pytest.raises(RuntimeError, match="uint8"):
        ops.dequantize(wire.view(torch.int8), 100, "int8", 32)
    with pytest.raises(RuntimeError, match="aligned"):
        buf = torch.zeros(ops.wire_bytes(100, "int8", 32) + 1, dtype=torch.uint8)
        ops.quantize(x, "int8", 32, out=buf[1:])
    with pytest.raises(RuntimeError, match="residual: expected 100 elements, got 99"):
        ops.quantize(x, "int8", residual=torch.zeros(99))
    with pytest.raises(RuntimeError, match="residual: expected a float32 tensor"):
        ops.quantize(x, "int8", residual=torch.zeros(100, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="out: expected wire_bytes"):
        ops.quantize(x, "int8", 32, out=torch.zeros(10, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="out: expected 100 elements"):
        ops.dequantize(wire, 100, "int8", 32, out=torch.zeros(99))
    with pytest.raises(RuntimeError, match="out_dtype"):
        ops.dequantize(wire, 100, "int8", 32, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        ops.dequantize(wire, 100, "int8", 32, accumulate=True)
    with pytest.raises(RuntimeError, match=r"wires: expected shape \[W, wire_bytes"):
        ops.reduce_quantized(wire, 100, "int8", 32)
    with pytest.raises(RuntimeError, match=r"wires: expected shape"):
        ops.reduce_quantized(torch.stack([wire, wire]), 100, "int4", 32)
    with pytest.raises(ValueError, match="only with requantize=True"):
        ops.reduce_quantized(torch.stack([wire]), 100, "int8", 32, residual=torch.zeros(100))
    with pytest.raises(RuntimeError, match="residual: expected 100 elements"):
        ops.reduce_quantized(torch.stack([wire]), 100, "int8", 32, requantize=True, residual=torch.zeros(3))



def test_bad_residual_out_and_out_errors():
    x = torch.randn(100)
    r = torch.zeros(100)
    wires = torch.stack([ops.quantize(x, "int8", 32)] * 2)
    wb = ops.wire_bytes(100, "int8", 32)

    def q(**kw):
        return ops.quantize(x, "int8", 32, residual=r, **kw)

    def red(**kw):
        return ops.reduce_quantized(wires, 100, "int8", 32, requantize=True, residual=r, **kw)

    for f in (q, red):
        with pytest.raises(RuntimeError, match="residual_out: expected a float32 tensor, got dtype BFloat16"):
            f(residual_out=torch.zeros(100, dtype=torch.bfloat16))
        with pytest.raises(RuntimeError, match="residual_out: expected 100 elements, got 101"):
            f(residual_out=torch.zeros(101))
        with pytest.raises(RuntimeError, match="residual_out: expected a contiguous tensor"):
            f(residual_out=torch.zeros(200)[::2])
        buf = torch.zeros(101)
        with pytest.raises(RuntimeError, match="residual_out: expected residual itself .* partial overlap"):
            ops.quantize(x, "int8", 32, residual=buf[:100], residual_out=buf[1:])
        with pytest.raises(RuntimeError, match="out: expected a uint8 wire"):
            f(out=torch.zeros(wb, dtype=torch.uint8).view(torch.int8))
        with pytest.raises(RuntimeError, match="out: expected wire_bytes.*got %d" % (wb - 4)):
            f(out=torch.zeros(wb - 4, dtype=torch.uint8))
        with pytest.raises(RuntimeError, match="out: expected a contiguous tensor"):
            f(out=torch.zeros(2 * wb, dtype=torch.uint8)[::2])
        with pytest.raises(RuntimeError, match="out: expected a 4-byte aligned wire"):
            f(out=torch.zeros(wb + 4, dtype=torch.uint8)[2:2 + wb])
    with pytest.raises(RuntimeError, match="out: expected memory apart from wires"):
        red(out=wires[1])
    with pytest.raises(RuntimeError, match="out: expected memory apart from wires"):
        big = torch.zeros(3 * wb, dtype=torch.uint8)
        ops.reduce_quantized(big[:2 * wb].view(2, wb), 100, "int8", 32, requantize=True, out=big[wb + 4:2 * wb + 4])
    # the same memory under another shape is still the in-place form
    r2d = torch.randn(10, 10)
    r_ref = r2d.clone().view(-1)
    w_ref = ops.quantize(x, "int8", 32, residual=r_ref)
    assert torch.equal(ops.quantize(x, "int8", 32, residual=r2d, residual_out=r2d.view(-1)), w_ref)
    assert torch.equal(r2d.view(-1), r_ref)
    with pytest.raises(RuntimeError, match="residual_out: expected 100 elements"):
        ops.reduce_quantized(wires, 100, "int8", 32, requantize=True, residual_out=torch.zeros(3),
                             out=torch.empty(wb, dtype=torch.uint8))
    for kw in (dict(residual_out=torch.zeros(100)), dict(out=torch.empty(wb, dtype=torch.uint8))):
        with pytest.raises(ValueError, match="apply only with requantize=True"):
            ops.reduce_quantized(wires, 100, "int8", 32, **kw)
    assert (r == 0).all()                           # nothing was written by a rejected call


@pytest.mark.parametrize("device", ["cuda"])   # the emulation computes on CPU tensors: no device to mismatch
def test_residual_out_and_out_device_errors(device):
    x = torch.randn(100, device=dev(device))
    wires = torch.stack([ops.quantize(x, "int8", 32)] * 2)
    with pytest.raises(RuntimeError, match="residual_out: expected a tensor on"):
        ops.quantize(x, "int8", 32, residual_out=torch.zeros(100))
    with pytest.raises(RuntimeError, match="residual_out: expected a tensor on"):
        ops.reduce_quantized(wires, 100, "int8", 32, requantize=True, residual_out=torch.zeros(100))
    with pytest.raises(RuntimeError, match="out: expected a tensor on"):
        ops.reduce_quantized(wires, 100, "int8", 32, requantize=True,
                             out=torch.empty(ops.wire_bytes(100, "int8", 32), dtype=torch.uint8))
