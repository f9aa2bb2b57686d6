"""FSDP2 (`torch.distributed.fsdp.fully_shard`): compressed gradient reduce-scatter (see docs/fsdp.md).

    import pyperf.fsdp
    state = pyperf.fsdp.register(model, "int8")      # fp32 | bf16 | fp16 | int8 | int4 | fp8 (= fp8_e4m3) | fp8_e5m2
    ...train as usual...
    state.stats                                      # bytes vs an fp32 reduce-scatter, quantization error, time
    torch.save(state.state_dict(), f"fsdp_hook_rank{rank}.pt")      # from EVERY rank, next to the DCP checkpoint
    pyperf.fsdp.register_all_gather(model)          # Gloo: FSDP's all-gathers at the link's rate, prefetch overlapped

How a compressed reduce-scatter works. FSDP fills its input as [W, S] rows (row r: rank r's shard, each parameter's
dim-0 chunk padded, in the parameter group's order) and calls our comm with the output shard [S] and the reduce
`op`. Each rank quantizes every row but its own (which never travels) blockwise, blocks starting at parameter
boundaries inside the row (so a parameter's scales never mix with its neighbour's), into one uint8 wire per row:
[quantized blocks (ops.quantize_tensors)][fp32 values of the parameters below min_numel][fp32 sentinel].
One all-to-all of the rows (all_to_all_single; on Gloo 1 MB point-to-point messages, pyperf.comm.transport, which
fill the link where Gloo's all_to_all reaches half of it) hands row s of every rank to rank s, which runs one fused
pass (ops.reduce_quantized_tensors):
dequantize, sum in fp32 in rank order 0..W-1 (its own row's exact values in its place), times the op's scale,
written into the output shard in FSDP's reduce dtype. Each rank sends (W - 1) wires: about 0.254x (int8) / 0.129x
(int4) of an fp32 reduce-scatter's bytes with 256-element blocks, for any world size, in one exchange. The result is
deterministic (fixed rank order).

Why the rest looks the way it does:
- FSDP's input holds only the parameters that have a gradient this step, so the layout is read when FSDP decides
  it: each parameter group's post_backward is wrapped to note which of its parameters have a gradient (FSDP's own
  rule), just before FSDP clears them. The comm checks that layout against the sizes it is given and falls back to
  "all" / "all requiring grad" when the note is missing; a mismatch is an error, never a silent wrong layout.
- Error feedback is kept per (parameter, destination row), fp32, in model order inside each parameter group; it
  outlives FSDP's lazy initialization (nothing is allocated before the first compressed reduce-scatter) and a
  restart (state_dict() is keyed by parameter name and row). It costs 4 bytes per parameter per rank (the residual
  is of this rank's whole unsharded gradient), 8 with skip_nonfinite=True, which double-buffers it to undo a step
  that GradScaler skips; parameters frozen at registration get none.
- A step is one backward pass that reduces (autograd's graph task id); with gradient accumulation
  (set_requires_gradient_sync(False)) FSDP reduces only in the last micro-batch, so that is the step.
- inf/nan: a block holding one has a non-finite scale, and the reduce turns it into inf/nan in the output, so
  GradScaler sees it. FSDP's shards differ per rank, so a rank cannot tell from its own output whether another
  rank's shard was non-finite; each wire therefore carries a sentinel (nan when the sender's input had any
  inf/nan), and every rank learns the same "this step was non-finite" from the all-to-all itself. The residuals of
  such a step are rolled back when the next step starts. On CPU that decision reads the flag on the host (the
  work has completed); on CUDA it is a torch.where on the stream, so the GPU path never syncs with the host.
- Everything is enqueued on the current stream at call time (FSDP records its event right after the call): on
  NCCL the all-to-all is stream-ordered. On the CPU with Gloo there is no stream, and FSDP's collectives block
  backward; there the rows travel while backward goes on and are finished in an end-of-backward callback (the
  autograd engine's queue_callback, as DDP's reducer does), whenever FSDP will not read the output before that
  (_overlaps lists when); otherwise the call is synchronous.
"""
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from pyperf import ops as _q
from pyperf.comm.hooks import _runs, _sum_small
from pyperf.comm.quantized import check_format, mix_seed
from pyperf.comm.transport import all_gather_rows, all_to_all_rows

KINDS = ("fp32", "bf16", "fp16", "int8", "int4", "fp8", "fp8_e4m3", "fp8_e5m2")
_QUANT_FMT = {"int8": "int8", "int4": "int4", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}
_CAST = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_QUANT_OPTIONS = ("block_size", "error_feedback", "stochastic_rounding", "min_numel", "seed", "skip_nonfinite",
                  "stats_every")
_ALL_OPTIONS = _QUANT_OPTIONS + ("start_iter",)
_FORMAT = 2   # state_dict format (2: each rank's own row is exact, so its residual row stays zero)

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

try:   # the protocols FSDP documents for set_custom_reduce_scatter / _all_gather (private module; FSDP duck-types)
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather as _AllGatherBase
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter as _ReduceScatterBase
except ImportError:  # pragma: no cover
    _AllGatherBase = _ReduceScatterBase = object


def _graph_task_id():
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn() if fn is not None else -1


def op_scale(op, world_size):
    """The factor FSDP's reduce `op` applies to the sum: AVG 1/W, SUM 1, PREMUL_SUM(f) f."""
    R = dist.ReduceOp
    if op == R.AVG:
        return 1.0 / world_size
    if op == R.SUM:
        return 1.0
    if op == R.PREMUL_SUM:
        factor = getattr(op, "factor", None)          # torch >= 2.14
        if factor is None and hasattr(op, "__getstate__"):
            st = op.__getstate__()                    # (RedOpType.PREMUL_SUM, factor) on 2.11 through 2.14
            factor = st[1] if isinstance(st, tuple) and len(st) == 2 else None
        if factor is None:
            raise ValueError("op: a PREMUL_SUM without a readable factor (%r)" % (op,))
        return float(factor)
    raise ValueError("op: expected ReduceOp.AVG, SUM or PREMUL_SUM (what FSDP passes), got %r" % (op,))


class FSDPStats:
    """Counters a FSDPCompressionState accumulates; `as_dict()` for logging. rel_error and nonfinite_steps are kept
    on the gradients' device and read (one host sync) when you access them."""

    def __init__(self):
        self.steps = 0                     # backward passes that reduced (see the module docstring)
        self.reduce_scatters = 0           # calls (one per FSDP parameter group per step)
        self.compressed_reduce_scatters = 0
        self.bytes_sent = 0                # bytes this rank sent
        self.bytes_fp32 = 0                # what an fp32 reduce-scatter of the same input would have sent
        self.comm_time_s = 0.0             # host time in the reduce-scatter calls (CUDA: launch time; overlapped:
                                           # until the rows are on their way)
        self.overlapped_reduce_scatters = 0    # calls whose rows travelled on while backward went on (CPU + Gloo)
        self._nonfinite = 0                # int, or a device tensor (steps whose gradients had inf/nan)
        self._open_flag = None             # the current step's flag (counted once the next step starts)
        self._rel = float("nan")           # float or a 0-d device tensor

    @property
    def nonfinite_steps(self):
        n = self._nonfinite
        if self._open_flag is not None:
            n = n + self._open_flag.to(torch.int64)
        return int(n)

    @property
    def rel_error(self):
        """||Q(v) - v|| / ||v|| of this rank's quantized input (gradient + residual: the rows it sends, not its own
        row, which is summed exact), measured every stats_every steps over all parameter groups of that step."""
        return float(self._rel)

    @property
    def compression(self):
        """bytes_sent / bytes_fp32 (~0.25 for int8, ~0.5 for bf16)."""
        return self.bytes_sent / self.bytes_fp32 if self.bytes_fp32 else float("nan")

    def as_dict(self):
        d = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        d["nonfinite_steps"] = self.nonfinite_steps
        d["rel_error"] = self.rel_error
        d["compression"] = self.compression
        return d

    def __repr__(self):
        return "FSDPStats(%s)" % ", ".join("%s=%s" % kv for kv in self.as_dict().items())


class _Plan:
    """The layout of one reduce-scatter input: which of the unit's parameters it holds (FSDP leaves out those
    without a gradient), where each one's segment lies in a row, and the wire that carries a row."""

    def __init__(self, unit, included, B, quantized):
        self.included = included
        self.offs, self.segs = [], []
        pos = 0
        for i in included:
            self.offs.append(pos)
            self.segs.append(unit.segs[i])
            pos += unit.segs[i]
        self.S = pos
        if not quantized:
            return
        self.big = [k for k, i in enumerate(included) if unit.big[i]]
        self.small = [k for k, i in enumerate(included) if not unit.big[i]]
        self.gidx = [unit.gidx[included[k]] for k in self.big]        # global parameter index (SR key)
        self.nbs = [-(-self.segs[k] // B) for k in self.big]
        self.nblocks = sum(self.nbs)
        self.qb = _q.wire_bytes(self.nblocks * B, unit.fmt, B) if self.nblocks else 0
        self.sn = sum(self.segs[k] for k in self.small)
        self.row_bytes = self.qb + 4 * self.sn + 4                  # + the fp32 sentinel
        self.pb = (self.qb - 4 * self.nblocks) // self.nblocks if self.nblocks else 0
        self.bstart = [0]
        for nb in self.nbs:
            self.bstart.append(self.bstart[-1] + nb)
        # residual columns of each included quantized parameter (None: it has none, it was frozen at registration)
        self.pieces = [None if unit.roff[included[k]] is None else
                       (unit.roff[included[k]], unit.roff[included[k]] + nb * B) for k, nb in zip(self.big, self.nbs)]
        self.has_res = any(p is not None for p in self.pieces)
        # all of the unit's residuals, in order: each row's residual is a plain view, no gather
        self.full = None not in self.pieces and _runs(self.pieces) == [(0, unit.R)]
        inc = set(included)
        self.excluded_runs = _runs((unit.roff[i], unit.roff[i] + -(-unit.segs[i] // B) * B)
                                   for i in range(len(unit.segs)) if unit.roff[i] is not None and i not in inc)


class _Unit:
    """One FSDP parameter group: its parameters, their segments in a reduce-scatter row, and their residuals."""

    def __init__(self, state, module, group, names, first_gidx):
        self.module, self.group = module, group
        mi = group.mesh_info
        self.world_size, self.rank = int(mi.shard_mesh_size), int(mi.shard_mesh_rank)
        self.fmt = state.fmt
        B = state.block_size
        self.fsdp_params = list(group.fsdp_params)
        self.names, self.segs, self.numels, self.big, self.gidx, self.roff = [], [], [], [], [], []
        r = 0
        for k, fp in enumerate(self.fsdp_params):
            self.names.append(names[id(fp.sharded_param)])
            self.segs.append(_padded_shard_numel(fp, self.world_size))
            n = _orig_numel(fp)
            self.numels.append(n)
            big = state.fmt is not None and n >= state.min_numel and n > 0
            self.big.append(big)
            self.gidx.append(first_gidx + k)
            # residuals for the quantized parameters that train: a frozen base model (LoRA-style fine-tuning)
            # would otherwise cost 4-8 bytes per frozen parameter for nothing
            if big and state.error_feedback and fp.sharded_param.requires_grad:
                self.roff.append(r)
                r += -(-self.segs[-1] // B) * B
            else:
                self.roff.append(None)
        self.R = r                       # residual row length (quantized parameters, each padded to whole blocks)
        self.res = None                  # [W, R] fp32: current residuals
        self.res_prev = None             # [W, R]: the other buffer (skip_nonfinite): before the last step that wrote
        self.res_flag = None             # that step's non-finite flag, until settled
        self.plans: Dict[tuple, _Plan] = {}
        self.noted = None                # parameters with a gradient, noted by the wrapped post_backward
        self.orig_post_backward = None

    def plan(self, state, n_in, n_out):
        W = self.world_size
        candidates = []
        if self.noted is not None:
            candidates.append(self.noted)
        candidates.append(tuple(range(len(self.fsdp_params))))
        candidates.append(tuple(i for i, fp in enumerate(self.fsdp_params) if fp.sharded_param.requires_grad))
        self.noted = None
        for inc in candidates:
            if sum(self.segs[i] for i in inc) == n_out and n_out * W == n_in:
                p = self.plans.get(inc)
                if p is None:
                    p = self.plans[inc] = _Plan(self, inc, state.block_size, state.fmt is not None)
                return p
        raise RuntimeError(
            "pyperf.fsdp: the reduce-scatter of %s has %d input / %d output elements, which matches no layout of "
            "its parameters (per-rank segments %s); FSDP's gradient layout changed in a way pyperf does not know"
            % (_module_label(self.module), n_in, n_out, self.segs[:8]))


def _module_label(m):
    return type(m).__name__


def _padded_shard_numel(fp, W):
    size = getattr(fp, "padded_sharded_param_size", None)
    if size is not None:
        return int(torch.Size(size).numel())
    orig = fp._orig_size          # fallback: dim 0 padded to a multiple of W (FSDP's _get_dim0_padded_size)
    d0 = -(-orig[0] // W) * W if len(orig) else W
    n = d0
    for s in orig[1:]:
        n *= s
    return n // W


def _orig_numel(fp):
    orig = getattr(fp, "_orig_size", None)
    if orig is not None:
        return int(torch.Size(orig).numel())
    return int(fp.sharded_param.numel())


def _fsdp_param_groups(module):
    st = module._get_fsdp_state()
    groups = getattr(st, "_fsdp_param_groups", None)
    if groups is None:
        g = getattr(st, "_fsdp_param_group", None)
        groups = [g] if g is not None else []
    return [g for g in groups if g is not None]


def _with_grad(group):
    """FSDP's own rule for which parameters go into the reduce-scatter (FSDPParamGroup.post_backward), evaluated
    just before FSDP runs it."""
    unused = bool(getattr(group, "reduce_scatter_unused_params", False))
    inc = []
    for i, fp in enumerate(group.fsdp_params):
        if not hasattr(fp, "_unsharded_param"):
            continue
        if getattr(fp, "unsharded_accumulated_grad", None) is not None or fp.unsharded_param.grad is not None:
            inc.append(i)
        elif unused and fp.unsharded_param.requires_grad:
            inc.append(i)
    return tuple(inc)


class _Comm(_ReduceScatterBase):
    """What FSDP calls: comm.allocate(...) for its buffers, comm(output_tensor=, input_tensor=, group=, op=)."""

    def __init__(self, state, unit):
        self._state, self._unit = state, unit

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self._state._reduce_scatter(self._unit, output_tensor, input_tensor, group, op)
        return None


class FSDPCompressionState:
    """State of pyperf's compressed FSDP2 reduce-scatter: options, error-feedback residuals, counters and
    statistics. Made by pyperf.fsdp.register(); save `state_dict()` from every rank."""

    def __init__(self, kind, *, block_size=256, error_feedback=True, stochastic_rounding=False, start_iter=0,
                 min_numel=1024, seed=0, skip_nonfinite=True, stats_every=100):
        if kind not in KINDS:
            raise ValueError("kind: expected one of %s, got %r" % (", ".join(KINDS), kind))
        self.kind = kind
        self.fmt = _QUANT_FMT.get(kind)
        self.cast_dtype = _CAST.get(kind)
        if self.fmt is not None:
            check_format(self.fmt, block_size)
        for name, v in (("start_iter", start_iter), ("min_numel", min_numel), ("stats_every", stats_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError("%s: expected an int >= 0, got %r" % (name, v))
        self.block_size = block_size
        self.error_feedback = bool(error_feedback) and self.fmt is not None
        self.stochastic_rounding = bool(stochastic_rounding)
        self.start_iter = start_iter
        self.min_numel = min_numel
        self.seed = int(seed)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.stats_every = stats_every
        self.iter = 0                 # steps begun (the current step's index + 1 once it has begun)
        self.stats = FSDPStats()
        self.units: List[_Unit] = []
        self.world_size, self.rank = 1, 0
        self._task = None             # graph task of the current step
        self._called = set()          # units called in the current step (steps without a graph task id)
        self._compress_now = False
        self._flag = None             # the current step's non-finite flag (0-d bool on the gradients' device)
        self._stats_now = False
        self._err2 = self._v2 = None  # the current step's rel_error accumulators
        self._pending = {}            # residuals loaded before their unit's first reduce-scatter
        self._scratch = {}
        self._sync_free = None        # None: decide by device (CUDA: no host reads); tests force True on CPU
        self.overlap = True           # CPU + Gloo: finish the reduce-scatters when backward ends (_overlaps)
        self._inflight = []           # (graph task, unit, Work, finish, refs): exchanges still travelling
        self._callback_task = None    # the graph task whose end-of-backward callback is queued
        self._removed = False

    # ---- step bookkeeping -------------------------------------------------------------------------------------
    def _begin_call(self, unit, device):
        tid = _graph_task_id()
        if self._task is None or tid != self._task or (tid == -1 and unit in self._called):
            self._close_step()
            self._task = tid
            self._called = set()
            step = self.iter
            self.iter += 1
            self.stats.steps += 1
            self._compress_now = step >= self.start_iter
            self._flag = torch.zeros((), dtype=torch.bool, device=device) if self.fmt is not None else None
            self.stats._open_flag = self._flag
            self._stats_now = bool(self.fmt is not None and self.stats_every and step % self.stats_every == 0)
            self._err2 = self._v2 = None
        self._called.add(unit)

    def _close_step(self):
        """The previous step is over: count its non-finite flag and publish its rel_error."""
        if self._flag is not None:
            self.stats._nonfinite = self.stats._nonfinite + self._flag.to(torch.int64)
            self._flag = None
            self.stats._open_flag = None
        if self._err2 is not None:
            self.stats._rel = torch.sqrt(self._err2 / self._v2)
            self._err2 = self._v2 = None

    def _host_reads(self, t):
        return not (self._sync_free if self._sync_free is not None else t.device.type != "cpu")

    def _settle(self, unit):
        """Make unit.res the residuals to use: undo the last step that wrote them if it was non-finite."""
        flag = unit.res_flag
        unit.res_flag = None
        if flag is None or unit.res is None or not self.skip_nonfinite:
            return
        if self._host_reads(flag):
            if bool(flag):
                unit.res, unit.res_prev = unit.res_prev, unit.res
        else:
            torch.where(flag, unit.res_prev, unit.res, out=unit.res)

    def _buffer(self, name, numel, dtype, device):
        """Scratch for one call. CPU (Gloo: the call is synchronous): one grow-only buffer per name, reused across
        calls (fresh large CPU buffers page-fault on every step). CUDA: the caching allocator, on the stream."""
        if device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=device)
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._scratch[name] = torch.empty(max(numel, 1), dtype=dtype, device=device)
        return buf[:numel]

    # ---- the reduce-scatter -----------------------------------------------------------------------------------
    def _reduce_scatter(self, unit, out, inp, group, op):
        t0 = time.perf_counter()
        self._finish_inflight(stale_only=True)
        W = dist.get_world_size(group)
        if W != unit.world_size:
            raise RuntimeError("pyperf.fsdp: reduce-scatter over %d ranks, but the FSDP module was registered with "
                               "a shard group of %d" % (W, unit.world_size))
        if inp.dtype not in _FLOAT or out.dtype != inp.dtype:
            raise TypeError("pyperf.fsdp %s: expected a float32, bfloat16 or float16 reduce dtype, got input %s and "
                            "output %s" % (self.kind, inp.dtype, out.dtype))
        if not (inp.is_contiguous() and out.is_contiguous()):
            raise ValueError("pyperf.fsdp: expected contiguous reduce-scatter buffers")
        scale = op_scale(op, W)
        self._begin_call(unit, inp.device)
        st = self.stats
        st.reduce_scatters += 1
        st.bytes_fp32 += (W - 1) * out.numel() * 4
        if W == 1:
            torch.mul(inp.view(-1), scale, out=out.view(-1))
        elif not self._compress_now:
            self._plain(out, inp, group, op, scale)
            st.bytes_sent += (W - 1) * out.numel() * inp.element_size()
        elif self.fmt is None:
            self._cast(unit, out, inp, group, scale, self._overlaps(unit, out, op, group))
        else:
            self._quantized(unit, out, inp, group, scale, self._overlaps(unit, out, op, group))
        st.comm_time_s += time.perf_counter() - t0

    # ---- overlap on the CPU -----------------------------------------------------------------------------------
    def _overlaps(self, unit, out, op, group):
        """Whether this call may return with its rows still travelling, to be finished (received, summed, written
        into `out`) when backward ends. On the GPU FSDP already overlaps (its reduce-scatter stream); on the CPU with
        Gloo a synchronous call holds the rest of backward until the rows arrive. Only when FSDP will not read `out`
        before backward ends: no post-divide (op AVG or PREMUL_SUM), no cast to another dtype, no gradient to
        accumulate into, no post-accumulate-grad hook or all-reduce hook, no CPU offload; and only inside the
        autograd engine, where the end-of-backward callback can be queued."""
        if not self.overlap or out.device.type != "cpu" or dist.get_backend(group) != "gloo":
            return False
        if op != dist.ReduceOp.AVG and op != dist.ReduceOp.PREMUL_SUM:
            return False
        g = unit.group
        if getattr(g, "_orig_dtype", None) != out.dtype or getattr(g, "_all_reduce_hook", None) is not None:
            return False
        for fp in unit.fsdp_params:
            sp = fp.sharded_param
            if sp.grad is not None or getattr(sp, "_post_accumulate_grad_hooks", None) or \
                    getattr(fp, "offload_to_cpu", False):
                return False
        tid = _graph_task_id()
        if tid == -1:
            return False
        if any(e[1] is unit for e in self._inflight):   # called again in one backward: its buffers are still sending
            self._finish_inflight()
        if self._callback_task != tid:
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            except RuntimeError:       # not inside backward after all
                return False
            self._callback_task = tid
        return True

    def _end_of_backward(self):
        """The autograd engine's final callback. A reduce-scatter called after it in the same backward (another FSDP
        root's final callback runs a module's post_backward late) queues a new one: it must not stay in flight."""
        self._callback_task = None
        self._finish_inflight()

    def _send(self, unit, recv, send, group, finish, overlap, refs=()):
        """Exchange the rows; finish() reads recv. Overlapped: finish at the end of backward (refs: tensors to keep
        alive until then, e.g. FSDP's input when it is what travels)."""
        if not overlap:
            all_to_all_rows(recv, send, group)
            finish()
            return
        work = all_to_all_rows(recv, send, group, async_op=True)
        self.stats.overlapped_reduce_scatters += 1
        self._inflight.append((self._callback_task, unit, work, finish, refs))

    def _finish_inflight(self, stale_only=False):
        """Wait for the travelling rows and write the outputs, oldest first. stale_only: only those of a backward
        that ended without its callback (it raised); the current backward's stay in flight."""
        if not self._inflight:
            return
        if stale_only:
            if self._inflight[-1][0] == _graph_task_id():
                return
        todo, self._inflight = self._inflight, []
        for _, _unit, work, finish, _refs in todo:
            work.wait()
            finish()

    def _plain(self, out, inp, group, op, scale):
        """What FSDP's default comm does (start_iter): the backend's reduce-scatter with FSDP's op. PREMUL_SUM is
        NCCL's; elsewhere it is a SUM and the factor applied to the output."""
        if op == dist.ReduceOp.PREMUL_SUM and dist.get_backend(group) != "nccl":
            _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, group=group)
            out.mul_(scale)
        else:
            _reduce_scatter(out, inp, op=op, group=group)

    def _cast(self, unit, out, inp, group, scale, overlap):
        """fp32/bf16/fp16 on the wire: one cast pass on the way out (none when it is the reduce dtype), then every
        rank's row summed in fp32 in rank order, scale and cast back fused into the write (the values travel
        unscaled: fp16's range is spent on the values, not on a 1/W that an fp32 sum does not need)."""
        W, S = dist.get_world_size(group), out.numel()
        dt = self.cast_dtype
        self.stats.compressed_reduce_scatters += 1
        tag = "/%d" % id(unit) if overlap else ""     # in flight: buffers of its own until backward ends (kept)
        if inp.dtype == dt:
            send = inp.view(-1)
        else:
            send = self._buffer("send_cast" + tag, W * S, dt, inp.device)
            send.copy_(inp.view(-1))
        recv = self._buffer("recv_cast" + tag, W * S, dt, inp.device)
        rows = recv.view(W, S)

        def finish():
            tot = self._buffer("sum", S, torch.float32, inp.device)
            tot.copy_(rows[0])
            for s in range(1, W):
                tot.add_(rows[s])
            torch.mul(tot, scale, out=out.view(-1))

        self.stats.bytes_sent += (W - 1) * S * send.element_size()
        self._send(unit, rows, send.view(W, S), group, finish, overlap, refs=(inp, out))

    def _quantized(self, unit, out, inp, group, scale, overlap):
        W, B, fmt = unit.world_size, self.block_size, self.fmt
        dev = inp.device
        plan = unit.plan(self, inp.numel(), out.numel())
        S = plan.S
        st = self.stats
        st.compressed_reduce_scatters += 1
        x = inp.view(W, S)
        o = out.view(-1)
        tag = "/%d" % id(unit) if overlap else ""     # in flight: buffers of its own until backward ends
        send = self._buffer("send" + tag, W * plan.row_bytes, torch.uint8, dev).view(W, plan.row_bytes)
        recv = self._buffer("recv" + tag, W * plan.row_bytes, torch.uint8, dev).view(W, plan.row_bytes)
        qb, sn = plan.qb, plan.sn
        step = self.iter - 1
        ef = self.error_feedback and plan.has_res
        if ef:
            self._ensure_residual(unit, dev)
            self._settle(unit)
            cur = unit.res
            nxt = unit.res_prev if self.skip_nonfinite else unit.res
            full = plan.full
        me = unit.rank
        for s in range(W):
            if plan.nblocks and s != me:     # this rank's own row never travels: it is summed exact, not quantized
                xs = [x[s, plan.offs[k]:plan.offs[k] + plan.segs[k]] for k in plan.big]
                r_in = r_out = None
                if ef:
                    if full:
                        r_in, r_out = cur[s], nxt[s]
                    else:   # some parameters left out (no gradient) or without residuals (frozen): gather
                        r_in = _q.pack([cur[s, p[0]:p[1]] if p is not None else
                                        torch.zeros(nb * B, dtype=torch.float32, device=dev)
                                        for p, nb in zip(plan.pieces, plan.nbs)])
                        r_out = r_in if nxt is cur else torch.empty_like(r_in)
                if self._stats_now:
                    self._measure(xs, r_in, plan, dev)
                wire = send[s, :qb]
                if not self.stochastic_rounding:
                    _q.quantize_tensors(xs, fmt, B, residual=r_in, residual_out=r_out, out=wire)
                else:
                    self._quantize_sr(xs, plan, wire, r_in, r_out, step, s)
                if ef and not full:
                    pos = 0
                    for p, nb in zip(plan.pieces, plan.nbs):
                        if p is not None:
                            nxt[s, p[0]:p[1]].copy_(r_out[pos:pos + nb * B])
                        pos += nb * B
            if sn:
                _q.pack([x[s, plan.offs[k]:plan.offs[k] + plan.segs[k]] for k in plan.small], out_dtype=torch.float32,
                        out=send[s, qb:qb + 4 * sn].view(torch.float32))
        # the sentinel: nan in every row when anything in this rank's input is non-finite, so that every rank (not
        # only the owners of the non-finite shards) sees it and rolls back the same step
        bad = None
        if plan.nblocks:
            scales = send[:, :4 * plan.nblocks].view(torch.float32)
            bad = ~(torch.isfinite(scales[:me]).all() & torch.isfinite(scales[me + 1:]).all())
            # the own row: its min and max are finite exactly when every value is (NaN propagates), one pass
            lo, hi = torch.aminmax(x[me])
            bad |= ~(torch.isfinite(lo) & torch.isfinite(hi))
        if sn:
            b2 = ~torch.isfinite(send[:, qb:qb + 4 * sn].view(torch.float32)).all()
            bad = b2 if bad is None else bad | b2
        sent = send[:, qb + 4 * sn:].view(torch.float32)
        if bad is None:
            sent.zero_()
        else:
            sent.fill_(torch.where(bad, float("nan"), 0.0))
        st.bytes_sent += (W - 1) * plan.row_bytes
        flag = self._flag

        outs = [o[plan.offs[k]:plan.offs[k] + plan.segs[k]] for k in plan.big]
        own = [x[me, plan.offs[k]:plan.offs[k] + plan.segs[k]] for k in plan.big]
        if overlap:     # finish() runs when backward ends, after FSDP dropped its input: the own row waits in out
            for a, b in zip(outs, own):
                a.copy_(b)
            own = outs

        def finish():
            if plan.nblocks:
                _q.reduce_quantized_tensors(recv[:, :qb], outs, fmt, B, scale=scale, own=own, own_row=me)
            if sn:
                tot = _sum_small(recv[:, qb:qb + 4 * sn].view(torch.float32), W)
                _q.unpack(tot, [o[plan.offs[k]:plan.offs[k] + plan.segs[k]] for k in plan.small], scale=scale)
            # every sender's sentinel: the same flag on every rank
            nonfinite = ~torch.isfinite(recv[:, qb + 4 * sn:].view(torch.float32)).all()
            torch.logical_or(flag, nonfinite, out=flag)

        self._send(unit, recv, send, group, finish, overlap, refs=(out,))
        if ef:
            if nxt is not cur:
                for a, b in plan.excluded_runs:   # parameters without a gradient this step keep their residuals
                    nxt[:, a:b].copy_(cur[:, a:b])
                unit.res, unit.res_prev = nxt, cur
            unit.res_flag = self._flag

    def _quantize_sr(self, xs, plan, wire, r_in, r_out, step, row):
        """Stochastic rounding, keyed by (seed, rank, step, row) and the parameter: one call per parameter, so a
        parameter's noise does not depend on what else shares its reduce-scatter."""
        B, fmt, pb, nb = self.block_size, self.fmt, plan.pb, plan.nblocks
        scales = wire[:4 * nb].view(nb, 4)
        payload = wire[4 * nb:].view(nb, pb)
        key = mix_seed(self.seed, 1, self.rank, step, row)
        for j, (xt, g) in enumerate(zip(xs, plan.gidx)):
            a, b = plan.bstart[j], plan.bstart[j + 1]
            n = xt.numel()
            sub = _q.quantize(xt, fmt, B, stochastic=True, seed=key, offset=g,
                              residual=None if r_in is None else r_in[a * B:a * B + n],
                              residual_out=None if r_out is None else r_out[a * B:a * B + n])
            scales[a:b].copy_(sub[:4 * (b - a)].view(b - a, 4))
            payload[a:b].copy_(sub[4 * (b - a):].view(b - a, pb))

    def _measure(self, xs, r_in, plan, dev):
        """rel_error: quantize once more into scratch, with the error of v = x + residual as the residual_out."""
        B = self.block_size
        v = _q.pack(xs, out_dtype=torch.float32, align=B)
        if r_in is not None:
            v.add_(r_in)
        err = torch.zeros_like(v)
        tmp = torch.empty(plan.qb, dtype=torch.uint8, device=dev)
        _q.quantize(v, self.fmt, B, residual=err, out=tmp)
        e2, v2 = err.square().sum(), v.square().sum()
        if self._err2 is None:
            self._err2, self._v2 = e2, v2
        else:
            self._err2, self._v2 = self._err2 + e2, self._v2 + v2

    def _ensure_residual(self, unit, device):
        if unit.res is not None and unit.res.device == device:
            return
        W, R = unit.world_size, unit.R
        res = torch.zeros(W, R, dtype=torch.float32, device=device)
        if unit.res is not None:
            res.copy_(unit.res)
        else:
            self._load_pending(unit, res)
        unit.res = res
        unit.res_prev = torch.zeros_like(res) if self.skip_nonfinite else None

    # ---- checkpoint -------------------------------------------------------------------------------------------
    def _settled_residual(self, unit):
        """unit.res with the current step's rollback applied (without consuming it), on CPU."""
        res = unit.res
        if unit.res_flag is not None and self.skip_nonfinite and res is not None:
            res = torch.where(unit.res_flag.to(res.device), unit.res_prev, res)
        return res

    def state_dict(self):
        """This rank's state: options to validate against, counters, and the error-feedback residuals keyed by
        parameter name: {name: fp32 [world_size, per-rank segment]} (row s: what this rank still owes shard s).
        Save it from EVERY rank (residuals differ per rank) next to the model and optimizer checkpoint."""
        self._finish_inflight()
        residual = None
        if self.error_feedback:
            residual = {}
            for u in self.units:
                res = self._settled_residual(u)
                for i, name in enumerate(u.names):
                    if u.roff[i] is None:
                        continue
                    pend = self._pending.get(name)
                    if res is not None:
                        a = u.roff[i]
                        residual[name] = res[:, a:a + u.segs[i]].detach().to("cpu", copy=True)
                    elif pend is not None:
                        residual[name] = pend.clone()
                    else:
                        residual[name] = torch.zeros(u.world_size, u.segs[i], dtype=torch.float32)
        st = self.stats.as_dict()
        return {"format": _FORMAT, "kind": self.kind, "block_size": self.block_size, "world_size": self.world_size,
                "rank": self.rank, "seed": self.seed, "iter": self.iter, "min_numel": self.min_numel,
                "error_feedback": self.error_feedback, "residual": residual, "stats": st}

    def all_ranks(self):
        """Every rank's state as one checkpointable object (pyperf.comm.AllRanks): its state_dict() is a collective
        over the FSDP shard group that returns all ranks' states on every rank; its load_state_dict() restores this
        rank's part. For frameworks that save only the main process's state_dict()."""
        from pyperf.comm.all_ranks import AllRanks
        pg = None
        if self.units:
            pg = getattr(self.units[0].group.mesh_info, "shard_process_group", None)
        return AllRanks(self, pg)

    def load_state_dict(self, sd):
        """Restore a state_dict() saved by the same rank, with the same kind, options and world size. Load before
        training continues (before or after FSDP's lazy initialization: residuals are placed on first use)."""
        self._finish_inflight()
        for k in ("kind", "block_size", "world_size", "rank", "min_numel", "error_feedback"):
            if k in sd and sd[k] != getattr(self, k):
                raise ValueError("load_state_dict: %s of the saved state is %r but this state has %r (load the state "
                                 "saved by the same rank with the same kind and options)" % (k, sd[k],
                                                                                             getattr(self, k)))
        if sd.get("format", _FORMAT) != _FORMAT:
            why = (" (format 1 came from a pyperf that also quantized each rank's own row, whose residual would be "
                   "dropped here)" if sd.get("format") == 1 else "")
            raise ValueError("load_state_dict: format %r, expected %d%s" % (sd.get("format"), _FORMAT, why))
        res = sd.get("residual")
        if self.error_feedback:
            want = {n: (u.world_size, u.segs[i]) for u in self.units for i, n in enumerate(u.names)
                    if u.roff[i] is not None}
            got = set(res or {})
            if got != set(want):
                missing, extra = sorted(set(want) - got), sorted(got - set(want))
                raise ValueError("load_state_dict: the saved residuals are for other parameters (missing %s, "
                                 "unexpected %s)" % (missing[:4], extra[:4]))
            for n, shape in want.items():
                if tuple(res[n].shape) != shape:
                    raise ValueError("load_state_dict: residual of %s: expected shape %s, got %s"
                                     % (n, shape, tuple(res[n].shape)))
        self.iter = int(sd["iter"])
        self.seed = int(sd["seed"])
        self._task = None
        self._called = set()
        self._flag = None
        self._err2 = self._v2 = None
        self._pending = {}
        for u in self.units:
            u.res_flag = None
            u.noted = None
            if not self.error_feedback:
                continue
            if u.res is None:
                for i, n in enumerate(u.names):
                    if u.roff[i] is not None:
                        self._pending[n] = res[n].detach().to("cpu", torch.float32).clone()
            else:
                u.res.zero_()
                for i, n in enumerate(u.names):
                    if u.roff[i] is not None:
                        a = u.roff[i]
                        u.res[:, a:a + u.segs[i]].copy_(res[n])
                if u.res_prev is not None:
                    u.res_prev.zero_()
        s = sd.get("stats") or {}
        st = self.stats = FSDPStats()
        for k in ("steps", "reduce_scatters", "compressed_reduce_scatters", "bytes_sent", "bytes_fp32", "comm_time_s"):
            if k in s:
                setattr(st, k, s[k])
        st._nonfinite = int(s.get("nonfinite_steps", 0))
        st._rel = float(s.get("rel_error", float("nan")))

    def _load_pending(self, unit, res):
        for i, n in enumerate(unit.names):
            t = self._pending.pop(n, None) if unit.roff[i] is not None else None
            if t is not None:
                a = unit.roff[i]
                res[:, a:a + unit.segs[i]].copy_(t)

    def residual_of(self, name):
        """This rank's error-feedback residual of the parameter `name` (as in model.named_parameters()): a CPU copy,
        [world_size, per-rank segment]; row s is what this rank still owes shard s (zeros before the first step)."""
        self._finish_inflight()
        sd = self.state_dict()["residual"] or {}
        if name not in sd:
            raise KeyError("residual_of: %r is not a quantized parameter with error feedback (those are: %s)"
                           % (name, sorted(sd)[:6]))
        return sd[name]

    # ---- registration -----------------------------------------------------------------------------------------
    def remove(self):
        """Give every FSDP module back FSDP's default reduce-scatter."""
        self._finish_inflight()
        if self._removed:
            return
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
        for u in self.units:
            u.group._reduce_scatter_comm = DefaultReduceScatter()
            if u.orig_post_backward is not None:
                try:
                    del u.group.post_backward
                except AttributeError:
                    pass
            u.module._pyperf_fsdp_state = None
        self._removed = True


def _wrap_post_backward(unit):
    group = unit.group
    orig = group.post_backward

    def post_backward(*args, **kwargs):
        unit.noted = _with_grad(group) if getattr(group, "reduce_grads", True) else None
        return orig(*args, **kwargs)

    unit.orig_post_backward = orig
    group.post_backward = post_backward


def _check_model(model):
    if not isinstance(model, torch.nn.Module):
        raise TypeError("model: expected a torch.nn.Module that is or contains fully_shard modules, got %s"
                        % type(model).__name__)


def _fsdp_modules_in(model):
    """The FSDP2 modules in `model` (itself included), or a TypeError that says to apply fully_shard first."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        raise TypeError("model: expected a module that is or contains fully_shard (FSDP2) modules, got a %s without "
                        "any (apply torch.distributed.fsdp.fully_shard first)" % type(model).__name__)
    return mods


def register(model, kind, **options):
    """Compress the gradient reduce-scatter of every FSDP2 (`fully_shard`) module in `model` with `kind`; returns
    the FSDPCompressionState.

    kind: bf16 | fp16 (cast on the wire, fp32 sum) | int8 | int4 | fp8 (= fp8_e4m3) | fp8_e5m2 (quantized) |
    fp32 (uncompressed: the same all-to-all and rank-order fp32 sum, deterministic; the bytes of a ring
    reduce-scatter, which on Gloo is half of what torch's reduce_scatter_tensor sends: that one is an all-reduce).
    options: start_iter=0 (FSDP's own reduce-scatter for the first N steps; with Adam/AdamW set it past the LR
    warm-up), and for the quantized kinds block_size=256, error_feedback=True, stochastic_rounding=False,
    min_numel=1024 (smaller parameters travel in fp32), seed=0, skip_nonfinite=True (roll the residuals back after
    a step with inf/nan gradients), stats_every=100 (measure rel_error every N steps; 0: never).
    """
    if kind not in KINDS:
        raise ValueError("kind: expected one of %s, got %r (without pyperf.fsdp.register, FSDP reduce-scatters in "
                         "its reduce dtype)" % (", ".join(KINDS), kind))
    _check_model(model)
    unknown = set(options) - set(_ALL_OPTIONS)
    if unknown:
        raise TypeError("register: unknown option(s) %s (options: %s)" % (", ".join(sorted(unknown)),
                                                                          ", ".join(_ALL_OPTIONS)))
    if kind in _CAST:
        na = sorted(set(options) & set(_QUANT_OPTIONS))
        if na:
            raise TypeError("register: option(s) %s apply to the quantized kinds (int8, int4, fp8), not %r"
                            % (", ".join(na), kind))
    mods = _fsdp_modules_in(model)
    for m in mods:
        if getattr(m, "_pyperf_fsdp_state", None) is not None:
            raise RuntimeError("register: %s already has a pyperf %r reduce-scatter; call state.remove() first"
                               % (type(m).__name__, m._pyperf_fsdp_state.kind))
    state = FSDPCompressionState(kind, **options)
    names = {id(p): n for n, p in model.named_parameters()}   # a tied parameter: its first name
    groups = []
    for m in mods:
        gs = _fsdp_param_groups(m)
        if len(gs) > 1:
            raise NotImplementedError("register: %s has %d FSDP parameter groups (per-parameter meshes); FSDP's "
                                      "custom reduce-scatter takes one" % (type(m).__name__, len(gs)))
        for g in gs:
            mi = g.mesh_info
            if not hasattr(mi, "shard_mesh_size"):
                raise NotImplementedError("register: %s is replicated, not sharded (no reduce-scatter to compress)"
                                          % type(m).__name__)
            if getattr(mi, "replicate_mesh_size", None) is not None:
                raise NotImplementedError(
                    "register: HSDP (a 2-D mesh) is not supported: FSDP all-reduces the replicate dimension itself "
                    "after the reduce-scatter, and that all-reduce (usually the slow inter-node one) would stay "
                    "uncompressed. Use a 1-D mesh, or FSDP's own reduce_dtype for HSDP")
            bad = sorted({str(fp.sharded_param.dtype) for fp in g.fsdp_params
                          if fp.sharded_param.dtype not in _FLOAT})
            if bad:
                raise TypeError("register: pyperf.fsdp supports float32, bfloat16 and float16 parameters, %s has %s"
                                % (type(m).__name__, ", ".join(bad)))
            groups.append((m, g))
    gidx = 0
    for m, g in groups:
        u = _Unit(state, m, g, names, gidx)
        gidx += len(u.fsdp_params)
        state.units.append(u)
    sizes = {(u.world_size, u.rank) for u in state.units}
    if len(sizes) > 1:
        raise NotImplementedError("register: the FSDP modules shard over different groups %s; register each "
                                  "mesh's modules separately" % sorted(sizes))
    if state.units:
        state.world_size, state.rank = state.units[0].world_size, state.units[0].rank
    for u in state.units:
        u.module.set_custom_reduce_scatter(_Comm(state, u))
        _wrap_post_backward(u)
    for m in mods:
        m._pyperf_fsdp_state = state
    return state


class _AllGather(_AllGatherBase):
    """What FSDP calls for its parameter all-gathers: comm.allocate(...), comm(output_tensor=, input_tensor=, group=,
    async_op=). On Gloo it returns a Work, async_op or not: FSDP waits on it before it copies the parameters out
    (wait_for_unshard), so the all-gather FSDP prefetches for the next module in backward travels while this
    module's backward computes, where Gloo's blocking all-gather holds the computation until it arrives (on the GPU
    FSDP gets that from its all-gather stream). Other backends: the backend's all-gather with FSDP's async_op."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        W = dist.get_world_size(group)
        gloo = dist.get_backend(group) == "gloo"
        return all_gather_rows(output_tensor.view(W, -1), input_tensor, group, async_op=async_op or gloo)


class AllGatherHandle:
    """What register_all_gather returns: remove() gives the modules back the all-gathers they had."""

    def __init__(self, saved):
        self._saved = saved

    def remove(self):
        for g, comm in self._saved:
            g._all_gather_comm = comm
        self._saved = []


def register_all_gather(model):
    """FSDP's parameter all-gathers, for every FSDP2 module in `model`, as 1 MB point-to-point messages on Gloo
    (pyperf.comm.transport): the same bytes and a bit-identical result, where Gloo's all_gather_into_tensor, one
    message per peer, reaches about 60% of a 1 Gbit/s link. Not compression: the all-gathers send what they sent.
    On other backends (NCCL) the comm calls the backend's all-gather, as FSDP does. Independent of register();
    returns a handle whose remove() restores what the modules had."""
    _check_model(model)
    mods = _fsdp_modules_in(model)
    saved = []
    comm = _AllGather()
    for m in mods:
        gs = _fsdp_param_groups(m)
        if len(gs) > 1:
            raise NotImplementedError("register_all_gather: %s has %d FSDP parameter groups (per-parameter meshes); "
                                      "FSDP's custom all-gather takes one" % (type(m).__name__, len(gs)))
        saved += [(g, g._all_gather_comm) for g in gs]
    for m in mods:
        if _fsdp_param_groups(m):
            m.set_custom_all_gather(comm)
    return AllGatherHandle(saved)


__all__ = ["KINDS", "AllGatherHandle", "FSDPCompressionState", "FSDPStats", "op_scale", "register",
           "register_all_gather"]
