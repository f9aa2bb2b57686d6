"""DDP comm hooks: time per gradient bucket and bytes on the wire per rank, pyperf's hooks against torch's own
(allreduce_hook, fp16/bf16_compress_hook, quantization_pertensor_hook, PowerSGD rank 4), on Gloo with 2 and 4 ranks.

A hook needs real ranks, so the case's `measure` spawns them (once per case; every impl's figures are cached) and
calls each hook on the same bucket: a stand-in GradBucket (buffer/gradients/parameters/index/is_last, all that the
hooks read) holding transformer-shaped gradients. Reported per impl:
  gloo_ms_per_bucket  median wall time of hook(state, bucket).wait(), slowest rank, after warm-up
  bytes_per_rank      bytes this rank sends; vs_fp32_ring: that over a fp32 ring all-reduce's 2 (W-1)/W * 4n
The in-process timing of each impl (what the harness times with `impls`) is the hook's local work on one rank,
no network: the fused casts, the quantize/reduce kernels (straight from and into the bucket), torch's casts and
quantizers.

    python3 -m pyperf.bench hooks            # or: python3 benchmarks/bench_hooks.py [--quick]

On a shared machine add --threads 1: a 2-thread CPU op whose second thread is descheduled waits for it, and the
same work then times 10-20x apart within one run.
"""
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if __name__ == "__main__" and ROOT not in sys.path:   # run as a script from the source tree
    sys.path.insert(0, ROOT)

from pyperf.bench.case import Case  # noqa: E402

PYPERF_KINDS = ("int8", "int4", "fp8", "bf16", "fp16", "allreduce")
TORCH_HOOKS = ("allreduce_hook", "fp16_compress_hook", "bf16_compress_hook", "quantization_pertensor_hook",
               "powerSGD_rank4")


def _shapes(nbytes):
    """Transformer-block-like gradient shapes (d x 4d matrices and d-vectors) filling about nbytes of fp32."""
    d = 512
    shapes = []
    total = 0
    while total + 4 * d * d * 4 <= nbytes or not shapes:
        for s in ((d, 4 * d), (4 * d,), (4 * d, d), (d,)):
            shapes.append(s)
            total += 4 * torch.Size(s).numel()
    return shapes


class FakeBucket:
    """What the hooks read from a torch.distributed.GradBucket."""

    def __init__(self, shapes, seed):
        g = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
        n = sum(p.numel() for p in self.params)
        self.src = torch.randn(n, generator=g) * 1e-3
        self.buf = self.src.clone()
        self.grads, o = [], 0
        for p in self.params:
            self.grads.append(self.buf[o:o + p.numel()].view(p.shape))
            o += p.numel()

    def reset(self):
        self.buf.copy_(self.src)

    def buffer(self):
        return self.buf

    def gradients(self):
        return self.grads

    def parameters(self):
        return self.params

    def index(self):
        return 0

    def is_last(self):
        return True

    def set_buffer(self, t):
        self.buf.copy_(t)


def _torch_hook(name, pg):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks as dh
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
    from torch.distributed.algorithms.ddp_comm_hooks import quantization_hooks as qh
    if name == "powerSGD_rank4":
        st = ps.PowerSGDState(process_group=pg, matrix_approximation_rank=4, start_powerSGD_iter=2,
                              min_compression_rate=1)
        return st, ps.powerSGD_hook
    fn = {"allreduce_hook": dh.allreduce_hook, "fp16_compress_hook": dh.fp16_compress_hook,
          "bf16_compress_hook": dh.bf16_compress_hook, "quantization_pertensor_hook": qh.quantization_pertensor_hook}
    return pg, fn[name]


def _torch_bytes(name, bucket, W):
    n = bucket.buf.numel()
    ring = lambda elems, size: 2 * (W - 1) * elems * size // W
    if name == "allreduce_hook":
        return ring(n, 4)
    if name in ("fp16_compress_hook", "bf16_compress_hook"):
        return ring(n, 2)
    if name == "quantization_pertensor_hook":     # all_gather of one fp32 scale+zero-point, then of uint8 values
        return (W - 1) * (n + 8)
    # PowerSGD rank 4: vectors uncompressed, each matrix m x k sends P (m x 4) and Q (k x 4), fp32 all-reduces
    elems = 0
    for p in bucket.params:
        if p.dim() <= 1:
            elems += p.numel()
        else:
            m = p.shape[0]
            k = p.numel() // m
            elems += 4 * (m + k)
    return ring(elems, 4)


_KEEP = []   # hook states and futures outlive the process group: torch's PowerSGD callbacks hold its state (and so
             # the group); freed on a Gloo worker thread, the group's destructor would join that very thread


def _rank_main(rank, W, nbytes, impls, iters, out_dir):
    import json

    import torch.distributed as dist
    from pyperf import hooks
    bucket = FakeBucket(_shapes(nbytes), seed=rank)
    res = {}
    for name in impls:
        if name == "torch quantization_pertensor_hook" and dist.get_backend() == "gloo":
            # it indexes the all_gather future's value as NCCL nests it; Gloo's is flat -> IndexError in its
            # callback (torch 2.14.1), which also leaves the process group unusable: not run on Gloo
            res[name] = {"error": "fails on Gloo (IndexError in torch's quantize_and_allgather callback)"}
            continue
        if name.startswith("pyperf "):
            kind = name.split()[1]
            state = hooks.HookState(kind, None, bucket.params, stats_every=0)
            fn = hooks.hook_for(kind)
        else:
            state, fn = _torch_hook(name.split()[1], dist.group.WORLD)
        times = []
        try:
            for it in range(iters + 3):
                bucket.reset()
                dist.barrier()
                t0 = time.perf_counter()
                fut = fn(state, bucket)
                fut.wait()
                dt = time.perf_counter() - t0
                _KEEP.append(fut)
                if it >= 3:
                    times.append(dt)
        except Exception as e:      # e.g. torch's quantization_pertensor_hook fails on torch 2.14 (see notes)
            res[name] = {"error": "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[-1][:160])}
            dist.barrier()
            continue
        _KEEP.append(state)
        t = torch.tensor(sorted(times)[len(times) // 2], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if name.startswith("pyperf "):
            sent = state.stats.bytes_sent / state.stats.buckets
        else:
            sent = _torch_bytes(name.split()[1], bucket, W)
        n = bucket.buf.numel()
        ring = 2 * (W - 1) * n * 4 / W
        res[name] = {"gloo_ms_per_bucket": float(t) * 1e3, "bytes_per_rank": int(sent),
                     "vs_fp32_ring": sent / ring, "bucket_mb": n * 4 / 2 ** 20, "world_size": W}
    if rank == 0:
        with open(os.path.join(out_dir, "res.json"), "w") as f:
            json.dump(res, f)
    dist.barrier()          # every callback has run: free the hook states here, on the main thread
    _KEEP.clear()
    import gc
    gc.collect()


def measure_all(W, nbytes, impls, iters):
    """Runs W Gloo ranks in a fresh interpreter (spawned ranks must import this file by path, which the harness's
    module loading does not allow); returns {impl: metrics}."""
    import json
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                                            os.environ.get("PYTHONPATH", "")]))
        subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", str(W), str(nbytes), str(iters), d]
                       + list(impls), check=True, env=env, stdout=subprocess.DEVNULL)
        with open(os.path.join(d, "res.json")) as f:
            return json.load(f)


class _Work:
    """The buffers a hook keeps from step to step for one bucket (pyperf's _Plan: padded fp32 bucket, wire,
    error-feedback residuals, the receive buffer of the all-to-all), built once per input set in setup(), plus `out`:
    where a hook's result lands instead of the bucket itself, so that repeated calls never scale their own input
    (in place, 1/W per call would decay it into denormals)."""

    FMTS = ("int8", "int4", "fp8_e4m3")

    def __init__(self, bucket, W, B=256):
        from pyperf import ops
        from pyperf.comm.quantized import chunk_numel
        self.W, self.B = W, B
        self.out = torch.empty_like(bucket.buf)
        self.out_grads, o = [], 0                     # the bucket's gradient views, on `out`
        for g in bucket.grads:
            self.out_grads.append(self.out[o:o + g.numel()].view(g.shape))
            o += g.numel()
        self.total = ops.pack_layout([g.numel() for g in bucket.grads], align=B)[1]
        self.P = ops.pack(bucket.grads, out_dtype=torch.float32, align=B)
        self.res = torch.zeros(self.total)
        self.res_next = torch.zeros(self.total)       # the hook double-buffers its residuals (residual_out)
        self.C = chunk_numel(self.total, W, B)
        self.srv = torch.zeros(self.C)
        self.wire = {f: ops.quantize(self.P, f, B) for f in self.FMTS}
        self.send = {f: torch.empty_like(w) for f, w in self.wire.items()}
        # what the all-to-all delivers: W chunks of C values (the network writes it, not the hook: filled here once)
        self.recv = {}
        for f in self.FMTS:
            wb = ops.wire_bytes(self.C, f, B)
            self.recv[f] = ops.quantize(self.P[:self.C], f, B)[:wb].repeat(W, 1)
        # what the all-gather form's all-gather delivers (2 ranks): every rank's whole wire
        self.gathered = {f: w.repeat(W, 1) for f, w in self.wire.items()}


def _local_impls(W):
    """One rank's local work per bucket, no network (what the harness times in-process): what each hook does to
    the bucket between its collectives, with the allocations the real hook makes and no others (pyperf's quantized
    hook reuses its plan's buffers and residuals; torch's allreduce_hook divides the bucket in place; the cast hooks
    allocate the compressed tensor and copy the result back into the bucket)."""
    from pyperf import ops

    def quant(fmt):
        # the bucket's gradients -> wire, + client error feedback written to the other residual buffer
        def fn(inp):
            _, grads, w = inp
            ops.quantize_tensors(grads, fmt, w.B, residual=w.res, residual_out=w.res_next, out=w.wire[fmt])
            if W == 2:        # all-gather form: every rank's wire summed straight into the bucket
                ops.reduce_quantized_tensors(w.gathered[fmt], w.out_grads, fmt, w.B, scale=1.0 / W)
                return w.out
            w.send[fmt].copy_(w.wire[fmt])                                            # blocks to per-owner segments
            red = ops.reduce_quantized(w.recv[fmt], w.C, fmt, w.B, scale=1.0 / W, requantize=True,
                                       residual=w.srv)                                # + server error feedback
            ops.dequantize_tensors(w.wire[fmt], w.out_grads, fmt, w.B)                # the gathered wires -> bucket
            return red
        return fn

    def cast(dtype):                                  # pyperf bf16/fp16: scale and cast in one pass
        def fn(inp):
            buf, _, w = inp
            c = torch.empty(buf.shape, dtype=dtype)
            torch.mul(buf, 1.0 / W, out=c)
            w.out.copy_(c)                            # decompress: the all-reduced values back into the bucket
            return w.out
        return fn

    def torch_cast(dtype):                            # torch's *_compress_hook: cast, scale, copy back
        def fn(inp):
            buf, _, w = inp
            c = buf.to(dtype).div_(W)
            w.out.copy_(c)
            return w.out
        return fn

    def torch_pertensor(inp):                         # MinMaxObserver, quantize, W dequantizes summed, / W
        buf, _, w = inp
        mn, mx = torch.aminmax(buf)
        scale = max((float(mx) - float(mn)) / 255, 1e-12)
        q = torch.quantize_per_tensor(buf, scale, int(round(-float(mn) / scale)), torch.quint8)
        w.out.zero_()
        for _ in range(W):
            w.out.add_(q.dequantize())
        return w.out.div_(W)

    def powersgd(inp):
        _, grads, _ = inp
        for g in grads:                               # rank-4 P = M Q, orthogonalize, Q = M^T P, M ~ P Q^T
            if g.dim() < 2:
                continue
            m = g.view(g.shape[0], -1)
            q = torch.randn(m.shape[1], 4)
            p = torch.linalg.qr(m @ q).Q
            q = m.t() @ p
            torch.mm(p, q.t())

    impls = {"pyperf int8": quant("int8"), "pyperf int4": quant("int4"), "pyperf fp8": quant("fp8_e4m3"),
             "pyperf bf16": cast(torch.bfloat16), "pyperf fp16": cast(torch.float16),
             "pyperf allreduce": lambda inp: torch.mul(inp[0], 1.0 / W, out=inp[2].out),     # the hook: mul_
             "torch allreduce_hook": lambda inp: torch.div(inp[0], W, out=inp[2].out),       # the hook: div_
             "torch fp16_compress_hook": torch_cast(torch.float16),
             "torch bf16_compress_hook": torch_cast(torch.bfloat16),
             "torch quantization_pertensor_hook": torch_pertensor,
             "torch powerSGD_rank4": powersgd}
    return impls


def cases(device, dtype, quick):
    if device != "cpu":
        return []          # the hooks run on any device, but this benchmark drives Gloo ranks on the CPU
    sizes = [4 << 20] if quick else [4 << 20, 25 << 20]
    worlds = [2] if quick else [2, 4]
    out = []
    for nbytes in sizes:
        for W in worlds:
            shapes = _shapes(nbytes)
            impls = _local_impls(W)
            cache = {}

            def setup(shapes=shapes, W=W):
                b = FakeBucket(shapes, seed=0)
                return b.buf, b.grads, _Work(b, W)

            def measure(impl, inputs, W=W, nbytes=nbytes, cache=cache, impls=impls, quick=quick):
                if not cache:
                    cache.update(measure_all(W, nbytes, impls, 3 if quick else 5))
                return cache.get(impl, {})

            n = sum(torch.Size(s).numel() for s in shapes)
            out.append(Case(group="hooks", name="comm hook %.0f MB bucket gloo W=%d" % (n * 4 / 2 ** 20, W),
                            setup=setup, impls=impls, bytes=2 * n * 4, baseline="torch allreduce_hook",
                            extra={"world_size": W, "numel": n,
                                   "note": "in-process time: one rank's local work; metrics: real Gloo ranks"},
                            measure=measure))      # rotated input sets: a bucket must not sit in the LLC
    return out


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    if sys.argv[1:2] == ["--measure"]:
        import warnings
        warnings.filterwarnings("ignore")
        from _dist import run_ranks
        W, nbytes, iters, d = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        run_ranks(_rank_main, W, nbytes, sys.argv[6:], iters, d)
        sys.exit(0)
    quick = "--quick" in sys.argv
    for c in cases("cpu", torch.float32, quick):
        print(c.name)
        res = measure_all(c.extra["world_size"], c.extra["numel"] * 4, c.impls, 3 if quick else 5)
        for name, m in res.items():
            if "error" in m:
                print("  %-36s failed: %s" % (name, m["error"]))
                continue
            print("  %-36s %9.2f ms/bucket  %11d B/rank  %.3fx fp32 ring" % (
                name, m["gloo_ms_per_bucket"], m["bytes_per_rank"], m["vs_fp32_ring"]))
