"""Every CUDA kernel of pyperf once, on small odd sizes: the program compute-sanitizer runs (memcheck, racecheck,
synccheck) in scripts/gpu_check.sh. Vector and scalar paths (aligned and misaligned data), partial blocks, every
quantization format and the register-cached / two-pass quantize variants, short and long norm rows, the dropout
and gated paths, bias gradients over several row lanes. It checks nothing itself beyond finiteness; the tests check
values. `--device cpu` runs the same calls on the CPU kernels (to try the script where there is no GPU)."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the in-place build of this tree


def misaligned(t):
    """A contiguous copy of t starting one element past an allocation: the scalar paths."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return out.copy_(t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    import pyperf  # noqa: F401
    from pyperf import ops
    dev = args.device
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dtype)

    t0 = time.time()
    calls = 0
    for dtype in (torch.float32, torch.bfloat16):
        # pack: several tensors (one empty), odd sizes, align, cast, scale; more tensors than one launch holds
        ts = [rnd(n, dtype=dtype) for n in (1, 7, 0, 257, 70001)] + [rnd(3, dtype=dtype) for _ in range(70)]
        flat = ops.pack(ts, scale=0.5, out_dtype=torch.float16, align=4)
        ops.pack(ts, out=torch.empty(flat.numel() + 5, dtype=dtype, device=dev), align=4)
        ops.unpack(flat, ts, scale=2.0, align=4, accumulate=True)
        ops.unpack(misaligned(flat), [misaligned(t) for t in ts], align=4)
        ops.multi_tensor_l2norm(ts)
        calls += 5
        # quant: every format, block sizes 32 / 256 / 1024 / 4096 (cached and two-pass), stochastic + EF
        for fmt in ops.QUANT_FORMATS:
            for bs in (32, 256, 1024, 4096):
                n = 3 * bs + 17
                x = rnd(n, dtype=dtype)
                r = rnd(n) * 0.1
                w = ops.quantize(x, fmt, bs, stochastic=True, seed=1, offset=2, residual=r)
                ops.quantize(misaligned(x), fmt, bs, residual=r, residual_out=misaligned(r))
                ops.dequantize(w, n, fmt, bs, out_dtype=dtype, scale=0.5)
                ops.dequantize(w, n, fmt, bs, out=misaligned(rnd(n, dtype=dtype)), accumulate=True)
                wires = torch.stack([w, w, w])
                ops.reduce_quantized(wires, n, fmt, bs, scale=1 / 3)
                ops.reduce_quantized(wires, n, fmt, bs, scale=1 / 3, requantize=True, residual=r, stochastic=True)
                calls += 6
            xs = [rnd(5, 7, dtype=dtype), rnd(0, dtype=dtype), rnd(300, dtype=dtype)]
            npad = sum((t.numel() + 255) // 256 * 256 for t in xs)
            wire = ops.quantize_tensors(xs, fmt, 256, out=torch.empty(ops.wire_bytes(npad, fmt, 256),
                                                                       dtype=torch.uint8, device=dev))
            ops.dequantize_tensors(wire, [torch.empty_like(t) for t in xs], fmt, 256, scale=0.5)
            ops.reduce_quantized_tensors(torch.stack([wire, wire]), [torch.empty_like(t) for t in xs], fmt, 256)
            calls += 3
        # norms: short rows (several per block), rows held in registers, streamed long rows; aligned / not
        for n in (7, 1000, 4099, 8193, 20000):
            for kind in ("rms", "ln"):
                for mis in (False, True):
                    x = rnd(3, n, dtype=dtype)
                    x = misaligned(x) if mis else x
                    r = rnd(3, n, dtype=dtype)
                    w = rnd(n, dtype=dtype).requires_grad_()
                    b = rnd(n, dtype=dtype).requires_grad_()
                    xx = x.clone().requires_grad_()
                    if kind == "rms":
                        y, h = ops.add_rms_norm(xx, r, w, 1e-5)[:2]
                    else:
                        y, h = ops.add_layer_norm(xx, r, w, b, 1e-5)[:2]
                    (y.float().sum() + h.float().sum()).backward()
                    calls += 2
        # activations: vector (hidden % 8 == 0) and scalar, bias gradients over several row lanes
        for shape in ((5, 1031), (17, 4096), (2, 3, 136)):
            x = rnd(*shape, dtype=dtype).requires_grad_()
            b = rnd(shape[-1], dtype=dtype).requires_grad_()
            rr = rnd(*shape, dtype=dtype).requires_grad_()
            for ap_ in ("tanh", "none"):
                ops.bias_gelu(x, b, ap_).float().sum().backward()
            ops.bias_dropout_residual(x, b, rr, 0.3, 7, 9).float().sum().backward()
            ops.bias_dropout_residual(x, b, rr, 0.0, 7, 9).float().sum().backward()
            both = rnd(*shape[:-1], 2 * shape[-1], dtype=dtype).requires_grad_()   # a and b in one tensor
            for act in ("silu", "gelu", "gelu_tanh"):
                ops.gated_act(both, None, act).float().sum().backward()
                ops.gated_act(x, rr, act).float().sum().backward()
            calls += 18
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    print("gpu_smoke: %d op calls on %s in %.1f s: ok" % (calls, dev, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
