"""The two-shot quantized all-reduce.

    quantize the local tensor into one chunk per rank -> all_to_all_single -> each rank reduces the chunk it owns
    (fused dequantize + fixed-rank-order fp32 sum + requantize, ops.reduce_quantized) -> all-gather the reduced
    wires -> dequantize into the output.

Each rank sends about 2 (W-1)/W x the quantized size of the tensor, against 2 (W-1)/W x 4 bytes per element for a
fp32 ring all-reduce (int8: ~0.25x, int4: ~0.13x with 256-element blocks). The backend only moves uint8 bytes, so
it runs on NCCL and Gloo alike. Gloo on CPU implements both all_to_all_single (alltoall / alltoallv) and
all_gather_into_tensor (torch >= 2.14 names it all_gather_single; we use whichever exists).

Any size and world size: chunks are block-aligned and padded; a rank whose chunk is shorter (unequal split) pads its
reduced wire for the all-gather, which needs equal sizes. World size 1 is an exact copy (nothing is sent, nothing
is quantized). The result is deterministic: the sum runs in fixed rank order, and which rank reduces a block does not
change a bit of its result.
"""
from typing import Sequence

import torch
import torch.distributed as dist

from pyperf import ops as _q

FORMATS = tuple(_q.QUANT_FORMATS)

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_format(fmt, block_size):
    """ValueError naming the argument unless fmt is a quantized format and block_size a supported power of two."""
    _q._check_quant_args(fmt, block_size)


def wire_bytes(numel, fmt, block_size):
    """Bytes of one quantized wire of `numel` elements (a multiple of 4: wires side by side keep their fp32 scales
    aligned): [nblocks fp32 scales][nblocks * block_size payload values]."""
    return int(_q.wire_bytes(numel, fmt, block_size))


def chunk_numel(numel, world_size, block_size):
    """Elements in each rank's chunk of a `numel`-element tensor: block-aligned, equal for every rank."""
    blocks = -(-numel // block_size)
    return -(-blocks // world_size) * block_size


def padded_numel(numel, world_size, block_size):
    """Size of the error-feedback `residual` that quantized_all_reduce takes for a tensor of `numel` elements."""
    return world_size * chunk_numel(numel, world_size, block_size)


def mix_seed(seed, *tags):
    """A 63-bit Philox key derived from (seed, tags): independent streams for each rank and stage."""
    h = (int(seed) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    for t in tags:
        h ^= (int(t) + 0x632BE59BD9B4E019 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _forward(fut, out):
    """Completes the torch.futures.Future `out` with `fut`'s value (or exception) when `fut` completes."""
    def done(f):
        try:
            out.set_result(f.value())
        except BaseException as e:
            out.set_exception(e)

    fut.add_done_callback(done)
    return out


def _as_future(fut):
    """A torch.futures.Future (Work.get_future() gives the bare C++ torch._C.Future) completing with `fut`."""
    if isinstance(fut, torch.futures.Future):
        return fut
    return _forward(fut, torch.futures.Future())


def _completed(value):
    f = torch.futures.Future()
    f.set_result(value)
    return f


class TwoShot:
    """One two-shot all-reduce over a flat fp32 tensor split into per-rank segments (lengths `lens`, multiples of
    the block size; segment r is reduced by rank r). Used by quantized_all_reduce (equal contiguous chunks) and by
    the DDP hooks (segments = the blocks each rank owns). `start` returns the second stage, which returns a Future
    of `out`.

    After completion, `nonfinite` is a 0-d bool tensor: some block anywhere was inf/nan (the same on every rank)."""

    def __init__(self, lens: Sequence[int], fmt, block_size, rank, world_size):
        self.lens = [int(n) for n in lens]
        self.fmt, self.block_size = fmt, block_size
        self.rank, self.world_size = rank, world_size
        self.offs = [0]
        for n in self.lens:
            self.offs.append(self.offs[-1] + n)
        self.wb = [wire_bytes(n, fmt, block_size) for n in self.lens]
        self.woffs = [0]
        for b in self.wb:
            self.woffs.append(self.woffs[-1] + b)
        self.wb_max = max(self.wb) if self.wb else 0
        self.equal = len(set(self.wb)) <= 1
        self.nonfinite = None

    def bytes_sent(self):
        """Bytes this rank puts on the wire: its chunks for the other ranks, then its reduced chunk to each of them
        (a ring all-gather forwards W-1 chunks per rank; we count the same as a ring would)."""
        W, r = self.world_size, self.rank
        return (self.woffs[-1] - self.wb[r]) + (W - 1) * self.wb_max

    def exchange(self, group, send, buffers=None):
        """Stage one, first half: start the all-to-all of the segment wires in `send` (segment s, wb[s] bytes, goes
        to rank s). Returns (work, recv): pass both to reduce() once the caller is ready to wait.

        Every collective of a two-shot is issued from the calling thread, in call order: Gloo matches collectives
        by issue order, and one launched from a completion callback (a backend worker thread) can overtake the
        next bucket's on some ranks and deadlock or mismatch. Splitting stage one lets a caller (the DDP hook)
        issue this bucket's all-to-all, return to the backward pass, and reduce it when the next bucket arrives.

        buffers: None, or (recv, mine, ...) from `self.buffers(device)`, reused instead of fresh allocations (for
        a caller that runs the same layout every step: fresh large CPU buffers page-fault on every call)."""
        W, r = self.world_size, self.rank
        my_wb = self.wb[r]
        recv = buffers[0] if buffers is not None else torch.empty(W * my_wb, dtype=torch.uint8, device=send.device)
        if self.equal:
            work = dist.all_to_all_single(recv, send, group=group, async_op=True)
        else:
            work = dist.all_to_all_single(recv, send, output_split_sizes=[my_wb] * W, input_split_sizes=self.wb,
                                          group=group, async_op=True)
        return work, recv

    def reduce(self, work, recv, *, scale=1.0, server_residual=None, server_residual_out=None, stochastic=False,
               seed=0, offset=0, requantize=None, buffers=None):
        """Stage one, second half: wait for the all-to-all (on NCCL a stream wait, the host goes on; on Gloo
        this thread blocks until the bytes are in), then the fused reduce of this rank's segment. Returns this
        rank's reduced wire, zero-padded to wb_max bytes (the all-gather needs equal sizes). requantize(fp32 sum)
        -> wire replaces the fused requantize (the hooks use it to key stochastic rounding by parameter).
        server_residual_out: write the new server residual here instead of in place (see ops.quantize)."""
        W, r, fmt, B = self.world_size, self.rank, self.fmt, self.block_size
        my_wb = self.wb[r]
        mine = buffers[1] if buffers is not None else torch.zeros(self.wb_max, dtype=torch.uint8, device=recv.device)
        work.wait()
        n_me = self.lens[r]
        if n_me:
            wires = recv.view(W, my_wb)
            if requantize is None:
                # straight into the all-gather's send buffer
                _q.reduce_quantized(wires, n_me, fmt, B, scale=scale, requantize=True, residual=server_residual,
                                    residual_out=server_residual_out, stochastic=stochastic, seed=seed,
                                    offset=offset, out=mine[:my_wb])
            else:
                mine[:my_wb].copy_(requantize(_q.reduce_quantized(wires, n_me, fmt, B, scale=scale)))
        return mine

    def buffers(self, device):
        """(recv, mine, gathered): reusable buffers for exchange()/reduce(buffers=) and gather(out=). mine's padding
        (past this rank's wire) is zero and stays so."""
        return (torch.empty(self.world_size * self.wb[self.rank], dtype=torch.uint8, device=device),
                torch.zeros(self.wb_max, dtype=torch.uint8, device=device),
                torch.empty(self.world_size * self.wb_max, dtype=torch.uint8, device=device))

    def gather(self, group, mine, out=None):
        """Stage two: all-gather of the reduced wires. Returns (future, gathered [W, wb_max] uint8); out: a
        reusable flat buffer of W * wb_max bytes (see buffers())."""
        gathered = out if out is not None else torch.empty(self.world_size * self.wb_max, dtype=torch.uint8,
                                                           device=mine.device)
        fut = _all_gather(gathered, mine, group=group, async_op=True).get_future()
        return fut, gathered.view(self.world_size, self.wb_max)

    def start(self, group, x, out, *, scale=1.0, residual=None, server_residual=None, stochastic=False,
              seed=0, offset=0):
        """Quantize x's segments and start the all-to-all; returns stage_two(), a callable that waits for it,
        reduces, starts the all-gather and returns a Future of out (call it from the same thread, in the same
        order on every rank; in between, the caller may compute or start other collectives).
        residual: None or per-segment fp32 tensors (client error feedback); server_residual: fp32 of lens[rank].
        Stochastic rounding: chunk s uses Philox key mix_seed(seed, 1, rank, s) and `offset`, the server
        mix_seed(seed, 2, rank)."""
        W, r, fmt, B = self.world_size, self.rank, self.fmt, self.block_size
        send = torch.empty(self.woffs[-1], dtype=torch.uint8, device=x.device)
        for s in range(W):
            if self.lens[s]:
                _q.quantize(x[self.offs[s]:self.offs[s + 1]], fmt, B, stochastic=stochastic,
                            seed=mix_seed(seed, 1, r, s), offset=offset,
                            residual=None if residual is None else residual[s],
                            out=send[self.woffs[s]:self.woffs[s + 1]])
        work, recv = self.exchange(group, send)

        def stage_two():
            mine = self.reduce(work, recv, scale=scale, server_residual=server_residual, stochastic=stochastic,
                               seed=mix_seed(seed, 2, r), offset=offset)
            fut, gathered = self.gather(group, mine)

            def finish(f):
                f.value()
                bad = []
                for s in range(W):
                    if self.lens[s]:
                        _q.dequantize(gathered[s, :self.wb[s]], self.lens[s], fmt, B,
                                      out=out[self.offs[s]:self.offs[s + 1]])
                        nb = self.lens[s] // B
                        bad.append(~torch.isfinite(gathered[s, :4 * nb].view(torch.float32)).all())
                # The fp32 block scales lead each wire: a non-finite block has a non-finite scale.
                self.nonfinite = torch.stack(bad).any() if bad else torch.zeros((), dtype=torch.bool)
                return out

            return fut.then(finish)

        return stage_two


def quantized_all_reduce(tensor, fmt="int8", *, block_size=256, group=None, op="mean", async_op=False,
                         stochastic=False, seed=0, offset=0, residual=None, server_residual=None, out=None):
    """All-reduce `tensor` (any shape, float dtype, any numel including 0) across `group` with the two-shot
    quantized algorithm. Returns the reduced tensor (`out`, or a new tensor shaped and typed like `tensor`), or a
    torch.futures.Future of it with async_op=True.

    op: "mean" or "sum". stochastic/seed/offset: stochastic rounding from Philox keyed by (seed, rank, chunk) and
    `offset`; use a fresh offset per call (e.g. the step number). residual (fp32, padded_numel(numel, W,
    block_size) elements) and server_residual (fp32, chunk_numel(numel, W, block_size) elements): error-feedback
    state, updated in place; pass zeros first.
    Error bound (deterministic rounding, no error feedback), per element of block b:
    |out - exact| <= (mean_r amax_r(b) + amax_mean(b)) / (2 qmax) for int8/int4 (qmax 127 / 7); fp8 keeps a
    relative error of 2^-4 (e4m3) / 2^-3 (e5m2) per stage.
    """
    stage_two = start_quantized_all_reduce(tensor, fmt, block_size=block_size, group=group, op=op,
                                           stochastic=stochastic, seed=seed, offset=offset, residual=residual,
                                           server_residual=server_residual, out=out)
    fut = stage_two()
    if async_op:
        return _as_future(fut)
    return fut.wait()


def start_quantized_all_reduce(tensor, fmt="int8", *, block_size=256, group=None, op="mean", stochastic=False,
                               seed=0, offset=0, residual=None, server_residual=None, out=None):
    """quantized_all_reduce (same arguments) up to the started all-to-all; returns stage_two(), a callable that
    waits for it, reduces this rank's chunk, starts the all-gather and returns a torch Future of the result.
    Between the two, the caller may compute and start other collectives (that is how GradientBucketer overlaps a
    bucket's all-to-all with the backward). Call every stage_two from the thread that called this, in the same
    order on every rank: Gloo matches collectives by issue order."""
    check_format(fmt, block_size)
    if op not in ("mean", "sum"):
        raise ValueError("op: expected 'mean' or 'sum', got %r" % (op,))
    if not tensor.is_floating_point():
        raise TypeError("tensor: expected a floating-point tensor, got %s" % tensor.dtype)
    group = group if group is not None else dist.group.WORLD
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    if out is None:
        out = torch.empty_like(tensor, memory_format=torch.contiguous_format)
    elif out.shape != tensor.shape or out.dtype != tensor.dtype:
        raise ValueError("out: expected shape %s and dtype %s, got %s and %s"
                         % (tuple(tensor.shape), tensor.dtype, tuple(out.shape), out.dtype))
    n = tensor.numel()
    C = chunk_numel(n, W, block_size)
    if residual is not None and (residual.dtype != torch.float32 or residual.numel() != W * C):
        raise ValueError("residual: expected float32 with padded_numel(%d, %d, %d) = %d elements, got %s with %d"
                         % (n, W, block_size, W * C, residual.dtype, residual.numel()))
    if server_residual is not None and (server_residual.dtype != torch.float32 or server_residual.numel() != C):
        raise ValueError("server_residual: expected float32 with chunk_numel(%d, %d, %d) = %d elements, got %s "
                         "with %d" % (n, W, block_size, C, server_residual.dtype, server_residual.numel()))
    return _start(tensor, out, fmt, block_size, group, W, rank, n, C, scale=1.0 / W if op == "mean" else 1.0,
                  residual=residual, server_residual=server_residual, stochastic=stochastic, seed=seed,
                  offset=offset)


def _start(tensor, out, fmt, block_size, group, W, rank, n, C, *, scale, residual, server_residual, stochastic,
           seed, offset):
    """quantized_all_reduce's work after the argument checks, up to the started all-to-all; returns stage_two(),
    which finishes it and returns a Future of out (see TwoShot.start)."""
    if n == 0 or W == 1:
        if out is not tensor:
            out.copy_(tensor)
        return lambda: _completed(out)
    direct = tensor.dtype == torch.float32 and tensor.is_contiguous() and n == W * C
    x = tensor.reshape(-1) if direct else torch.zeros(W * C, dtype=torch.float32, device=tensor.device)
    if not direct:
        x[:n].copy_(tensor.reshape(-1))
    y = out.view(-1) if (direct and out.is_contiguous()) else torch.empty(W * C, dtype=torch.float32,
                                                                          device=tensor.device)
    ts = TwoShot([C] * W, fmt, block_size, rank, W)
    res = None if residual is None else [residual.view(-1)[s * C:(s + 1) * C] for s in range(W)]
    ts_two = ts.start(group, x, y, scale=scale, residual=res, server_residual=server_residual,
                      stochastic=stochastic, seed=seed, offset=offset)

    def copy_back(f):
        yy = f.value()
        if yy.data_ptr() != out.data_ptr():
            out.view(-1).copy_(yy[:n]) if out.is_contiguous() else out.copy_(yy[:n].view(out.shape))
        return out

    return lambda: ts_two().then(copy_back)


# ---- GradientBucketer(compression="int8" | "int4" | "fp8" | "fp8_e4m3" | "fp8_e5m2") ------------------------------
from pyperf.comm.bucketer import Compressor, register_compressor  # noqa: E402


class QuantizedCompressor(Compressor):
    """GradientBucketer's quantized wire: the two-shot all-reduce of each packed bucket, with error feedback kept per
    bucket (the bucketer's layout never changes, so bucket_index is a stable key). Parameters are packed at block
    boundaries (align = block_size), so no quantization block straddles two parameters.
    algorithm: "two_shot", "all_gather" (every rank's whole wire to every rank, each sums all W in rank order) or
    "auto" (all_gather for 2 ranks, where it sends the same bytes in one phase; see pyperf.hooks)."""

    prescale = True

    def __init__(self, fmt="int8", block_size=256, error_feedback=True, stochastic_rounding=False, seed=0,
                 algorithm="auto"):
        check_format(fmt, block_size)
        if algorithm not in ("auto", "two_shot", "all_gather"):
            raise ValueError("algorithm: expected one of auto, two_shot, all_gather, got %r" % (algorithm,))
        self.name, self.fmt, self.block_size, self.align = fmt, fmt, block_size, block_size
        self.error_feedback, self.stochastic, self.seed = error_feedback, stochastic_rounding, seed
        self.algorithm = algorithm
        self._state = {}     # bucket_index -> [residual, server_residual, calls]
        self._ag_state = {}  # bucket_index -> [residual, wire, gathered, calls] (all-gather form)
        self._pending = None # the last launched bucket's _Deferred

    def wire_dtype(self, grad_dtype):
        return torch.float32

    def all_reduce_async(self, flat, group, bucket_index):
        if group is None and not dist.is_initialized():
            return _completed(flat)
        g = group if group is not None else dist.group.WORLD
        W, B, n = dist.get_world_size(g), self.block_size, flat.numel()
        if W > 1 and n and (self.algorithm == "all_gather" or (self.algorithm == "auto" and W == 2)):
            return self._all_gather_async(flat, g, W, bucket_index)
        st = self._state.get(bucket_index)
        if st is None:
            res = srv = None
            if self.error_feedback:
                res = torch.zeros(padded_numel(n, W, B), dtype=torch.float32, device=flat.device)
                srv = torch.zeros(chunk_numel(n, W, B), dtype=torch.float32, device=flat.device)
            st = self._state[bucket_index] = [res, srv, 0]
        st[2] += 1
        # prescaled by 1/W already: the sum of the inputs is the mean
        handle = _Deferred(start_quantized_all_reduce(flat, self.fmt, block_size=B, group=group, op="sum",
                                                      stochastic=self.stochastic,
                                                      seed=mix_seed(self.seed, bucket_index), offset=st[2],
                                                      residual=st[0], server_residual=st[1], out=flat))
        # the previous bucket's stage two runs now, after this bucket's all-to-all started: its all-to-all had the
        # backward of this bucket to complete in. Launches (and so these calls) come in bucket order on every rank.
        prev, self._pending = self._pending, handle
        if prev is not None:
            prev.finish()
        return handle


    def _all_gather_async(self, flat, group, W, bucket_index):
        """Quantize the bucket (+EF), all-gather every rank's wire, sum them in rank order into flat when it
        completes (prescaled by 1/W: the sum is the mean). One collective, nothing deferred."""
        B, n = self.block_size, flat.numel()
        st = self._ag_state.get(bucket_index)
        if st is None:
            nbytes = _q.wire_bytes(n, self.fmt, B)
            res = torch.zeros(n, dtype=torch.float32, device=flat.device) if self.error_feedback else None
            st = self._ag_state[bucket_index] = [
                res, torch.empty(nbytes, dtype=torch.uint8, device=flat.device),
                torch.empty(W, nbytes, dtype=torch.uint8, device=flat.device), 0]
        st[3] += 1
        res, wire, gathered = st[0], st[1], st[2]
        # stochastic rounding: an independent stream per rank and bucket, a fresh offset per call
        _q.quantize(flat, self.fmt, B, stochastic=self.stochastic,
                    seed=mix_seed(self.seed, bucket_index, dist.get_rank(group)), offset=st[3], residual=res,
                    out=wire)
        fut = _all_gather(gathered.view(-1), wire, group=group, async_op=True).get_future()
        fmt = self.fmt

        def reduce(f):
            f.value()
            _q.reduce_quantized_tensors(gathered, [flat], fmt, B)
            return flat

        return fut.then(reduce)


class _Deferred:
    """A bucket's two-shot whose stage two runs at the next bucket's launch or at wait(), whichever is first."""

    def __init__(self, stage_two):
        self._stage_two, self._fut = stage_two, None

    def finish(self):
        if self._fut is None:
            self._fut = self._stage_two()
            self._stage_two = None

    def wait(self):
        self.finish()
        return self._fut.wait()


register_compressor("int8", lambda: QuantizedCompressor("int8"))
register_compressor("int4", lambda: QuantizedCompressor("int4"))
register_compressor("fp8", lambda: QuantizedCompressor("fp8_e4m3"))
register_compressor("fp8_e4m3", lambda: QuantizedCompressor("fp8_e4m3"))
register_compressor("fp8_e5m2", lambda: QuantizedCompressor("fp8_e5m2"))
