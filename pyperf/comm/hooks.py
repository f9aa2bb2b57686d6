"""DDP communication hooks: fused-scale fp32/bf16/fp16 all-reduce and the two-shot quantized all-reduce with
error feedback, plus the state they keep (residuals, counters, statistics).

Why the quantized hook looks the way it does:
- DDP's bucket layout changes after the first iteration and again at every restart (a resumed run starts with the
  initial layout). Everything that decides a result is therefore keyed by parameter, never by bucket: the
  quantization blocks start at parameter boundaries (each parameter padded to block_size), global block g (in the
  order of the model's parameters) is always reduced by rank g % W, and the error-feedback residuals live in one
  model-wide buffer indexed by global block. A bucket just selects blocks; the same blocks come out bit for bit
  whatever the bucket composition.
- Small parameters (numel < min_numel) are not quantized: they are all-gathered in fp32 and summed in rank order,
  which is exact-mean-accurate and, unlike a ring all-reduce, independent of the bucket layout.
- GradScaler: a non-finite gradient comes out non-finite (the step is skipped by the scaler); the residuals are
  rolled back to their value before that step when the next step starts (skip_nonfinite=True).
"""
import math
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from pyperf.comm.quantized import FORMATS, TwoShot, _all_gather, _q, check_format, mix_seed

KINDS = ("allreduce", "bf16", "fp16", "int8", "int4", "fp8", "fp8_e4m3", "fp8_e5m2")
_QUANT_FMT = {"int8": "int8", "int4": "int4", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_STEP_STRIDE = 1 << 36          # Philox counter space per step (elements per rank row are far fewer)


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


class _Plan:
    """How one bucket (one set of parameters, in DDP's order) maps onto the model-wide block layout."""

    def __init__(self, state, bucket_params, numels, device):
        B, W, r = state.block_size, state.world_size, state.rank
        idx = [state._gidx[id(p)] for p in bucket_params]
        offs = [0]
        for n in numels:
            offs.append(offs[-1] + n)
        self.numel = offs[-1]
        small = [state._numels[g] < state.min_numel for g in idx]
        # fp32 part: parameters below min_numel, in bucket order
        self.small = [(offs[i], numels[i]) for i in range(len(idx)) if small[i]]
        self.small_numel = sum(n for _, n in self.small)
        # quantized part: P = canonical (global-order) per-parameter padded layout
        big = sorted((g, offs[i], numels[i]) for i, g in enumerate(idx) if not small[i])
        self.big = []
        pblocks, gblocks = [], []
        pstart = 0
        for g, off, n in big:
            nb = -(-n // B)
            self.big.append((off, n, pstart * B))
            pblocks.append(torch.arange(pstart, pstart + nb))
            gblocks.append(torch.arange(state._gstart[g], state._gstart[g] + nb))
            pstart += nb
        self.nblocks = pstart
        self.big_numel = sum(n for _, n, _ in self.big)
        if self.nblocks == 0:
            return
        gb = torch.cat(gblocks)
        owner = gb % W
        perm = torch.argsort(owner * self.nblocks + torch.arange(self.nblocks), stable=True)
        counts = torch.bincount(owner, minlength=W).tolist()
        self.lens = [c * B for c in counts]
        m = (gb // W)[perm]
        self.segs = []                   # per rank s: (m0, contiguous, m indices)
        start = 0
        for s in range(W):
            ms = m[start:start + counts[s]]
            start += counts[s]
            m0 = int(ms[0]) if len(ms) else 0
            contiguous = len(ms) == 0 or bool((ms == torch.arange(m0, m0 + len(ms))).all())
            self.segs.append((m0, contiguous, ms.to(device)))
        self.perm = perm.to(device)
        self.inv = torch.argsort(perm).to(device)
        self.P = torch.zeros(self.nblocks * B, dtype=torch.float32, device=device)   # padding stays zero
        self.S = torch.empty(self.nblocks * B, dtype=torch.float32, device=device)
        self.two_shot = TwoShot(self.lens, state.fmt, B, r, W)


class HookState:
    """State of a pyperf DDP comm hook: options, error-feedback residuals, counters and statistics.
    Made by hooks.register(); save `state_dict()` from every rank and restore with `load_state_dict()`."""

    def __init__(self, kind, process_group=None, params=None, names=None, *, block_size=256,
                 stochastic_rounding=False, error_feedback=True, start_iter=0, min_numel=1024, seed=0,
                 skip_nonfinite=True, stats_every=100):
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
        self.process_group = process_group
        group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
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
        self._in_step = False
        self._step_nonfinite: List[torch.Tensor] = []
        self._residual = None          # [W, M*B] fp32: client residual of global block g at (g % W, g // W)
        self._server_residual = None   # [M*B] fp32: server residual of the blocks this rank reduces
        self._backup = None
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

    def _ensure_residual(self, device):
        if self._residual is None and self.error_feedback:
            B = self.block_size
            self._residual = torch.zeros(self.world_size, self._rows * B, dtype=torch.float32, device=device)
            self._server_residual = torch.zeros(self._rows * B, dtype=torch.float32, device=device)

    def _plan(self, bucket):
        params = bucket.parameters()
        buf = bucket.buffer()
        key = (tuple(id(p) for p in params), buf.dtype, buf.device)
        plan = self._plans.get(key)
        if plan is None:
            for p in params:
                if id(p) not in self._gidx:
                    raise RuntimeError("pyperf hook: a bucket holds a parameter that was not in the model when the "
                                       "hook was registered; register the hook after the model is complete")
            numels = [p.numel() for p in params]
            if sum(numels) != buf.numel():
                raise RuntimeError("pyperf hook: bucket buffer has %d elements but its parameters %d"
                                   % (buf.numel(), sum(numels)))
            plan = self._plans[key] = _Plan(self, params, numels, buf.device)
        return plan

    # ---- step bookkeeping -------------------------------------------------------------------------------------
    def _begin_bucket(self):
        if not self._in_step:
            self._settle()
            self._in_step = True
            if self.skip_nonfinite and self._residual is not None and self._compressing():
                if self._backup is None:
                    self._backup = (torch.empty_like(self._residual), torch.empty_like(self._server_residual))
                self._backup[0].copy_(self._residual)
                self._backup[1].copy_(self._server_residual)

    def _end_bucket(self, bucket):
        self.stats.buckets += 1
        if bucket.is_last():
            self._in_step = False
            self.iter += 1
            self.stats.steps += 1

    def _settle(self):
        """Roll back the error feedback of a finished step whose gradients were not finite (GradScaler skips it)."""
        flags = list(self._step_nonfinite)
        self._step_nonfinite.clear()
        if not flags:
            return
        if bool(torch.stack([f.reshape(()) for f in flags]).any()):
            self.stats.nonfinite_steps += 1
            if self._residual is not None:
                if self._backup is not None:
                    self._residual.copy_(self._backup[0])
                    self._server_residual.copy_(self._backup[1])
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
            "seed": self.seed, "iter": self.iter, "param_numels": list(self._numels),
            "param_names": list(self._names),
            "residual": None if self._residual is None else self._residual.detach().cpu().clone(),
            "server_residual": None if self._server_residual is None else self._server_residual.detach().cpu().clone(),
            "stats": self.stats.as_dict(),
        }

    def load_state_dict(self, sd):
        for k in ("kind", "block_size", "world_size", "rank"):
            if sd[k] != getattr(self, k):
                raise ValueError("load_state_dict: %s of the saved state is %r but this hook has %r (load the state "
                                 "saved by the same rank with the same options)" % (k, sd[k], getattr(self, k)))
        if list(sd["param_numels"]) != self._numels:
            raise ValueError("load_state_dict: the saved state is for parameters of sizes %s, this model has %s"
                             % (sd["param_numels"][:8], self._numels[:8]))
        self.iter = int(sd["iter"])
        self.seed = int(sd["seed"])
        self._step_nonfinite.clear()
        self._in_step = False
        if sd["residual"] is None:
            self._residual = self._server_residual = self._backup = None
        else:
            dev = self._params[0].device if self._params else torch.device("cpu")
            self._residual = sd["residual"].to(dev, torch.float32).clone()
            self._server_residual = sd["server_residual"].to(dev, torch.float32).clone()
            self._backup = None
        st = sd.get("stats") or {}
        for k, v in st.items():
            if k != "compression" and hasattr(self.stats, k):
                setattr(self.stats, k, v)

    def residual_of(self, param):
        """This rank's client-side error-feedback residual of `param` (a copy shaped like it; zeros if none)."""
        g = self._gidx[id(param)]
        n, B, W = self._numels[g], self.block_size, self.world_size
        out = torch.zeros(-(-n // B) * B, dtype=torch.float32)
        if self._residual is not None:
            gb = torch.arange(self._gstart[g], self._gstart[g] + out.numel() // B)
            out.view(-1, B).copy_(self._residual.cpu().view(W, -1, B)[gb % W, gb // W])
        return out[:n].view(param.shape)


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
        comp = torch.empty(buf.shape, dtype=dtype, device=buf.device)
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
    """Two-shot int8/int4/fp8 all-reduce (state.fmt) with per-rank error feedback; see the module docstring."""
    t0 = time.perf_counter()
    W = state.world_size
    if W == 1 or not state._compressing():
        return allreduce_hook(state, bucket)
    buf = bucket.buffer()
    if buf.dtype not in _FLOAT:
        raise TypeError("pyperf %s hook: gradients must be float32, bfloat16 or float16, got %s"
                        % (state.kind, buf.dtype))
    dev = buf.device
    state._ensure_residual(dev)
    state._begin_bucket()
    plan = state._plan(bucket)
    group = _group(state)
    B = state.block_size
    stats, flags = state.stats, state._step_nonfinite   # what the callbacks may touch (never the state itself:
    # it holds the process group, whose last reference must not die on the backend's worker thread)
    state.stats.compressed_buckets += 1
    state.stats.bytes_fp32_ring += _ring_bytes(buf.numel(), 4, W)
    futs = []

    # parameters below min_numel: fp32 all-gather, summed in rank order (exact, layout-independent)
    if plan.small_numel:
        small = torch.empty(plan.small_numel, dtype=torch.float32, device=dev)
        o = 0
        for off, n in plan.small:
            small[o:o + n].copy_(buf[off:off + n])
            o += n
        gathered = torch.empty(W * plan.small_numel, dtype=torch.float32, device=dev)
        state.stats.bytes_sent += (W - 1) * plan.small_numel * 4
        sfut = _all_gather(gathered, small, group=group, async_op=True).get_future()

        def unpack_small(f, gathered=gathered, plan=plan, stats=stats, flags=flags):
            t1 = time.perf_counter()
            f.value()
            g = gathered.view(W, -1)
            tot = g[0].clone()
            for s in range(1, W):
                tot.add_(g[s])
            tot.mul_(1.0 / W)
            flags.append(~torch.isfinite(tot).all())
            o = 0
            for off, n in plan.small:
                buf[off:off + n].copy_(tot[o:o + n])
                o += n
            stats.hook_time_s += time.perf_counter() - t1
            return buf

        futs.append(sfut.then(unpack_small))

    if plan.nblocks:
        ts = plan.two_shot
        P, S = plan.P, plan.S
        for off, n, pst in plan.big:
            P[pst:pst + n].copy_(buf[off:off + n])
        torch.index_select(P.view(-1, B), 0, plan.perm, out=S.view(-1, B))
        res, srv, scatter = None, None, []
        if state.error_feedback:
            res = []
            for s in range(W):
                m0, contiguous, ms = plan.segs[s]
                rows = state._residual[s].view(-1, B)
                if contiguous:
                    res.append(rows[m0:m0 + len(ms)].view(-1))
                else:
                    seg = rows.index_select(0, ms).view(-1)
                    res.append(seg)
                    scatter.append((rows, ms, seg))
            m0, contiguous, ms = plan.segs[state.rank]
            rows = state._server_residual.view(-1, B)
            if contiguous:
                srv = rows[m0:m0 + len(ms)].view(-1)
            else:
                srv = rows.index_select(0, ms).view(-1)
                scatter.append((rows, ms, srv))
        measure = state.stats_every and state.iter % state.stats_every == 0
        if measure:
            v = S.clone()
            if res is not None:
                for s in range(W):
                    v[ts.offs[s]:ts.offs[s + 1]].add_(res[s])
            tmp = torch.zeros_like(v)
            _q.quantize(v, state.fmt, B, residual=tmp)
            vn = float(v.norm())
            state.stats.rel_error = float(tmp.norm()) / vn if vn > 0 else 0.0
        base = state.iter * _STEP_STRIDE
        qfut = ts.run(group, S, S, scale=1.0 / W, residual=res, server_residual=srv,
                      stochastic=state.stochastic_rounding,
                      seeds=(mix_seed(state.seed, 1, state.rank), mix_seed(state.seed, 2, state.rank)),
                      offsets=[base + plan.segs[s][0] * B for s in range(W)],
                      server_offset=base + plan.segs[state.rank][0] * B)
        state.stats.bytes_sent += ts.bytes_sent()

        def unpack_big(f, plan=plan, ts=ts, scatter=scatter, stats=stats, flags=flags):
            t1 = time.perf_counter()
            f.value()
            flags.append(ts.nonfinite)
            for rows, ms, seg in scatter:
                rows.index_copy_(0, ms, seg.view(-1, B))
            torch.index_select(plan.S.view(-1, B), 0, plan.inv, out=plan.P.view(-1, B))
            for off, n, pst in plan.big:
                buf[off:off + n].copy_(plan.P[pst:pst + n])
            # P's padding must stay zero for the next pack
            for off, n, pst in plan.big:
                r = (-n) % B
                if r:
                    plan.P[pst + n:pst + n + r].zero_()
            stats.hook_time_s += time.perf_counter() - t1
            return buf

        futs.append(qfut.then(unpack_big))

    _finish(state, bucket, t0)
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
    quantization error every N steps; 0: never).
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
    unknown = set(options) - {"block_size", "stochastic_rounding", "error_feedback", "start_iter", "min_numel",
                              "seed", "skip_nonfinite", "stats_every"}
    if unknown:
        raise TypeError("register: unknown option(s) %s" % ", ".join(sorted(unknown)))
    state = HookState(kind, pg, [p for _, p in named], [n for n, _ in named], **options)
    ddp_model.register_comm_hook(state, hook_for(kind))
    ddp_model._pyperf_hook_state = state
    return state
