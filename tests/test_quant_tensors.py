"""The many-tensor quant ops (ops.quantize_tensors / dequantize_tensors / reduce_quantized_tensors, kernels in csrc/cpu/quant.cpp and
csrc/cuda/quant.cu): bit-identical to quantize(pack(xs, align=block_size)), unpack(dequantize(...)), unpack(reduce_quantized(...)) and to the
reference, on lists with empty tensors, tensors smaller than a block and partial last blocks, every format and
dtype, every error-feedback form, poisoned outputs; opcheck and the error messages."""
import pytest
import torch

from conftest import dev, devices, gpu_devices, kernels, lib, stable_seed
from pyperf import _reference as R
from pyperf import ops

FORMATS = ops.QUANT_FORMATS
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# empty tensors, one value, less than a block, exact multiples of the block, partial last blocks
SHAPES = [(0,), (1,), (31,), (64,), (3, 67), (0, 5), (256,), (1009,), (2, 2, 33)]


def _tensors(shapes, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        x = torch.randn(n, generator=g) * 3 * torch.exp2(torch.randint(-6, 3, (n,), generator=g).float())
        out.append(x.reshape(s).to(dtype).to(dev(device)))
    return out


def _padded(shapes, bs):
    return ops.pack_layout([torch.Size(s).numel() for s in shapes], bs)[1]


def _poisoned_wire(nbytes, device):
    return torch.full((nbytes,), 0xAB, dtype=torch.uint8, device=dev(device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ef", ["none", "in_place", "out_of_place", "zeros_out"])
def test_quantize_tensors_matches_pack_then_quantize(device, fmt, dtype, ef):
    for bs in (32, 64, 256):
        xs = _tensors(SHAPES, dtype, device, stable_seed(fmt, str(dtype), ef, bs))
        n = _padded(SHAPES, bs)
        nbytes = ops.wire_bytes(n, fmt, bs)
        r0 = torch.randn(n, generator=torch.Generator().manual_seed(bs)).to(dev(device)) * 0.01
        res = {"none": None, "in_place": r0.clone(), "out_of_place": r0.clone(), "zeros_out": None}[ef]
        res_out = torch.full((n,), float("nan"), device=dev(device)) if ef in ("out_of_place", "zeros_out") else None
        want_res = None if ef == "none" else (r0.clone() if ef != "zeros_out" else None)
        want_out = torch.empty(n, device=dev(device)) if ef == "zeros_out" else None

        got = ops.quantize_tensors(xs, fmt, bs, out=_poisoned_wire(nbytes, device), residual=res,
                                   residual_out=res_out)
        packed = ops.pack(xs, out_dtype=torch.float32, align=bs) if xs else torch.zeros(0, device=dev(device))
        want = ops.quantize(packed, fmt, bs, residual=want_res, residual_out=want_out)
        ref = R.quantize_tensors([x.cpu() for x in xs], fmt, bs, out=torch.empty(nbytes, dtype=torch.uint8),
                                 residual=None if want_res is None or ef == "none" else r0.cpu().clone(),
                                 residual_out=None if ef != "zeros_out" else torch.empty(n))
        assert torch.equal(got, want) and torch.equal(got.cpu(), ref), (bs, "wire")
        if ef == "in_place":
            assert torch.equal(res, want_res)
        elif ef == "out_of_place":
            assert torch.equal(res_out, want_res) and torch.equal(res, r0)   # residual only read
        elif ef == "zeros_out":
            assert torch.equal(res_out, want_out)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_tensors_matches_dequantize_then_unpack(device, fmt, dtype):
    for bs in (32, 256):
        for scale in (1.0, 0.5, -3.0):
            src = _tensors(SHAPES, torch.float32, device, stable_seed(fmt, bs))
            n = _padded(SHAPES, bs)
            wire = ops.quantize_tensors(src, fmt, bs, out=_poisoned_wire(ops.wire_bytes(n, fmt, bs), device))
            outs = [torch.full(s, float("nan"), dtype=dtype, device=dev(device)) for s in SHAPES]
            ops.dequantize_tensors(wire, outs, fmt, bs, scale=scale)
            want = [torch.empty(s, dtype=dtype, device=dev(device)) for s in SHAPES]
            ops.unpack(ops.dequantize(wire, n, fmt, bs, scale=scale), want, align=bs)
            ref = [torch.empty(s, dtype=dtype) for s in SHAPES]
            R.dequantize_tensors(wire.cpu(), ref, fmt, bs, scale=scale)
            for o, w, r in zip(outs, want, ref):
                assert torch.equal(o, w) and torch.equal(o.cpu(), r), (bs, scale, o.shape)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_quantized_tensors_matches_reduce_then_unpack(device, fmt, dtype):
    for bs, W in ((32, 1), (64, 2), (256, 3)):
        n = _padded(SHAPES, bs)
        nbytes = ops.wire_bytes(n, fmt, bs)
        wires = torch.stack([ops.quantize_tensors(_tensors(SHAPES, dtype, device, stable_seed(fmt, bs, r)), fmt, bs,
                                                  out=_poisoned_wire(nbytes, device)) for r in range(W)])
        for scale in (1.0, 1.0 / W, -0.75):
            outs = [torch.full(s, float("nan"), dtype=dtype, device=dev(device)) for s in SHAPES]
            ops.reduce_quantized_tensors(wires, outs, fmt, bs, scale=scale)
            want = [torch.empty(s, dtype=dtype, device=dev(device)) for s in SHAPES]
            ops.unpack(ops.reduce_quantized(wires, n, fmt, bs, scale=scale), want, align=bs)
            ref = [torch.empty(s, dtype=dtype) for s in SHAPES]
            R.reduce_quantized_tensors(wires.cpu(), ref, fmt, bs, scale=scale)
            for o, w, r in zip(outs, want, ref):
                assert torch.equal(o, w) and torch.equal(o.cpu(), r), (bs, W, scale, o.shape)
        # rows spaced further apart (the wire is a column slice of a gather buffer with more after each wire)
        wide = torch.full((W, nbytes + 12), 0xCD, dtype=torch.uint8, device=dev(device))
        wide[:, :nbytes] = wires
        outs = [torch.full(s, float("nan"), dtype=dtype, device=dev(device)) for s in SHAPES]
        ops.reduce_quantized_tensors(wide[:, :nbytes], outs, fmt, bs, scale=0.5)
        ops.unpack(ops.reduce_quantized(wires, n, fmt, bs, scale=0.5), want, align=bs)
        assert all(torch.equal(o, w) for o, w in zip(outs, want)), (bs, W, "strided rows")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduce_quantized_tensors_own_row_is_exact(device, fmt, dtype):
    """own/own_row: the own row's term is its exact values in rank order, its wire never read (poisoned here)."""
    for bs, W in ((32, 1), (64, 2), (256, 3), (32, 5)):
        n = _padded(SHAPES, bs)
        nbytes = ops.wire_bytes(n, fmt, bs)
        for own_row in sorted({0, W // 2, W - 1}):
            own = _tensors(SHAPES, dtype, device, stable_seed("own", fmt, bs, own_row))
            wires = torch.stack([_poisoned_wire(nbytes, device) if r == own_row else
                                 ops.quantize_tensors(_tensors(SHAPES, dtype, device, stable_seed(fmt, bs, r)), fmt,
                                                      bs, out=_poisoned_wire(nbytes, device)) for r in range(W)])
            for scale in (1.0 / W, -0.75):
                outs = [torch.full(s, float("nan"), dtype=dtype, device=dev(device)) for s in SHAPES]
                ops.reduce_quantized_tensors(wires, outs, fmt, bs, scale=scale, own=own, own_row=own_row)
                ref = [torch.empty(s, dtype=dtype) for s in SHAPES]
                R.reduce_quantized_tensors(wires.cpu(), ref, fmt, bs, scale=scale, own=[o.cpu() for o in own],
                                           own_row=own_row)
                # the same sum written out by hand: fp32, rank order, the own term exact
                acc = torch.zeros(n)
                for r in range(W):
                    acc += (R.pack([o.cpu() for o in own], out_dtype=torch.float32, align=bs) if r == own_row else
                            R.dequantize(wires[r].cpu(), n, fmt, bs, out_dtype=torch.float32))
                hand = [torch.empty(s, dtype=dtype) for s in SHAPES]
                R.unpack((acc * scale).to(dtype), hand, align=bs)
                for o, r, h in zip(outs, ref, hand):
                    assert torch.equal(o.cpu(), r) and torch.equal(r, h), (bs, W, own_row, scale, o.shape)
        # in place: own is outs (each block is read before it is written)
        if W > 1:
            outs = _tensors(SHAPES, dtype, device, 3)
            own = [o.clone() for o in outs]
            want = [torch.empty(s, dtype=dtype, device=dev(device)) for s in SHAPES]
            ops.reduce_quantized_tensors(wires, want, fmt, bs, scale=0.5, own=own, own_row=W - 1)
            ops.reduce_quantized_tensors(wires, outs, fmt, bs, scale=0.5, own=outs, own_row=W - 1)
            assert all(torch.equal(a, b) for a, b in zip(outs, want)), (bs, W, "in place")


@pytest.mark.parametrize("device", devices())
def test_non_finite_values_come_through(device):
    xs = _tensors([(300,), (40,)], torch.float32, device, 5)
    xs[0][7] = float("inf")
    xs[1][3] = float("nan")
    n = _padded([(300,), (40,)], 64)
    res = torch.zeros(n, device=dev(device))
    wire = ops.quantize_tensors(xs, "int8", 64, out=_poisoned_wire(ops.wire_bytes(n, "int8", 64), device),
                                residual=res)
    outs = [torch.zeros(300, device=dev(device)), torch.zeros(40, device=dev(device))]
    ops.dequantize_tensors(wire, outs, "int8", 64)
    assert not torch.isfinite(outs[0][:64]).all() and not torch.isfinite(outs[1]).all()
    assert torch.isfinite(outs[0][64:]).all()             # only the blocks holding inf/nan
    want_res = torch.zeros(n)
    R.quantize_tensors([x.cpu() for x in xs], "int8", 64, out=torch.empty_like(wire.cpu()), residual=want_res)
    assert torch.equal(res.cpu(), want_res)


@pytest.mark.parametrize("device", devices())
def test_empty_list(device):
    wire = torch.empty(0, dtype=torch.uint8, device=dev(device))
    assert ops.quantize_tensors([], "int8", 64, out=wire).numel() == 0
    ops.dequantize_tensors(wire, [], "int8", 64)
    ops.quantize_tensors([torch.empty(0, device=dev(device))], "int4", 64, out=wire)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    xs = [torch.randn(100, device=dev(device)), torch.randn(3, 50, device=dev(device))]
    n = _padded([(100,), (3, 50)], 64)
    nbytes = ops.wire_bytes(n, "int8", 64)
    wire = ops.quantize_tensors(xs, "int8", 64, out=torch.empty(nbytes, dtype=torch.uint8, device=dev(device)))
    cases = [
        (lib(device).quantize_tensors_into.default,
         (xs, "int8", 64, None, torch.empty(nbytes, dtype=torch.uint8, device=dev(device)))),
        (lib(device).quantize_tensors_into.default,
         (xs, "int8", 64, torch.randn(n, device=dev(device)), torch.empty(nbytes, dtype=torch.uint8, device=dev(device)))),
        (lib(device).quantize_tensors_into.default,
         ([x.bfloat16() for x in xs], "int8", 64, torch.randn(n, device=dev(device)),
          torch.empty(nbytes, dtype=torch.uint8, device=dev(device)), torch.zeros(n, device=dev(device)))),
        (lib(device).dequantize_tensors_.default,
         (wire, "int8", 64, 0.5, [torch.empty(100, device=dev(device)), torch.empty(3, 50, device=dev(device))])),
        (lib(device).dequantize_tensors_.default,
         (wire, "int8", 64, 1.0, [torch.empty(100, dtype=torch.half, device=dev(device)),
                                  torch.empty(3, 50, dtype=torch.half, device=dev(device))])),
        (lib(device).reduce_quantized_tensors_.default,
         (torch.stack([wire, wire]), "int8", 64, 0.5, [torch.empty(100, device=dev(device)),
                                                       torch.empty(3, 50, device=dev(device))])),
        (lib(device).reduce_quantized_tensors_.default,
         (torch.stack([wire, wire]), "int8", 64, 0.5, [torch.empty(100, device=dev(device)),
                                                       torch.empty(3, 50, device=dev(device))], xs, 1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_bad_input_errors():
    xs = [torch.randn(100), torch.randn(50)]
    n = _padded([(100,), (50,)], 64)
    wire = torch.empty(ops.wire_bytes(n, "int8", 64), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"xs\[1\]: expected dtype Float like xs\[0\], got BFloat16"):
        ops.quantize_tensors([xs[0], xs[1].bfloat16()], "int8", 64, out=wire)
    with pytest.raises(RuntimeError, match=r"xs\[0\]: expected a contiguous tensor"):
        ops.quantize_tensors([torch.randn(10, 20).t(), xs[1]], "int8", 64, out=wire)
    with pytest.raises(RuntimeError, match="xs: expected dtype float32, bfloat16 or float16, got Int"):
        ops.quantize_tensors([torch.ones(100, dtype=torch.int32)], "int8", 64, out=wire)
    with pytest.raises(RuntimeError, match=r"out: expected wire_bytes\(192, fmt, 64\) = 204 bytes, got 203"):
        ops.quantize_tensors(xs, "int8", 64, out=wire[:-1])
    with pytest.raises(RuntimeError, match="out: expected a uint8 wire"):
        ops.quantize_tensors(xs, "int8", 64, out=torch.empty(204, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="residual: expected 192 elements, got 150"):
        ops.quantize_tensors(xs, "int8", 64, out=wire, residual=torch.zeros(150))
    with pytest.raises(RuntimeError, match="residual_out: expected a float32 tensor"):
        ops.quantize_tensors(xs, "int8", 64, out=wire, residual_out=torch.zeros(n, dtype=torch.half))
    with pytest.raises(ValueError, match="block_size: expected a power of two in"):
        ops.quantize_tensors(xs, "int8", 48, out=wire)
    with pytest.raises(ValueError, match="fmt: expected one of"):
        ops.quantize_tensors(xs, "int3", 64, out=wire)
    with pytest.raises(RuntimeError, match=r"wire: expected wire_bytes\(192, fmt, 64\) = 204 bytes, got 100"):
        ops.dequantize_tensors(wire[:100], [torch.empty(100), torch.empty(50)], "int8", 64)
    with pytest.raises(RuntimeError, match=r"outs\[1\]: expected dtype Float like outs\[0\], got Half"):
        ops.dequantize_tensors(wire, [torch.empty(100), torch.empty(50, dtype=torch.half)], "int8", 64)
    with pytest.raises(RuntimeError, match=r"outs\[0\]: expected a contiguous tensor"):
        ops.dequantize_tensors(wire, [torch.empty(20, 5).t(), torch.empty(50)], "int8", 64)
    with pytest.raises(RuntimeError, match=r"wires: expected shape \[W, wire_bytes\(192, fmt, 64\) = 204\]"):
        ops.reduce_quantized_tensors(torch.stack([wire, wire])[:, :-4], [torch.empty(100), torch.empty(50)], "int8",
                                     64)
    wide = torch.zeros(2, 220, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="wires: expected 4-byte aligned rows"):
        ops.reduce_quantized_tensors(wide[:, 1:205], [torch.empty(100), torch.empty(50)], "int8", 64)
    with pytest.raises(RuntimeError, match="wires: expected rows of contiguous bytes"):
        ops.reduce_quantized_tensors(torch.zeros(204, 2, dtype=torch.uint8).t(), [torch.empty(100), torch.empty(50)],
                                     "int8", 64)
    with pytest.raises(RuntimeError, match=r"outs\[1\]: expected dtype Float like outs\[0\], got Half"):
        ops.reduce_quantized_tensors(torch.stack([wire, wire]), [torch.empty(100), torch.empty(50).half()], "int8",
                                     64)
    wires, outs = torch.stack([wire, wire]), [torch.empty(100), torch.empty(50)]
    with pytest.raises(ValueError, match="own and own_row go together"):
        ops.reduce_quantized_tensors(wires, outs, "int8", 64, own=xs)
    with pytest.raises(RuntimeError, match=r"own_row: expected a row of wires in \[0, 2\) with own, got 2"):
        ops.reduce_quantized_tensors(wires, outs, "int8", 64, own=xs, own_row=2)
    with pytest.raises(RuntimeError, match="own: expected 2 tensors \\(one per tensor of outs\\), got 1"):
        ops.reduce_quantized_tensors(wires, outs, "int8", 64, own=xs[:1], own_row=0)
    with pytest.raises(RuntimeError, match=r"own\[1\]: expected 50 elements like outs\[1\], got 49"):
        ops.reduce_quantized_tensors(wires, outs, "int8", 64, own=[xs[0], xs[1][:49]], own_row=0)
    with pytest.raises(RuntimeError, match=r"own\[0\]: expected dtype Float like outs, got BFloat16"):
        ops.reduce_quantized_tensors(wires, outs, "int8", 64, own=[x.bfloat16() for x in xs], own_row=0)
    with pytest.raises(RuntimeError, match=r"own\[0\]: expected a contiguous tensor"):
        ops.reduce_quantized_tensors(wires, outs, "int8", 64, own=[torch.randn(20, 5).t(), xs[1]], own_row=0)
    with pytest.raises(RuntimeError, match="own_row: expected -1 without own, got 0"):
        lib("cpu").reduce_quantized_tensors_(wires, "int8", 64, 1.0, outs, None, 0)


@pytest.mark.cpu_vs_cuda
@pytest.mark.parametrize("device", gpu_devices())
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_bits_match_cpu(device, fmt):
    """CUDA (on the GPU, or emulated; composed there of pack + quantize and dequantize / reduce + unpack) against the
    fused CPU kernels, bit for bit: empty and partial-block tensors, a list spanning several blocks of 4096."""
    d = dev(device)   # .to(d, copy=True): with the emulation d is the CPU, and the two sides must not share tensors
    shapes = SHAPES + [(4096 * 3 + 17,)]
    for bs in (32, 256, 4096):
        for dtype in DTYPES:
            xs = _tensors(shapes, dtype, "cpu", stable_seed("cuda", fmt, bs, str(dtype)))
            n = _padded(shapes, bs)
            r = torch.randn(n) * 0.1
            rc = r.to(d, copy=True)
            ro = torch.full((n,), float("nan"), device=d)
            nbytes = ops.wire_bytes(n, fmt, bs)
            with kernels(device):
                wc = ops.quantize_tensors([x.to(d, copy=True) for x in xs], fmt, bs,
                                          out=_poisoned_wire(nbytes, device), residual=rc, residual_out=ro)
            w = ops.quantize_tensors(xs, fmt, bs, out=_poisoned_wire(nbytes, "cpu"), residual=r)
            assert torch.equal(wc.cpu(), w) and torch.equal(ro.cpu(), r), (bs, dtype)
            outs_c = [torch.full(s, float("nan"), dtype=dtype, device=d) for s in shapes]
            outs = [torch.full(s, float("nan"), dtype=dtype) for s in shapes]
            with kernels(device):
                ops.dequantize_tensors(wc, outs_c, fmt, bs, scale=0.5)
            ops.dequantize_tensors(w, outs, fmt, bs, scale=0.5)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(outs_c, outs)), (bs, dtype)
            wires = torch.stack([w, w, w])
            with kernels(device):
                ops.reduce_quantized_tensors(wires.to(d, copy=True), outs_c, fmt, bs, scale=1 / 3)
            ops.reduce_quantized_tensors(wires, outs, fmt, bs, scale=1 / 3)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(outs_c, outs)), (bs, dtype)
            # the own row exact (its wire poisoned)
            own = _tensors(shapes, dtype, "cpu", stable_seed("own", fmt, bs))
            wires[1] = _poisoned_wire(nbytes, "cpu")
            with kernels(device):
                ops.reduce_quantized_tensors(wires.to(d, copy=True), outs_c, fmt, bs, scale=1 / 3,
                                             own=[o.to(d, copy=True) for o in own], own_row=1)
            ops.reduce_quantized_tensors(wires, outs, fmt, bs, scale=1 / 3, own=own, own_row=1)
            assert all(torch.equal(a.cpu(), b) for a, b in zip(outs_c, outs)), (bs, dtype, "own")
