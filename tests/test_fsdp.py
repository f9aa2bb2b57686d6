"""pyperf.fsdp on real FSDP2 (fully_shard) models over Gloo ranks: every kind within bound of FSDP's default
reduce-scatter for each reduce op form (AVG, SUM with FSDP's pre/post divide, PREMUL_SUM), the exact result of the
quantized reduce-scatter, FSDP's modes (mixed precision, reshard_after_forward, gradient accumulation, parameters
without a gradient, frozen parameters), error feedback, GradScaler skips (every rank rolls back), bytes, bad input,
bit-identical resume with torch.distributed.checkpoint, and convergence of a transformers GPT-2."""
import copy
import gc
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from _dist import run_ranks

fsdp_api = pytest.importorskip("torch.distributed.fsdp")
fully_shard, MixedPrecisionPolicy = fsdp_api.fully_shard, fsdp_api.MixedPrecisionPolicy

KINDS = ("bf16", "fp16", "int8", "int4", "fp8", "fp8_e5m2")
# max |pyperf grad - default grad| / max |default grad| per parameter shard (the DDP hooks' tolerances)
TOL = {"bf16": 0.01, "fp16": 2e-3, "int8": 0.02, "int4": 0.3, "fp8": 0.15, "fp8_e5m2": 0.3}
FMT = {"int8": "int8", "int4": "int4", "fp8": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2"}


class _Net(nn.Module):
    """Odd sizes on purpose: dim 0 of 67 and 37 (primes) and 5 (not divisible by 2 or 4: FSDP pads, and with 4
    ranks one shard is all padding), a 1-element parameter, a branch that gets no gradient unless asked for, and
    optionally a frozen parameter."""

    def __init__(self, frozen=False):
        super().__init__()
        self.a = nn.Linear(29, 67)
        self.b = nn.Linear(67, 37)
        self.one = nn.Parameter(torch.tensor([1.25]))
        self.c = nn.Linear(37, 5)
        self.side = nn.Linear(29, 5)
        if frozen:
            self.frozen = nn.Linear(29, 37)
            self.frozen.requires_grad_(False)
        self.use_side = True

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h)) * self.one
        if hasattr(self, "frozen"):
            h = h + 0.1 * self.frozen(x)
        y = self.c(h)
        return y + self.side(x) if self.use_side else y


def _net(seed=0, frozen=False, mp=None, reshard=True, shard=True):
    torch.manual_seed(seed)
    m = _Net(frozen)
    if shard:
        kw = dict(reshard_after_forward=reshard)
        if mp is not None:
            kw["mp_policy"] = mp
        fully_shard(m.a, **kw)
        fully_shard(m.b, **kw)
        fully_shard(m, **kw)
    return m


def _batch(rank, step, n=8):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, 29, generator=g), torch.randn(n, 5, generator=g)


def _loss(m, x, y):
    return (m(x).float() - y).square().mean()


def _fsdp_modules(m):
    return [x for x in m.modules() if isinstance(x, fsdp_api.FSDPModule)]


def _local_grads(m):
    return {n: (None if p.grad is None else p.grad.to_local().detach().float().clone()) for n, p in
            m.named_parameters()}


def _run(kind, rank, steps=1, micro=1, hook_kw=None, net_kw=None, setup=None, side_at=None):
    """Sharded gradients after `steps` steps (no optimizer: the gradients of the last step), with `kind`
    (None: FSDP's default reduce-scatter)."""
    m = _net(**(net_kw or {}))
    if setup is not None:
        setup(m)
    st = None
    if kind is not None:
        import pyperf.fsdp
        st = pyperf.fsdp.register(m, kind, **dict(dict(block_size=32, min_numel=0) if kind in FMT else {},
                                                   **(hook_kw or {})))
    for step in range(steps):
        m.zero_grad(set_to_none=True)
        m.use_side = side_at is None or step in side_at
        for k in range(micro):
            m.set_requires_gradient_sync(k == micro - 1)
            _loss(m, *_batch(rank, 10 * step + k)).backward()
    return _local_grads(m), st


def _close(got, ref, tol, what):
    for name, r in ref.items():
        a = got[name]
        if r is None:
            assert a is None, (what, name)
            continue
        assert a is not None and a.shape == r.shape, (what, name)
        t = torch.tensor([float(r.abs().max()) if r.numel() else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)      # one scale per parameter (a shard may be all padding)
        err = float((a - r).abs().max()) / max(float(t), 1e-12) if r.numel() else 0.0
        assert err <= tol, "%s: %s off by %.3g of its max (tolerance %.3g)" % (what, name, err, tol)


def _set_all(m, method, *args):
    for x in _fsdp_modules(m):
        getattr(x, method)(*args)


# op forms: AVG (FSDP's default for fp32/bf16), PREMUL_SUM (set_gradient_divide_factor), SUM with FSDP's post-divide
# (set_force_sum_reduction_for_comms), SUM with pre- and post-divide (fp16 reduce dtype)
def _ops(W):
    return [
        ("AVG", None, lambda m: None, 1.0),
        ("PREMUL_SUM", None, lambda m: _set_all(m, "set_gradient_divide_factor", 3.0), W / 3.0),
        ("SUM post-divide", None, lambda m: _set_all(m, "set_force_sum_reduction_for_comms", True), 1.0),
        ("SUM fp16 pre/post-divide", MixedPrecisionPolicy(reduce_dtype=torch.float16), lambda m: None, 1.0),
    ]


def _body_kinds_ops(rank, W, kinds):
    """Every kind, every op form, against FSDP's default reduce-scatter of the same gradients (PREMUL_SUM: Gloo
    has none, so the default's AVG result times W / factor)."""
    ref_avg, _ = _run(None, rank)
    for what, mp, setup, ref_scale in _ops(W):
        if what == "PREMUL_SUM":
            ref = {k: v * ref_scale for k, v in ref_avg.items()}
        else:
            ref, _ = _run(None, rank, net_kw=dict(mp=mp), setup=setup)
            _close(ref, ref_avg, 2e-3, "default %s vs default AVG" % what)   # the op forms agree
        for kind in kinds:
            got, st = _run(kind, rank, net_kw=dict(mp=mp), setup=setup)
            tol = TOL[kind] + (2e-3 if mp is not None else 0)
            _close(got, ref, tol, "%s %s" % (kind, what))
            assert st.stats.compressed_reduce_scatters == 3 and st.stats.steps == 1, st.stats


def _segments(g, W):
    """FSDP's rows of one unsharded gradient: dim 0 padded to a multiple of W, chunked; row s flattened."""
    d0 = -(-g.shape[0] // W) * W
    pad = torch.zeros((d0,) + tuple(g.shape[1:]), dtype=g.dtype)
    pad[:g.shape[0]] = g
    return [c.reshape(-1) for c in pad.chunk(W)]


def _body_exact(rank, W):
    """The quantized reduce-scatter's result is, bit for bit, every rank's blockwise quantization of its row for
    this rank (blocks starting at each parameter), dequantized and summed in rank order, times 1/W."""
    from pyperf import _reference as R
    local = []
    for r in range(W):         # every rank's unsharded gradient, recomputed here without FSDP
        m = _net(shard=False)
        _loss(m, *_batch(r, 0)).backward()
        local.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for kind in ("int8", "int4", "fp8"):
        got, _ = _run(kind, rank)
        for name, g in got.items():
            wires = torch.stack([R.quantize(_segments(local[r][name], W)[rank], FMT[kind], 32) for r in range(W)])
            seg = _segments(local[0][name], W)[rank].numel()
            want = R.reduce_quantized(wires, seg, FMT[kind], 32, scale=1.0 / W)[:g.numel()].view(g.shape)
            assert torch.equal(g, want), (kind, name, float((g - want).abs().max()))


def _body_modes(rank, W):
    """FSDP's modes behave as with the default reduce-scatter."""
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    bf16r = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    cases = [
        ("param bf16, reduce fp32", dict(net_kw=dict(mp=bf16)), 0.0),
        ("param bf16, reduce bf16", dict(net_kw=dict(mp=bf16r)), 0.02),
        ("reshard_after_forward=False", dict(net_kw=dict(reshard=False)), 0.0),
        ("accumulation x3", dict(micro=3), 0.0),
        ("no gradient in step 2 (side)", dict(steps=3, side_at=(0, 2), hook_kw=None), 0.0),
        ("frozen parameter", dict(net_kw=dict(frozen=True)), 0.0),
    ]
    for what, kw, extra in cases:
        ref, _ = _run(None, rank, **kw)
        for kind in ("int8", "bf16"):
            got, _ = _run(kind, rank, **kw)
            _close(got, ref, TOL[kind] + extra, "%s %s" % (kind, what))
    # parameters without a gradient: their residuals carry over untouched, the others move
    m = _net()
    import pyperf.fsdp
    st = pyperf.fsdp.register(m, "int8", block_size=32, min_numel=0)
    _loss(m, *_batch(rank, 0)).backward()
    before = {n: st.residual_of(n) for n in ("side.weight", "a.weight")}
    m.use_side = False
    m.zero_grad()
    _loss(m, *_batch(rank, 1)).backward()
    assert m.side.weight.grad is None
    assert torch.equal(st.residual_of("side.weight"), before["side.weight"])
    assert not torch.equal(st.residual_of("a.weight"), before["a.weight"])
    # reduce_scatter_unused_params (torch >= 2.14): the unused parameters travel as zeros (without error feedback:
    # with it, a zero gradient carries the residual the parameter still owes, so it does not come out zero)
    if hasattr(fsdp_api.FSDPModule, "set_reduce_scatter_unused_params"):
        def setup(m):
            m.set_reduce_scatter_unused_params(True)
        ref, _ = _run(None, rank, steps=2, side_at=(0,), setup=setup)
        assert not bool(ref["side.weight"].any())
        got, _ = _run("int8", rank, steps=2, side_at=(0,), setup=setup, hook_kw=dict(error_feedback=False))
        _close(got, ref, TOL["int8"], "int8 reduce_scatter_unused_params")


def _run_all(rank, W, bodies):
    """bodies: [(fn, args)], run in one process group (a spawn costs seconds)."""
    for fn, args in bodies:
        fn(rank, W, *args)
    # FSDP modules and their comm state hold the process group: free them on this thread before the harness
    # destroys it
    gc.collect()


def test_kinds_ops_exact_modes_2_ranks():
    run_ranks(_run_all, 2, [(_body_exact, ()), (_body_kinds_ops, (KINDS,)), (_body_modes, ())])


def test_kinds_ops_exact_4_ranks():
    run_ranks(_run_all, 4, [(_body_exact, ()), (_body_kinds_ops, (("int8", "int4", "fp8", "bf16", "fp16"),))])
