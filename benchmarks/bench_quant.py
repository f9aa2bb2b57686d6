"""Blockwise gradient quantization: pyperf's fused kernels against the plain-torch implementation a user would write
(pyperf/_reference.py, eager) and torch.compile of it.

    python3 -m pyperf.bench quant [--quick] [--dtype fp32|bf16|fp16] [--sizes 1M,64M]

bytes per call = each input read once + each output written once: x + wire (+ residual read and written);
dequantize: wire + output; reduce: W wires + output (or + the requantized wire and the residual). The eager and
compiled baselines draw stochastic-rounding uniforms with torch.rand (what a user would do), pyperf uses Philox.
"""
import torch

from pyperf import _reference as R
from pyperf import ops
from pyperf.bench.case import Case

BLOCK = 256
WORLD = 4


def _compiled(fn, label):
    """torch.compile(fn), compiled on first call; a compile failure makes this impl raise with the reason (the
    harness records it as skipped) instead of stopping the run, and is not retried."""
    state = {}

    def run(*args, **kwargs):
        if "error" in state:
            raise RuntimeError(state["error"])
        if "fn" not in state:
            state["fn"] = torch.compile(fn, dynamic=False)
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure is a reason to skip, not to crash
            first = (str(e).strip().splitlines() or [""])[0][:200]
            state["error"] = "torch.compile of %s failed: %s: %s" % (label, type(e).__name__, first)
            raise RuntimeError(state["error"]) from e

    return run


def _sizes(device, quick, sizes):
    if sizes:
        return list(sizes)
    if device.startswith("cuda"):
        return [1 << 24] if quick else [16384 * 4096]      # the design's reference size (64M values)
    return [1 << 18] if quick else [1 << 22]


def _elt(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _quantize_cases(device, dtype, n, tag):
    out = []

    def setup():
        return {"x": torch.randn(n, device=device, dtype=dtype), "r": torch.zeros(n, device=device)}

    for fmt in ("int8", "int4", "fp8_e4m3"):
        wb = ops.wire_bytes(n, fmt, BLOCK)

        def eager(inp, fmt=fmt):
            return R.quantize(inp["x"], fmt, BLOCK)

        out.append(Case(
            group="quant", name="quantize %s %s" % (fmt, tag), setup=setup,
            impls={"pyperf": lambda inp, fmt=fmt: ops.quantize(inp["x"], fmt, BLOCK),
                   "torch eager": eager,
                   "torch.compile": _compiled(eager, "quantize " + fmt)},
            bytes=n * _elt(dtype) + wb, extra={"numel": n, "fmt": fmt, "block_size": BLOCK}))

    wb = ops.wire_bytes(n, "int8", BLOCK)

    def eager_sr_ef(inp):
        u = torch.rand(n, device=device)
        return R.quantize(inp["x"], "int8", BLOCK, stochastic=True, residual=inp["r"], uniform=u)

    out.append(Case(
        group="quant", name="quantize int8 +SR +EF %s" % tag, setup=setup,
        impls={"pyperf": lambda inp: ops.quantize(inp["x"], "int8", BLOCK, stochastic=True, seed=1, offset=2,
                                                  residual=inp["r"]),
               "torch eager": eager_sr_ef,
               "torch.compile": _compiled(eager_sr_ef, "quantize int8 +SR +EF")},
        bytes=n * _elt(dtype) + wb + 8 * n, extra={"numel": n, "fmt": "int8", "block_size": BLOCK}))
    return out


def _dequantize_case(device, dtype, n, tag):
    wb = ops.wire_bytes(n, "int8", BLOCK)

    def setup():
        return {"wire": ops.quantize(torch.randn(n, device=device), "int8", BLOCK)}

    def eager(inp):
        return R.dequantize(inp["wire"], n, "int8", BLOCK, out_dtype=dtype)

    return Case(
        group="quant", name="dequantize int8 %s" % tag, setup=setup,
        impls={"pyperf": lambda inp: ops.dequantize(inp["wire"], n, "int8", BLOCK, out_dtype=dtype),
               "torch eager": eager,
               "torch.compile": _compiled(eager, "dequantize int8")},
        bytes=wb + n * _elt(dtype), extra={"numel": n, "fmt": "int8", "block_size": BLOCK})


def _reduce_cases(device, dtype, n, tag):
    chunk = n // WORLD                                  # one rank's share of the bucket in the two-shot reduce
    wb = ops.wire_bytes(chunk, "int8", BLOCK)

    def setup():
        wires = torch.stack([ops.quantize(torch.randn(chunk, device=device), "int8", BLOCK)
                             for _ in range(WORLD)])
        return {"wires": wires, "r": torch.zeros(chunk, device=device)}

    def eager(inp):
        return R.reduce_quantized(inp["wires"], chunk, "int8", BLOCK, scale=1.0 / WORLD)

    def eager_rq(inp):
        u = torch.rand(chunk, device=device)
        return R.reduce_quantized(inp["wires"], chunk, "int8", BLOCK, scale=1.0 / WORLD, requantize=True,
                                  residual=inp["r"], stochastic=True, uniform=u)

    extra = {"numel": chunk, "world": WORLD, "fmt": "int8", "block_size": BLOCK}
    return [
        Case(group="quant", name="reduce int8 W=%d %s" % (WORLD, tag), setup=setup,
             impls={"pyperf": lambda inp: ops.reduce_quantized(inp["wires"], chunk, "int8", BLOCK,
                                                               scale=1.0 / WORLD),
                    "torch eager": eager,
                    "torch.compile": _compiled(eager, "reduce int8")},
             bytes=WORLD * wb + 4 * chunk, extra=extra),
        Case(group="quant", name="reduce+requantize int8 +SR +EF W=%d %s" % (WORLD, tag), setup=setup,
             impls={"pyperf": lambda inp: ops.reduce_quantized(inp["wires"], chunk, "int8", BLOCK,
                                                               scale=1.0 / WORLD, requantize=True,
                                                               residual=inp["r"], stochastic=True, seed=3),
                    "torch eager": eager_rq,
                    "torch.compile": _compiled(eager_rq, "reduce+requantize int8")},
             bytes=WORLD * wb + wb + 8 * chunk, extra=extra),
    ]


def _bucket_shapes(n):
    """A DDP bucket of about n values: transformer-block-like matrices and vectors, most not a multiple of the
    block size at the end, so the padded layout matters."""
    d = 1
    while 12 * d * d < n:
        d *= 2
    d = max(d // 2, 64)
    shapes, total = [], 0
    while total < n:
        for s in ((d, 4 * d), (4 * d,), (4 * d, d), (d,), (3 * d, d), (3 * d,), (d, d), (d + 3,)):
            shapes.append(s)
            total += torch.Size(s).numel()
    return shapes


def _tensors_cases(device, dtype, n, tag):
    """The DDP hook's per-bucket work: quantize a bucket's gradients (+EF, out of place) and, with 2 ranks, sum the
    gathered wires back into them; fused (*_tensors ops) vs the pack / unpack composition it replaced."""
    shapes = _bucket_shapes(n)
    total = ops.pack_layout([torch.Size(s).numel() for s in shapes], BLOCK)[1]
    numel = sum(torch.Size(s).numel() for s in shapes)
    wb = ops.wire_bytes(total, "int8", BLOCK)

    def setup():
        grads = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
        return {"grads": grads, "r": torch.zeros(total, device=device), "r2": torch.zeros(total, device=device),
                "wire": torch.empty(wb, dtype=torch.uint8, device=device),
                "P": torch.empty(total, device=device),
                "wires": torch.stack([ops.quantize(torch.randn(total, device=device), "int8", BLOCK)
                                      for _ in range(2)])}

    def composed_q(inp):
        P = ops.pack(inp["grads"], out_dtype=torch.float32, align=BLOCK, out=inp["P"])
        return ops.quantize(P, "int8", BLOCK, residual=inp["r"], residual_out=inp["r2"], out=inp["wire"])

    def eager_q(inp):
        return R.quantize_tensors(inp["grads"], "int8", BLOCK, out=inp["wire"], residual=inp["r"],
                                  residual_out=inp["r2"])

    def composed_r(inp):
        ops.unpack(ops.reduce_quantized(inp["wires"], total, "int8", BLOCK, scale=0.5), inp["grads"], align=BLOCK)

    def eager_r(inp):
        R.reduce_quantized_tensors(inp["wires"], inp["grads"], "int8", BLOCK, scale=0.5)

    extra = {"tensors": len(shapes), "numel": numel, "fmt": "int8", "block_size": BLOCK}
    return [
        Case(group="quant", name="quantize_tensors int8 +EF bucket %s" % tag, setup=setup,
             impls={"pyperf quantize_tensors": lambda inp: ops.quantize_tensors(
                        inp["grads"], "int8", BLOCK, out=inp["wire"], residual=inp["r"], residual_out=inp["r2"]),
                    "pyperf pack + quantize": composed_q,
                    "torch eager": eager_q},
             baseline="pyperf pack + quantize",
             bytes=numel * _elt(dtype) + 8 * total + wb, extra=extra),
        Case(group="quant", name="reduce_quantized_tensors int8 W=2 bucket %s" % tag, setup=setup,
             impls={"pyperf reduce_quantized_tensors": lambda inp: ops.reduce_quantized_tensors(
                        inp["wires"], inp["grads"], "int8", BLOCK, scale=0.5),
                    "pyperf reduce + unpack": composed_r,
                    "torch eager": eager_r},
             baseline="pyperf reduce + unpack",
             bytes=2 * wb + numel * _elt(dtype), extra=extra),
    ]


def cases(device, dtype=None, quick=False, sizes=None):
    dtype = dtype or torch.float32
    out = []
    for n in _sizes(device, quick, sizes):
        tag = "%s %s" % (_human(n), str(dtype).replace("torch.", ""))
        out += _quantize_cases(device, dtype, n, tag)
        out.append(_dequantize_case(device, dtype, n, tag))
        out += _reduce_cases(device, dtype, n, tag)
        out += _tensors_cases(device, dtype, n, tag)
    return out


def _human(n):
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= div and n % div == 0:
            return "%d%s" % (n // div, unit)
    return str(n)
