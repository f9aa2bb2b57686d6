"""DDP communication hooks: fused-scale fp32/bf16/fp16 all-reduce and the two-shot quantized all-reduce with
error feedback, plus the state they keep (residuals, counters, statistics).

Why the quantized hook looks the way it does:
- DDP's bucket layout changes after the first iteration and again at every restart (a resumed run starts with the
  initial layout). Everything that decides a result is therefore keyed by parameter, never by bucket: the
  quantization blocks start at parameter boundaries (each parameter padded to block_size), global block g (in the
  order of the model's parameters) is always reduced by rank g % W, and the error-feedback residuals are keyed by
  parameter. A bucket just selects blocks; the same blocks come out bit for bit whatever the bucket composition.
- Speed: the residuals are stored compactly, quantized parameters only, in model order (client: all their blocks;
  server: the blocks this rank owns). DDP's buckets are ranges of parameters (reverse order does not matter: a
  bucket's parameters are quantized in model order), so a bucket's residuals are plain views, no gather/scatter;
  other buckets gather/scatter whole runs of parameters with one ops.pack/unpack each. Every per-bucket index and
  buffer is built once per bucket layout (_Plan). state_dict() converts to the model-wide global-block layout
  (unchanged format), load_state_dict() back.
- Two ways to move the wires (algorithm=). two_shot: an all-to-all gives rank s the blocks it owns from every
  rank, it reduces them, requantizes the sum (with its own server-side error feedback) and an all-gather returns
  the reduced blocks; each rank sends 2 (W - 1) / W wires, in two dependent phases. all_gather: every rank's whole
  wire goes to every rank and each sums all W in rank order; (W - 1) wires, one phase, no requantization. With 2
  ranks both send one wire, so "auto" takes all_gather there: the reduce waits on nothing but its own all-gather,
  so no stage two is left to run on the autograd thread (on Gloo, waiting for the all-to-all there stalled the
  backward pass whenever the link was the bottleneck), and the sum carries no second quantization error.
- Small parameters (numel < min_numel) are not quantized: they are all-gathered in fp32 and summed in rank order,
  which is exact-mean-accurate and, unlike a ring all-reduce, independent of the bucket layout.
- GradScaler: a non-finite gradient comes out non-finite (the step is skipped by the scaler); the residuals are
  rolled back to their value before that step when the next step starts (skip_nonfinite=True).
"""
import functools
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from pyperf.comm.all_ranks import AllRanks
from pyperf.comm.quantized import TwoShot, _all_gather, _forward, _q, check_format, mix_seed

ALGORITHMS = ("auto", "two_shot", "all_gather")
KINDS = ("allreduce", "bf16", "fp16", "int8", "int4", "fp8", "fp8_e4m3", "fp8_e5m2")
# register()'s keyword options (HookState's keyword arguments)
OPTIONS = ("block_size", "stochastic_rounding", "error_feedback", "start_iter", "min_numel", "seed", "skip_nonfinite",
           "stats_every", "algorithm")
_QUANT_FMT = {"int8": "int8", "int4": "int4", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)


def _ring_bytes(numel, elem, world_size):
    return 2 * (world_size - 1) * numel * elem // world_size if world_size > 1 else 0


class HookStats:
    """Counters a HookState accumulates; `as_dict()` for logging."""

    def __init__(self):
        self.steps = 0                # optimizer-step syncs seen (hook calls on the last bucket)
        self.buckets = 0              # hook calls
        self.compressed_buckets = 0   # hook calls that ran the quantized all-reduce
        self.nonfinite_steps = 0      # steps whose gradients had inf/nan (error feedback rolled back)
        self.bytes_sent = 0           # bytes this rank sent
        self.bytes_fp32_ring = 0      # what a fp32 ring all-reduce of the same gradients would have sent
        self.rel_error = float("nan") # last measured ||Q(v) - v|| / ||v|| of this rank's quantized gradient
        self.hook_time_s = 0.0        # host time in the hook and its callbacks (on CUDA: launch time)

    @property
    def compression(self):
        """bytes_sent / bytes_fp32_ring (1.0 for a fp32 all-reduce, ~0.25 for int8)."""
        return self.bytes_sent / self.bytes_fp32_ring if self.bytes_fp32_ring else float("nan")

    def as_dict(self):
        d = dict(vars(self))
        d["compression"] = self.compression
        return d

    def __repr__(self):
        return "HookStats(%s)" % ", ".join("%s=%s" % kv for kv in self.as_dict().items())


def _runs(ranges):
    """Merge consecutive [a, b) ranges (in order) into maximal runs."""
    out = []
    for a, b in ranges:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


class _Plan:
    """How one bucket (one set of parameters, in DDP's order) maps onto the model-wide block layout. Built once per
    bucket layout (DDP keeps its buckets for the whole run after the first rebuild), so a step only reads it.

    P: the bucket's quantized parameters in model order, each padded to whole blocks (ops.pack, align=block_size).
    Block k of P is global block g = gblk[k] and is reduced by rank g % W; perm lists P's blocks grouped by that
    owner (segment s = the blocks rank s reduces, in model order).
    Residuals: the client residual of P is runs of the state's compact client buffer (quantized parameters only, in
    model order), the server residual of this rank's segment runs of its compact server buffer (the blocks this rank
    owns, in model order). DDP's buckets are ranges of parameters, so each is one run: a view, no copy."""

    def __init__(self, state, bucket_params, device):
        B, W, r = state.block_size, state.world_size, state.rank
        idx = [state._gidx[id(p)] for p in bucket_params]
        small = [state._numels[g] < state.min_numel for g in idx]
        self.small = [i for i in range(len(idx)) if small[i]]          # positions in the bucket, fp32 path
        self.small_numel = sum(state._numels[idx[i]] for i in self.small)
        self.canon = sorted((i for i in range(len(idx)) if not small[i]), key=lambda i: idx[i])
        self.gidx = [idx[i] for i in self.canon]
        self.nbs = [-(-state._numels[g] // B) for g in self.gidx]
        self.nblocks = sum(self.nbs)
        self.res_buf = self.srv_buf = None
        if state._all_gather:
            # one send buffer per bucket, [quantized wire][fp32 small parameters], and every rank's copy of it;
            # reused every step (the bucket's previous all-gather completed before DDP calls its hook again)
            qbytes = _q.wire_bytes(self.nblocks * B, state.fmt, B) if self.nblocks else 0
            self.send_all = torch.empty(qbytes + 4 * self.small_numel, dtype=torch.uint8, device=device)
            self.small_f32 = self.send_all[qbytes:].view(torch.float32)   # qbytes is a multiple of 4
            self.gathered = torch.empty(W, self.send_all.numel(), dtype=torch.uint8, device=device)
            self.srv_runs = []
        if self.nblocks == 0:
            return
        self.res_runs = _runs((state._cstart[g] * B, (state._cstart[g] + nb) * B) for g, nb in zip(self.gidx, self.nbs))
        self.pstart = [0]
        for nb in self.nbs:
            self.pstart.append(self.pstart[-1] + nb)
        self.P = None      # the packed fp32 gradients: only stochastic rounding and the statistics need them
        if state._all_gather:
            self.wire = self.send_all[:qbytes]
        else:
            self.wire = torch.empty(_q.wire_bytes(self.nblocks * B, state.fmt, B), dtype=torch.uint8, device=device)
        self.pb = (self.wire.numel() - 4 * self.nblocks) // self.nblocks       # payload bytes per block
        self.scales = self.wire[:4 * self.nblocks].view(self.nblocks, 4)
        self.payload = self.wire[4 * self.nblocks:].view(self.nblocks, self.pb)
        if state._all_gather:
            return
        gblk = torch.cat([torch.arange(state._gstart[g], state._gstart[g] + nb) for g, nb in zip(self.gidx, self.nbs)])
        owner = gblk % W
        perm = torch.argsort(owner * self.nblocks + torch.arange(self.nblocks), stable=True)
        counts = torch.bincount(owner, minlength=W).tolist()
        self.lens = [c * B for c in counts]
        self.bounds = [0]
        for c in counts:
            self.bounds.append(self.bounds[-1] + c)
        self.perm = perm.to(device)
        self.perm_seg = [self.perm[self.bounds[s]:self.bounds[s + 1]] for s in range(W)]
        # server residual runs (element ranges of the compact buffer), in the order of this rank's segment
        self.srv_runs = _runs((state._sstart[g] * B, (state._sstart[g] + state._sowned[g]) * B) for g in self.gidx)
        assert sum(b - a for a, b in self.srv_runs) == counts[r] * B
        # this rank's runs of blocks of one parameter (the unit of stochastic rounding, keyed by parameter)
        pidx = torch.repeat_interleave(torch.tensor(self.gidx), torch.tensor(self.nbs))[perm[self.bounds[r]:
                                                                                             self.bounds[r + 1]]]
        self.runs, k = [], 0
        for g, n in zip(*torch.unique_consecutive(pidx, return_counts=True)):
            self.runs.append((k, int(n), int(g)))
            k += int(n)
        self.inv = torch.argsort(perm).to(device)
        self.seg_scales = torch.empty_like(self.scales)
        self.seg_payload = torch.empty_like(self.payload)
        self.two_shot = TwoShot(self.lens, state.fmt, B, r, W)
        # per-step buffers, reused: a bucket's previous step has completed (DDP waits for every bucket's future)
        # before its next hook call; fresh large CPU buffers would page-fault on every step
        self.send = torch.empty(self.two_shot.woffs[-1], dtype=torch.uint8, device=device)
        self.ts_buffers = self.two_shot.buffers(device)

    def packed(self, grads, block_size):
        if self.P is None:
            self.P = torch.empty(self.nblocks * block_size, dtype=torch.float32, device=self.wire.device)
        return _q.pack(grads, out_dtype=torch.float32, align=block_size, out=self.P)

    def residuals(self, state):
        """(client residual in, client residual out, server residual in, server residual out, [(buffer, views)] to
        write back after the update). `in` views read the state's current residuals, `out` views its next ones
        (double-buffered: the current ones stay intact until the step is known to be finite). Where a bucket's
        runs are not single, `in` and `out` are one gathered copy, updated in place and written back to the next
        buffer's views afterwards."""
        back = []

        def view(cur, nxt, runs, numel, name):
            if len(runs) == 1:
                a, b = runs[0]
                return cur[a:b], nxt[a:b]
            if not runs:
                return cur[:0], nxt[:0]
            buf = getattr(self, name)
            if buf is None or buf.device != cur.device:
                buf = torch.empty(numel, dtype=torch.float32, device=cur.device)
                setattr(self, name, buf)
            _q.pack([cur[a:b] for a, b in runs], out=buf)
            back.append((buf, [nxt[a:b] for a, b in runs]))
            return buf, buf

        B = state.block_size
        res, res_out = view(state._residual, state._residual_next, self.res_runs, self.nblocks * B, "res_buf")
        if state._all_gather:                # no server side: every rank reduces every block
            srv = srv_out = None
        else:
            srv, srv_out = view(state._server_residual, state._server_next, self.srv_runs, self.lens[state.rank],
                                "srv_buf")
        return res, res_out, srv, srv_out, back


def _wire_parts(wire, nblocks, pb):
    return wire[:4 * nblocks].view(nblocks, 4), wire[4 * nblocks:4 * nblocks + nblocks * pb].view(nblocks, pb)


class HookState:
    """State of a pyperf DDP comm hook: options, error-feedback residuals, counters and statistics.
    Made by hooks.register(); save `state_dict()` from every rank and restore with `load_state_dict()`."""

    def __init__(self, kind, process_group=None, params=None, names=None, *, block_size=256,
                 stochastic_rounding=False, error_feedback=True, start_iter=0, min_numel=1024, seed=0,
                 skip_nonfinite=True, stats_every=100, algorithm="auto"):
        if kind not in KINDS:
            raise ValueError("kind: expected one of %s, got %r" % (", ".join(KINDS), kind))
        self.kind = kind
        self.fmt = _QUANT_FMT.get(kind)
        if self.fmt is not None:
            check_format(self.fmt, block_size)
        elif not isinstance(block_size, int) or block_size < 2 or block_size & (block_size - 1):
            raise ValueError("block_size: expected a power of two >= 2, got %r" % (block_size,))
        for name, v in (("start_iter", start_iter), ("min_numel", min_numel), ("stats_every", stats_every)):
            if not isinstance(v, int) or v < 0:
                raise ValueError("%s: expected an int >= 0, got %r" % (name, v))
        if algorithm not in ALGORITHMS:
            raise ValueError("algorithm: expected one of %s, got %r" % (", ".join(ALGORITHMS), algorithm))
        self.process_group = process_group
        group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.algorithm = algorithm
        # with 2 ranks the all-gather form sends the same bytes as the two-shot one in one phase (see the module
        # docstring); with more it sends (W - 1) wires instead of 2 (W - 1) / W
        self._all_gather = algorithm == "all_gather" or (algorithm == "auto" and self.world_size == 2)
        self.block_size = block_size
        self.stochastic_rounding = bool(stochastic_rounding)
        self.error_feedback = bool(error_feedback)
        self.start_iter = start_iter
        self.min_numel = min_numel
        self.seed = int(seed)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.stats_every = stats_every
        self.iter = 0
        self.stats = HookStats()
        self._plans: Dict[tuple, _Plan] = {}
        self._used_plans = set()       # plans of the current step; the others (DDP's old layout) are dropped
        self._in_step = False
        self._cast_buffers = {}        # bf16/fp16 hooks: (bucket index, numel, dtype, device) -> wire buffer
        self._used_cast = set()        # keys used this step; the others (DDP's old layout) are dropped
        self._pending = None           # stage two of the previous bucket of this step (see _defer)
        self._step_nonfinite: List[torch.Tensor] = []
        # Residuals, compact (quantized parameters only, each padded to whole blocks, in model order) so that a
        # bucket's share is a contiguous view; state_dict() converts to the model-wide layout (format 1, below).
        self._residual = None          # [Gc*B] fp32: client residual of every quantized parameter's blocks
        self._server_residual = None   # [Sc*B] fp32: server residual of the blocks this rank reduces (g % W == r)
        self._residual_next = None     # the buffers the current step writes (swapped in when it completes)
        self._server_next = None
        self._wrote_next = False       # this step's buckets wrote the next residuals
        self._swapped = False          # the last step ended by swapping them in (so a rollback swaps back)
        self._set_params(params or [], names)

    # ---- layout -----------------------------------------------------------------------------------------------
    def _set_params(self, params, names):
        self._params = list(params)
        self._names = list(names) if names is not None else ["param%d" % i for i in range(len(self._params))]
        self._gidx = {id(p): i for i, p in enumerate(self._params)}
        self._numels = [p.numel() for p in self._params]
        self._gstart, g = [], 0
        for n in self._numels:
            self._gstart.append(g)
            g += -(-n // self.block_size)
        self._gblocks = g
        self._rows = -(-g // self.world_size) if self.world_size else 0
        # compact residual layout: client blocks of the quantized parameters, and among them the blocks this rank
        # owns (global block g with g % W == rank), both in model order
        W, r = self.world_size, self.rank
        self._cstart, self._sstart, self._sowned = {}, {}, {}
        c = s = 0
        for i, n in enumerate(self._numels):
            if n < self.min_numel:
                continue
            g0, g1 = self._gstart[i], self._gstart[i] + -(-n // self.block_size)
            owned = -((r - g1) // W) - -((r - g0) // W)       # #{g in [g0, g1): g % W == r}
            self._cstart[i], self._sstart[i], self._sowned[i] = c, s, owned
            c += g1 - g0
            s += owned
        self._cblocks, self._sblocks = c, s
        self._maps = None

    def _layout_maps(self):
        """(global block of each compact client block, model-wide server row m = g // W of each compact server
        block), as CPU int64 tensors, for converting to and from the state_dict layout."""
        if self._maps is None:
            B, W, r = self.block_size, self.world_size, self.rank
            parts = [torch.arange(self._gstart[i], self._gstart[i] + -(-self._numels[i] // B)) for i in self._cstart]
            cmap = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
            smap = cmap[cmap % W == r] // W
            assert len(cmap) == self._cblocks and len(smap) == self._sblocks
            self._maps = (cmap, smap)
        return self._maps

    def _ensure_residual(self, device):
        if self._residual is None and self.error_feedback:
            B = self.block_size
            self._residual = torch.zeros(self._cblocks * B, dtype=torch.float32, device=device)
            self._server_residual = torch.zeros(self._sblocks * B, dtype=torch.float32, device=device)
        if self._residual is not None and (self._residual_next is None
                                           or self._residual_next.device != self._residual.device):
            self._residual_next = torch.empty_like(self._residual)
            # the all-gather form never writes server residuals: both buffers stay zero across the swaps
            self._server_next = (torch.zeros_like if self._all_gather else torch.empty_like)(self._server_residual)

    def _plan(self, bucket):
        params = bucket.parameters()
        buf = bucket.buffer()
        key = (tuple(id(p) for p in params), buf.dtype, buf.device)
        self._used_plans.add(key)
        plan = self._plans.get(key)
        if plan is None:
            for p in params:
                if id(p) not in self._gidx:
                    raise RuntimeError("pyperf hook: a bucket holds a parameter that was not in the model when the "
                                       "hook was registered; register the hook after the model is complete")
            plan = self._plans[key] = _Plan(self, params, buf.device)
        return plan

    # ---- step bookkeeping -------------------------------------------------------------------------------------
    def _begin_bucket(self):
        if not self._in_step:
            self._settle()
            self._in_step = True
            self._pending = None      # left by a step that raised before its last bucket: its result is not wanted
            self._wrote_next = False

    def _defer(self, stage_two):
        """Keep this bucket's stage two (wait for its all-to-all, reduce, start the all-gather) until the next
        bucket's hook call, and run the previous bucket's now: the all-to-all then overlaps with the backward pass
        that produces the next bucket, while every collective is still issued from the autograd thread in the same
        order on every rank (Gloo matches collectives by issue order)."""
        prev, self._pending = self._pending, stage_two
        if prev is not None:
            prev()

    def _flush(self, last):
        """At the step's last bucket nothing comes after it: run the pending stage two now."""
        if last and self._pending is not None:
            fn, self._pending = self._pending, None
            fn()

    def _end_bucket(self, bucket):
        self.stats.buckets += 1
        if bucket.is_last():
            self._in_step = False
            # every quantized parameter's residuals were written to the next buffers (each is in exactly one
            # bucket of the step); they become current, the old ones stay for a rollback (_settle)
            self._swapped = self._wrote_next
            if self._wrote_next:
                self._swap_residuals()
                self._wrote_next = False
            self.iter += 1
            self.stats.steps += 1
            if self._used_plans:
                self._plans = {k: v for k, v in self._plans.items() if k in self._used_plans}
                self._used_plans = set()
            if self._used_cast:
                self._cast_buffers = {k: v for k, v in self._cast_buffers.items() if k in self._used_cast}
                self._used_cast = set()

    def _swap_residuals(self):
        self._residual, self._residual_next = self._residual_next, self._residual
        self._server_residual, self._server_next = self._server_next, self._server_residual

    def _settle(self):
        """Roll back the error feedback of a finished step whose gradients were not finite (GradScaler skips it)."""
        flags = list(self._step_nonfinite)
        self._step_nonfinite.clear()
        if not flags:
            return
        if bool(torch.stack([f.reshape(()) for f in flags]).any()):
            self.stats.nonfinite_steps += 1
            if self._residual is not None:
                if self.skip_nonfinite:
                    if self._swapped:         # back to the residuals from before that step (left intact)
                        self._swap_residuals()
                        self._swapped = False
                else:
                    torch.nan_to_num_(self._residual, 0.0, 0.0, 0.0)
                    torch.nan_to_num_(self._server_residual, 0.0, 0.0, 0.0)

    def _compressing(self):
        return self.fmt is not None and self.iter >= self.start_iter

    # ---- checkpoint -------------------------------------------------------------------------------------------
    def state_dict(self):
        """This rank's state: counters, residuals (model-wide, keyed by parameter order), options to validate
        against. Save it from EVERY rank (residuals differ per rank) next to the model and optimizer."""
        if not self._in_step:
            self._settle()
        return {
            "kind": self.kind, "block_size": self.block_size, "world_size": self.world_size, "rank": self.rank,
            "seed": self.seed, "iter": self.iter, "param_numels": list(self._numels), "algorithm": self.algorithm,
            "param_names": list(self._names),
            "residual": None if self._residual is None else self._full(self._residual, self._gblocks, 0),
            "server_residual": None if self._server_residual is None else self._full(self._server_residual,
                                                                                     self._rows, 1),
            "stats": self.stats.as_dict(),
        }

    def all_ranks(self):
        """Every rank's state as one checkpointable object (pyperf.comm.all_ranks.AllRanks): its state_dict() is a
        collective that returns the same dict, all ranks' states, on every rank; its load_state_dict() restores this
        rank's part. For frameworks that save only the main process's state_dict():
        accelerator.register_for_checkpointing(state.all_ranks())."""
        return AllRanks(self, self.process_group)

    def load_state_dict(self, sd):
        for k in ("kind", "block_size", "world_size", "rank"):
            if sd[k] != getattr(self, k):
                raise ValueError("load_state_dict: %s of the saved state is %r but this hook has %r (load the state "
                                 "saved by the same rank with the same options)" % (k, sd[k], getattr(self, k)))
        if list(sd["param_numels"]) != self._numels:
            saved, here = list(sd["param_numels"]), self._numels
            i = next((i for i, (a, b) in enumerate(zip(saved, here)) if a != b), min(len(saved), len(here)))

            def at(seq):
                return seq[i] if i < len(seq) else "none"
            raise ValueError("load_state_dict: the saved state is for another model: %d parameters, this model has "
                             "%d; first difference at parameter %d (%s): %s elements saved, %s here"
                             % (len(saved), len(here), i, at(self._names), at(saved), at(here)))
        self.iter = int(sd["iter"])
        self.seed = int(sd["seed"])
        self._step_nonfinite.clear()
        self._in_step = False
        if sd["residual"] is None:
            self._residual = self._server_residual = self._residual_next = self._server_next = None
        else:
            dev = self._params[0].device if self._params else torch.device("cpu")
            self._residual = self._compact(sd["residual"], self._gblocks, 0, "residual").to(dev)
            self._server_residual = self._compact(sd["server_residual"], self._rows, 1, "server_residual").to(dev)
            self._residual_next = self._server_next = None
            if self._all_gather:          # a two-shot run's server residuals have no use here (no server side)
                self._server_residual.zero_()
            self._ensure_residual(dev)
        st = sd.get("stats") or {}
        for k, v in st.items():
            if k != "compression" and hasattr(self.stats, k):
                setattr(self.stats, k, v)

    def _full(self, compact, rows, which):
        """The state_dict layout of a compact residual: model-wide, [rows * B] fp32 on CPU, zeros where unused
        (client: global block g at row g; server: global block g = m*W + rank at row m)."""
        B = self.block_size
        full = torch.zeros(rows, B, dtype=torch.float32)
        full.index_copy_(0, self._layout_maps()[which], compact.detach().cpu().view(-1, B))
        return full.view(-1)

    def _compact(self, full, rows, which, name):
        B = self.block_size
        if full.numel() != rows * B:
            raise ValueError("load_state_dict: %s: expected %d values, got %d" % (name, rows * B, full.numel()))
        return full.detach().cpu().to(torch.float32).view(rows, B).index_select(0, self._layout_maps()[which]).view(-1)

    def residual_of(self, param):
        """This rank's client-side error-feedback residual of `param` (a copy shaped like it; zeros if none)."""
        g = self._gidx[id(param)]
        n, B = self._numels[g], self.block_size
        if self._residual is None or g not in self._cstart:
            return torch.zeros(param.shape, dtype=torch.float32)
        c = self._cstart[g] * B
        return self._residual[c:c + n].detach().cpu().clone().view(param.shape)


# ---- hooks (torch's signature: hook(state, bucket) -> Future[Tensor]) -------------------------------------------
def _group(state):
    return state.process_group if state.process_group is not None else dist.group.WORLD


def _finish(state, bucket, t0):
    state.stats.hook_time_s += time.perf_counter() - t0
    state._end_bucket(bucket)


def allreduce_hook(state: HookState, bucket):
    """fp32 (the bucket's dtype) all-reduce, mean over ranks; the 1/W scale is applied in place first."""
    t0 = time.perf_counter()
    buf = bucket.buffer()
    W = state.world_size
    state.stats.bytes_sent += _ring_bytes(buf.numel(), buf.element_size(), W)
    state.stats.bytes_fp32_ring += _ring_bytes(buf.numel(), 4, W)
    buf.mul_(1.0 / W)
    fut = dist.all_reduce(buf, group=_group(state), async_op=True).get_future()
    _finish(state, bucket, t0)
    return fut.then(lambda f: f.value()[0])


def _cast_hook(dtype, state, bucket):
    t0 = time.perf_counter()
    buf = bucket.buffer()
    W = state.world_size
    state.stats.bytes_sent += _ring_bytes(buf.numel(), 2, W)
    state.stats.bytes_fp32_ring += _ring_bytes(buf.numel(), 4, W)
    if buf.dtype == dtype:
        comp = buf.mul_(1.0 / W)
    else:
        # one wire buffer per bucket, reused: the bucket's previous all-reduce has completed (DDP waits for every
        # future) before its next hook call, and a fresh large CPU buffer page-faults on every step
        key = (bucket.index(), buf.numel(), dtype, buf.device)
        state._used_cast.add(key)
        comp = state._cast_buffers.get(key)
        if comp is None:
            comp = state._cast_buffers[key] = torch.empty(buf.shape, dtype=dtype, device=buf.device)
        torch.mul(buf, 1.0 / W, out=comp)        # scale and cast in one pass
    fut = dist.all_reduce(comp, group=_group(state), async_op=True).get_future()
    _finish(state, bucket, t0)

    def decompress(f):
        if comp.data_ptr() != buf.data_ptr():
            buf.copy_(f.value()[0])
        return buf

    return fut.then(decompress)


def bf16_hook(state: HookState, bucket):
    """bf16 all-reduce with the 1/W scale and the cast fused (torch's bf16_compress_hook does two passes)."""
    return _cast_hook(torch.bfloat16, state, bucket)


def fp16_hook(state: HookState, bucket):
    """fp16 all-reduce with the 1/W scale and the cast fused (torch's fp16_compress_hook does two passes)."""
    return _cast_hook(torch.float16, state, bucket)


def quantized_hook(state: HookState, bucket):
    """int8/int4/fp8 all-reduce (state.fmt) with per-rank error feedback, two-shot or all-gather (see the module
    docstring)."""
    t0 = time.perf_counter()
    W = state.world_size
    if W == 1 or not state._compressing():
        return allreduce_hook(state, bucket)
    buf = bucket.buffer()
    if buf.dtype not in _FLOAT:
        raise TypeError("pyperf %s hook: gradients must be float32, bfloat16 or float16, got %s"
                        % (state.kind, buf.dtype))
    state._ensure_residual(buf.device)
    state._begin_bucket()
    plan = state._plan(bucket)
    state.stats.compressed_buckets += 1
    state.stats.bytes_fp32_ring += _ring_bytes(buf.numel(), 4, W)
    grads = bucket.gradients()
    if state._all_gather:
        futs = _all_gather_bucket(state, plan, grads, buf)
    else:
        futs = _two_shot_bucket(state, plan, grads, buf)
    state._flush(last=bucket.is_last())
    return _finish_hook(state, bucket, t0, futs, buf)


def _quantize_bucket(state, plan, big_grads):
    """Quantize the bucket's quantized parameters into plan.wire (model order, each padded to whole blocks), with
    the client error feedback. Returns the server residual views (two-shot) and the gathered residual copies to
    write back once the step's residual updates are done."""
    B, pb = state.block_size, plan.pb
    res = res_out = srv = srv_out = None
    back = ()
    if state.error_feedback:
        res, res_out, srv, srv_out, back = plan.residuals(state)
        state._wrote_next = True
    if state.stats_every and state.iter % state.stats_every == 0:
        P = plan.packed(big_grads, B)
        v = P if res is None else P + res
        tmp = torch.zeros_like(v)
        _q.quantize(v, state.fmt, B, residual=tmp)
        vn = float(v.norm())
        state.stats.rel_error = float(tmp.norm()) / vn if vn > 0 else 0.0
    # straight from the bucket's gradients; stochastic rounding: one call per parameter, keyed by parameter index,
    # so the noise does not depend on what else shares the bucket
    if not state.stochastic_rounding:
        _q.quantize_tensors(big_grads, state.fmt, B, residual=res, residual_out=res_out, out=plan.wire)
    else:
        cseed = mix_seed(state.seed, 1, state.rank, state.iter)
        P = plan.packed(big_grads, B)
        for k, g in enumerate(plan.gidx):
            a, b = plan.pstart[k], plan.pstart[k + 1]
            sub = _q.quantize(P[a * B:b * B], state.fmt, B, stochastic=True, seed=cseed, offset=g,
                              residual=None if res is None else res[a * B:b * B],
                              residual_out=None if res is None else res_out[a * B:b * B])
            sc, pl = _wire_parts(sub, b - a, pb)
            plan.scales[a:b].copy_(sc)
            plan.payload[a:b].copy_(pl)
    return srv, srv_out, back


def _sum_small(g, W):
    """fp32 sum of the W rows of g in rank order (exact-mean-accurate, the same on every rank)."""
    tot = g[0].clone()
    for s in range(1, W):
        tot.add_(g[s])
    return tot


def _all_gather_bucket(state, plan, grads, buf):
    """One all-gather per bucket: [quantized wire][fp32 values of the parameters below min_numel] from every rank;
    when it completes every rank sums all W in rank order, straight into the gradients (the backend's thread)."""
    W, B, fmt = state.world_size, state.block_size, state.fmt
    stats, flags = state.stats, state._step_nonfinite   # what the callback may touch (never the state itself:
    # it holds the process group, whose last reference must not die on the backend's worker thread)
    big_grads = [grads[i] for i in plan.canon]
    small_grads = [grads[i] for i in plan.small]
    if plan.nblocks:
        _, _, back = _quantize_bucket(state, plan, big_grads)
        for buf_, views in back:          # residuals that were gathered (buckets that are not parameter ranges)
            _q.unpack(buf_, views)
    if plan.small_numel:
        _q.pack(small_grads, out_dtype=torch.float32, out=plan.small_f32)
    if plan.send_all.numel() == 0:        # a bucket of zero-size parameters
        return []
    stats.bytes_sent += (W - 1) * plan.send_all.numel()
    fut = _all_gather(plan.gathered.view(-1), plan.send_all, group=_group(state), async_op=True).get_future()
    qb = plan.send_all.numel() - 4 * plan.small_numel       # the quantized wire's bytes

    def reduce_all(f):
        t1 = time.perf_counter()
        f.value()
        g = plan.gathered
        if plan.nblocks:
            flags.append(~torch.isfinite(g[:, :4 * plan.nblocks].view(torch.float32)).all())
            _q.reduce_quantized_tensors(g[:, :qb], big_grads, fmt, B, scale=1.0 / W)
        if plan.small_numel:
            tot = _sum_small(g[:, qb:].view(torch.float32), W)
            flags.append(~torch.isfinite(tot).all())
            _q.unpack(tot, small_grads, scale=1.0 / W)
        stats.hook_time_s += time.perf_counter() - t1
        return buf

    return [fut.then(reduce_all)]


def _two_shot_bucket(state, plan, grads, buf):
    W, B, fmt = state.world_size, state.block_size, state.fmt
    dev, group = buf.device, _group(state)
    stats, flags = state.stats, state._step_nonfinite
    futs = []
    # parameters below min_numel: fp32 all-gather, summed in rank order (exact, layout-independent)
    if plan.small_numel:
        small_grads = [grads[i] for i in plan.small]
        small = _q.pack(small_grads, out_dtype=torch.float32)
        gathered = torch.empty(W * plan.small_numel, dtype=torch.float32, device=dev)
        stats.bytes_sent += (W - 1) * plan.small_numel * 4
        sfut = _all_gather(gathered, small, group=group, async_op=True).get_future()

        def unpack_small(f, gathered=gathered, small_grads=small_grads):
            t1 = time.perf_counter()
            f.value()
            tot = _sum_small(gathered.view(W, -1), W)
            flags.append(~torch.isfinite(tot).all())
            _q.unpack(tot, small_grads, scale=1.0 / W)
            stats.hook_time_s += time.perf_counter() - t1
            return buf

        futs.append(sfut.then(unpack_small))
    if not plan.nblocks:
        return futs

    pb = plan.pb
    big_grads = [grads[i] for i in plan.canon]
    srv, srv_out, back = _quantize_bucket(state, plan, big_grads)
    sr = state.stochastic_rounding
    sseed = mix_seed(state.seed, 2, state.rank, state.iter)
    # move whole quantized blocks (1/4 of the fp32 bytes) into per-owner segments
    ts, send = plan.two_shot, plan.send
    for s in range(W):
        c = plan.bounds[s + 1] - plan.bounds[s]
        if c:
            sc, pl = _wire_parts(send[ts.woffs[s]:ts.woffs[s + 1]], c, pb)
            torch.index_select(plan.scales, 0, plan.perm_seg[s], out=sc)
            torch.index_select(plan.payload, 0, plan.perm_seg[s], out=pl)

    def requant(total):
        c = plan.bounds[state.rank + 1] - plan.bounds[state.rank]
        wire = torch.empty(_q.wire_bytes(c * B, fmt, B), dtype=torch.uint8, device=dev)
        sc_all, pl_all = _wire_parts(wire, c, pb)
        for k0, n, g in plan.runs:
            sub = _q.quantize(total[k0 * B:(k0 + n) * B], fmt, B, stochastic=True, seed=sseed, offset=g,
                              residual=None if srv is None else srv[k0 * B:(k0 + n) * B],
                              residual_out=None if srv is None else srv_out[k0 * B:(k0 + n) * B])
            sc, pl = _wire_parts(sub, n, pb)
            sc_all[k0:k0 + n].copy_(sc)
            pl_all[k0:k0 + n].copy_(pl)
        return wire

    work, recv = ts.exchange(group, send, plan.ts_buffers)
    done = torch.futures.Future()

    def stage_two():
        # wait for the all-to-all, reduce this rank's segment, start the all-gather; the dequantize into the
        # gradients runs when the all-gather completes (on the backend's thread)
        t1 = time.perf_counter()
        try:
            mine = ts.reduce(work, recv, scale=1.0 / W, server_residual=srv, server_residual_out=srv_out,
                             requantize=requant if sr else None, buffers=plan.ts_buffers)
            gfut, gathered = ts.gather(group, mine, out=plan.ts_buffers[2])
            stats.bytes_sent += ts.bytes_sent()
            for buf_, views in back:      # residuals that were gathered (buckets that are not parameter ranges)
                _q.unpack(buf_, views)
        except BaseException as e:
            done.set_exception(e)
            raise
        stats.hook_time_s += time.perf_counter() - t1
        _forward(gfut.then(functools.partial(unpack_big, gathered=gathered)), done)

    def unpack_big(f, *, gathered):
        t1 = time.perf_counter()
        f.value()
        # segments back to model order: contiguous copies, then one gather per part (CPU index_copy_ of
        # byte rows is ~30x slower than index_select)
        for s in range(W):
            a, b = plan.bounds[s], plan.bounds[s + 1]
            if b > a:
                sc, pl = _wire_parts(gathered[s], b - a, plan.pb)
                plan.seg_scales[a:b].copy_(sc)
                plan.seg_payload[a:b].copy_(pl)
        torch.index_select(plan.seg_scales, 0, plan.inv, out=plan.scales)
        torch.index_select(plan.seg_payload, 0, plan.inv, out=plan.payload)
        # the fp32 block scales tell whether any block (any rank's) was inf/nan
        flags.append(~torch.isfinite(plan.scales.view(torch.float32)).all())
        _q.dequantize_tensors(plan.wire, big_grads, fmt, B)
        stats.hook_time_s += time.perf_counter() - t1
        return buf

    futs.append(done)
    state._defer(stage_two)
    return futs


def _finish_hook(state, bucket, t0, futs, buf):
    _finish(state, bucket, t0)
    if not futs:                       # a bucket of zero-size parameters
        done = torch.futures.Future()
        done.set_result(buf)
        return done
    if len(futs) == 1:
        return futs[0]
    return torch.futures.collect_all(futs).then(lambda f: [x.value() for x in f.value()][0])


_HOOKS = {"allreduce": allreduce_hook, "bf16": bf16_hook, "fp16": fp16_hook}


def hook_for(kind):
    """The raw hook function of `kind` (for ddp_model.register_comm_hook(state, hook))."""
    if kind not in KINDS:
        raise ValueError("kind: expected one of %s, got %r" % (", ".join(KINDS), kind))
    return _HOOKS.get(kind, quantized_hook)


def register(ddp_model, kind, *, process_group=None, **options):
    """Register pyperf's `kind` hook on `ddp_model` (a DistributedDataParallel) and return its HookState.

    kind: allreduce | bf16 | fp16 | int8 | int4 | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2.
    options (quantized kinds): block_size=256 (power of two), stochastic_rounding=False, error_feedback=True,
    start_iter=0 (plain fp32 all-reduce for the first N steps), min_numel=1024 (smaller parameters go fp32),
    seed=0, skip_nonfinite=True (roll residuals back after an inf/nan step), stats_every=100 (measure the
    quantization error every N steps; 0: never), algorithm="auto" (two_shot: all-to-all, reduce, all-gather of the
    reduced segments; all_gather: every rank's whole wire to every rank, each reduces all; auto: all_gather for 2
    ranks, where it sends the same bytes in one phase, else two_shot).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP
    if not isinstance(ddp_model, DDP):
        raise TypeError("ddp_model: expected a torch.nn.parallel.DistributedDataParallel, got %s"
                        % type(ddp_model).__name__)
    if kind not in KINDS:
        raise ValueError("kind: expected one of %s, got %r" % (", ".join(KINDS), kind))
    if getattr(ddp_model, "_pyperf_hook_state", None) is not None:
        raise RuntimeError("register: this DDP model already has a pyperf %r hook; DDP allows one comm hook per "
                           "model (build a new DDP wrapper to change it)" % ddp_model._pyperf_hook_state.kind)
    pg = ddp_model.process_group
    if process_group is not None and process_group is not pg:
        raise ValueError("process_group: the hook must use the DDP model's own process group (size %d), got "
                         "another group (size %d)" % (dist.get_world_size(pg), dist.get_world_size(process_group)))
    named = [(n, p) for n, p in ddp_model.module.named_parameters() if p.requires_grad]
    if _QUANT_FMT.get(kind) or kind in ("bf16", "fp16"):
        bad = sorted({str(p.dtype) for _, p in named if p.dtype not in _FLOAT})
        if bad:
            raise TypeError("register: the %r hook supports float32, bfloat16 and float16 parameters, the model has "
                            "%s" % (kind, ", ".join(bad)))
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise TypeError("register: unknown option(s) %s" % ", ".join(sorted(unknown)))
    state = HookState(kind, pg, [p for _, p in named], [n for n, _ in named], **options)
    ddp_model.register_comm_hook(state, hook_for(kind))
    ddp_model._pyperf_hook_state = state
    return state
