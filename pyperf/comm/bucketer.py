"""GradientBucketer: an overlapped, bucketed gradient all-reduce for training loops that sync gradients by hand.

    bucketer = GradientBucketer(model.parameters(), bucket_cap_mb=25, compression="bf16")
    for batch in data:
        loss = model(batch).sum()
        loss.backward()          # each bucket is packed (one fused kernel) and its all-reduce starts as soon as
        bucketer.wait()          #   its last gradient is ready; wait() unpacks the averages into p.grad
        optimizer.step(); optimizer.zero_grad()

Policies (documented in docs/pack.md):
  * buckets follow reverse registration order (like DDP) and are always *started in bucket order*, so every rank
    issues the same collectives in the same order whatever its gradients look like;
  * a parameter with no gradient on this rank in a step contributes zeros; after wait() it has a .grad like
    every other bucketed parameter (the average over ranks, zeros if no rank produced one);
  * gradient accumulation: inside `with bucketer.no_sync():` backward passes only accumulate into p.grad; the
    next backward outside it starts the communication and wait() averages what was accumulated. wait() always
    syncs whatever has not been started yet, so it never leaves gradients unsynchronized;
  * parameters with requires_grad=False are skipped.
"""
import contextlib
from typing import Callable, Dict, Iterable, List

import torch
import torch.distributed as dist

from pyperf import ops

__all__ = ["GradientBucketer", "Compressor", "register_compressor", "available_compressions"]


class _Ready:
    """A finished 'work' (no process group, or world size 1)."""

    def __init__(self, flat):
        self._flat = flat

    def wait(self):
        return self._flat


class _WorkResult:
    """Wraps a torch.distributed Work so wait() returns the reduced buffer."""

    def __init__(self, work, flat):
        self._work, self._flat = work, flat

    def wait(self):
        self._work.wait()
        return self._flat


class Compressor:
    """How one packed bucket travels. The extension point for compression="...": subclass it and pass an instance
    as `compression=`, or register a factory under a name with register_compressor().

    Contract: the bucketer packs the bucket's gradients into a 1-D buffer of dtype `wire_dtype(grad_dtype)` with
    each tensor's offset a multiple of `align` elements (zero padding; see pyperf.ops.pack_layout), multiplied
    by 1/world_size first when `prescale` is true; then calls `all_reduce_async(flat, group, bucket_index)`, whose
    result has a `.wait()` returning the SUM over ranks of the buffers (float32, bfloat16 or float16, at least
    as many elements as flat). The bucketer then unpacks it into p.grad, scaling by 1/world_size unless
    `prescale`, casting back to the gradients' dtype. `bucket_index` is stable across steps (per-bucket state
    such as error-feedback residuals can be keyed by it)."""

    name = "custom"
    align = 1
    prescale = False

    def wire_dtype(self, grad_dtype: torch.dtype) -> torch.dtype:
        return grad_dtype

    def all_reduce_async(self, flat: torch.Tensor, group, bucket_index: int):
        if group is None and not dist.is_initialized():
            return _Ready(flat)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
        return _WorkResult(work, flat)


class _NoCompression(Compressor):
    name = "none"


class _CastCompressor(Compressor):
    def __init__(self, name, dtype, prescale):
        self.name, self._dtype, self.prescale = name, dtype, prescale

    def wire_dtype(self, grad_dtype):
        return self._dtype


_FACTORIES: Dict[str, Callable[[], Compressor]] = {
    "none": _NoCompression,
    # bfloat16 has float32's range: sum first, scale when unpacking
    "bf16": lambda: _CastCompressor("bf16", torch.bfloat16, prescale=False),
    # float16 overflows at 65504: divide before the sum (like torch's fp16_compress_hook)
    "fp16": lambda: _CastCompressor("fp16", torch.float16, prescale=True),
}
_PLANNED = ("int8", "int4", "fp8")


def register_compressor(name: str, factory: Callable[[], Compressor]) -> None:
    """Makes GradientBucketer(..., compression=name) use factory() (a Compressor) for its buckets."""
    _FACTORIES[name] = factory


def available_compressions() -> List[str]:
    return sorted(_FACTORIES)


def _make_compressor(compression) -> Compressor:
    if isinstance(compression, Compressor):
        return compression
    if compression is None:
        compression = "none"
    if compression in _FACTORIES:
        return _FACTORIES[compression]()
    if compression in _PLANNED:
        raise ValueError("compression=%r is not available in this pyperf build (it needs pyperf.comm's quantized "
                         "all-reduce); available: %s" % (compression, ", ".join(available_compressions())))
    raise ValueError("compression: expected one of %s or a pyperf.comm.Compressor, got %r"
                     % (", ".join(available_compressions()), compression))


class _Bucket:
    def __init__(self, index, params, compressor):
        self.index = index
        self.params = params
        self.dtype = params[0].dtype
        self.device = params[0].device
        self.wire_dtype = compressor.wire_dtype(self.dtype)
        self.offsets, self.total = ops.pack_layout([p.numel() for p in params], compressor.align)
        self.flat = None            # allocated on first use, reused every step
        self.ready = set()          # ids of params whose gradient hook fired this step
        self.handle = None          # in-flight all-reduce


class GradientBucketer:
    """Overlapped bucketed all-reduce of gradients; see the module docstring and docs/pack.md.

    params: the parameters to sync (an iterable of tensors; duplicates and requires_grad=False are skipped).
    bucket_cap_mb: bucket size cap in MB of gradient bytes (a larger parameter gets a bucket of its own).
    process_group: the group to average over (default: the default group; none initialized: world size 1).
    compression: "none", "bf16", "fp16" (cast on the wire), a registered name, or a Compressor instance."""

    def __init__(self, params: Iterable[torch.Tensor], bucket_cap_mb: float = 25, process_group=None,
                 compression="none"):
        if not bucket_cap_mb > 0:
            raise ValueError("bucket_cap_mb: expected a positive number, got %r" % (bucket_cap_mb,))
        self.process_group = process_group
        self.compressor = _make_compressor(compression)
        seen, plist = set(), []
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError("params: expected tensors (e.g. model.parameters()), got %s" % type(p).__name__)
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                plist.append(p)
        for i, p in enumerate(plist):
            if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise TypeError("params[%d]: expected a float32, bfloat16 or float16 parameter, got %s"
                                % (i, p.dtype))
        self.buckets = self._build_buckets(plist, int(bucket_cap_mb * 1024 * 1024))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._next_launch = 0       # buckets start strictly in order: every rank issues the same sequence
        self._sync = True
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in plist]

    def _build_buckets(self, plist, cap_bytes):
        buckets, open_ = [], {}     # (device, dtype) -> (params, bytes) of the bucket being filled
        for p in reversed(plist):   # reverse registration order ~ the order backward produces gradients
            key = (p.device, p.dtype)
            cur, nbytes = open_.get(key, ([], 0))
            size = p.numel() * p.element_size()
            if cur and nbytes + size > cap_bytes:
                buckets.append(cur)
                cur, nbytes = [], 0
            cur.append(p)
            open_[key] = (cur, nbytes + size)
        buckets.extend(cur for cur, _ in open_.values() if cur)
        return [_Bucket(i, ps, self.compressor) for i, ps in enumerate(buckets)]

    @property
    def world_size(self) -> int:
        if self.process_group is None and not dist.is_initialized():
            return 1
        return dist.get_world_size(self.process_group)

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate gradients; the next one outside starts the communication."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev

    def _on_grad(self, p):
        if not self._sync:
            return
        b = self._bucket_of[id(p)]
        if b.handle is not None or b.index < self._next_launch:
            raise RuntimeError("GradientBucketer: a gradient arrived for a bucket whose all-reduce already started: "
                               "call wait() after each synced backward, or run the earlier backward passes of a "
                               "gradient accumulation inside `with bucketer.no_sync():`")
        b.ready.add(id(p))
        if len(b.ready) == len(b.params):
            self._launch_ready()

    def _launch_ready(self):
        while self._next_launch < len(self.buckets):
            b = self.buckets[self._next_launch]
            if len(b.ready) != len(b.params):
                break
            self._launch(b)

    def _launch(self, b):
        grads = []
        for p in b.params:
            if p.grad is None:      # no gradient on this rank this step: contribute zeros
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            g = p.grad
            grads.append(g if g.is_contiguous() else g.contiguous())
        if b.flat is None:
            b.flat = torch.empty(b.total, dtype=b.wire_dtype, device=b.device)
        scale = 1.0 / self.world_size if self.compressor.prescale else 1.0
        ops.pack(grads, scale=scale, align=self.compressor.align, out=b.flat)
        b.handle = self.compressor.all_reduce_async(b.flat, self.process_group, b.index)
        self._next_launch += 1

    def wait(self) -> None:
        """Starts the buckets that are not started yet (missing gradients count as zeros), waits for all, and
        writes the averages into p.grad (cast back to each gradient's dtype). Call once per optimizer step."""
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
        scale = 1.0 if self.compressor.prescale else 1.0 / self.world_size
        for b in self.buckets:
            reduced = b.handle.wait()
            grads = [p.grad for p in b.params]
            if all(g.is_contiguous() for g in grads):
                ops.unpack(reduced, grads, scale=scale, align=self.compressor.align)
            else:
                tmp = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]
                ops.unpack(reduced, tmp, scale=scale, align=self.compressor.align)
                for g, t in zip(grads, tmp):
                    g.copy_(t)
            b.handle = None
            b.ready.clear()
        self._next_launch = 0

    def remove(self) -> None:
        """Unregisters the gradient hooks (the bucketer does nothing afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    close = remove

    def __repr__(self):
        return ("GradientBucketer(%d params in %d buckets, compression=%r, world_size=%d)"
                % (len(self._bucket_of), len(self.buckets), self.compressor.name, self.world_size))
