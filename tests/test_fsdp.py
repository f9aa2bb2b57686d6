"""pyperf.fsdp on real FSDP2 (fully_shard) models over Gloo ranks: every kind within bound of FSDP's default
reduce-scatter for each reduce op form (AVG, SUM with FSDP's pre/post divide, PREMUL_SUM), the exact result of the
quantized reduce-scatter, FSDP's modes (mixed precision, reshard_after_forward, gradient accumulation, parameters
without a gradient, frozen parameters), error feedback, GradScaler skips (every rank rolls back), bytes, bad input,
bit-identical resume with torch.distributed.checkpoint, and convergence of a transformers GPT-2."""
import copy
import gc
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from _dist import run_ranks

fsdp_api = pytest.importorskip("torch.distributed.fsdp")
fully_shard, MixedPrecisionPolicy = fsdp_api.fully_shard, fsdp_api.MixedPrecisionPolicy

KINDS = ("fp32", "bf16", "fp16", "int8", "int4", "fp8", "fp8_e5m2")
# max |pyperf grad - default grad| / max |default grad| per parameter shard (the DDP hooks' tolerances)
TOL = {"fp32": 1e-6, "bf16": 0.01, "fp16": 2e-3, "int8": 0.02, "int4": 0.3, "fp8": 0.15, "fp8_e5m2": 0.3}
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
        self.poison = False
        self.poison_feature = 66
        self.poison_raise = False

    def forward(self, x):
        h = self.a(x)
        if self.poison and h.requires_grad:
            # inf in the gradient of a's output feature 66 only (by default): a.weight row 66 and a.bias[66], which
            # lie in the last rank's shard (feature 0: rank 0's); every other gradient stays finite
            f = self.poison_feature
            h.register_hook(lambda g: g.index_fill(1, torch.tensor([f]), float("inf")))
        if self.poison_raise and h.requires_grad:
            # raises in backward after b's and c's gradients (their reduce-scatters) are done, before a's
            h.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("poisoned backward")))
        h = torch.tanh(h)
        h = torch.tanh(self.b(h)) * self.one
        if hasattr(self, "frozen"):
            h = h + 0.1 * self.frozen(x)
        y = self.c(h)
        return y + self.side(x) if self.use_side else y


def _net(seed=0, frozen=False, mp=None, reshard=True, shard=True, root=True):
    torch.manual_seed(seed)
    m = _Net(frozen)
    if shard:
        kw = dict(reshard_after_forward=reshard)
        if mp is not None:
            kw["mp_policy"] = mp
        fully_shard(m.a, **kw)
        fully_shard(m.b, **kw)
        if root:
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
    def local(g):      # parameters outside every FSDP module (no root fully_shard) have plain gradients
        return g.to_local() if hasattr(g, "to_local") else g
    return {n: (None if p.grad is None else local(p.grad).detach().float().clone()) for n, p in
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
    """The quantized reduce-scatter's result is, bit for bit, every other rank's blockwise quantization of its row
    for this rank (blocks starting at each parameter), dequantized, and this rank's own row exact (it never travels),
    summed in rank order, times 1/W."""
    from pyperf import _reference as R
    local = []
    for r in range(W):         # every rank's unsharded gradient, recomputed here without FSDP
        m = _net(shard=False)
        _loss(m, *_batch(r, 0)).backward()
        local.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for kind in ("int8", "int4", "fp8"):
        got, _ = _run(kind, rank)
        for name, g in got.items():
            rows = [_segments(local[r][name], W)[rank] for r in range(W)]
            wires = torch.stack([R.quantize(row, FMT[kind], 32) for row in rows])
            wires[rank] = 0xAB                  # never read: the own row is exact
            acc = torch.zeros(-(-rows[0].numel() // 32) * 32)
            for r in range(W):
                acc += R.pack([rows[r]], align=32) if r == rank else R.dequantize(wires[r], acc.numel(), FMT[kind], 32)
            want = (acc * (1.0 / W))[:g.numel()].view(g.shape)
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
    # a frozen parameter has no residual (a frozen base model costs no error-feedback memory)
    m = _net(frozen=True)
    st = pyperf.fsdp.register(m, "int8", block_size=32, min_numel=0)
    _loss(m, *_batch(rank, 0)).backward()
    res = st.state_dict()["residual"]
    assert "frozen.weight" not in res and "frozen.bias" not in res and "a.weight" in res, sorted(res)
    assert st.stats.compressed_reduce_scatters == 3
    # ... and if it is unfrozen after registration, it is quantized without error feedback, next to the others' EF
    def unfreeze(m):
        m.frozen.requires_grad_(True)
    ref, _ = _run(None, rank, steps=2, net_kw=dict(frozen=True), setup=unfreeze)
    m = _net(frozen=True)
    st = pyperf.fsdp.register(m, "int8", block_size=32, min_numel=0)
    unfreeze(m)
    for step in range(2):
        m.zero_grad(set_to_none=True)
        _loss(m, *_batch(rank, 10 * step)).backward()
    assert m.frozen.weight.grad is not None and "frozen.weight" not in st.state_dict()["residual"]
    assert any(None in p.pieces for u in st.units for p in u.plans.values())     # the gather path ran
    _close(_local_grads(m), ref, TOL["int8"], "int8 unfrozen after registration")
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


# ---- error feedback, GradScaler ---------------------------------------------------------------------------------
def _grad_sum(kind, rank, steps, **hook_kw):
    """Sum of the sharded gradients over `steps` steps of the same model (no update): error feedback makes the
    sum of what was sent converge to the sum of the gradients."""
    m = _net()
    st = None
    if kind is not None:
        import pyperf.fsdp
        st = pyperf.fsdp.register(m, kind, **dict(dict(block_size=32, min_numel=0), **hook_kw))
    tot = None
    rmax = 0.0
    for step in range(steps):
        m.zero_grad(set_to_none=True)
        _loss(m, *_batch(rank, step)).backward()
        g = torch.cat([v.reshape(-1) for v in _local_grads(m).values()])
        tot = g if tot is None else tot + g
        if st is not None and st.error_feedback:
            rmax = max(rmax, max(float(v.abs().max()) for v in st.state_dict()["residual"].values()))
    return tot, rmax


def _body_error_feedback(rank, W):
    exact, _ = _grad_sum(None, rank, 30)
    gmax = torch.tensor([float(exact.abs().max()) / 30])
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX)
    for kind in ("int4", "fp8"):
        ef, rmax = _grad_sum(kind, rank, 30)
        noef, _ = _grad_sum(kind, rank, 30, error_feedback=False)
        num = torch.tensor([float((ef - exact).norm()) ** 2, float((noef - exact).norm()) ** 2,
                            float(exact.norm()) ** 2])
        dist.all_reduce(num)
        e_ef, e_no = math.sqrt(num[0] / num[2]), math.sqrt(num[1] / num[2])
        assert e_ef < 0.5 * e_no and e_ef < 0.02, (kind, e_ef, e_no)
        assert rmax < 4 * float(gmax), (kind, rmax, float(gmax))   # bounded: about one step's error


def _scaler_run(kind, rank, inf_steps, steps=7, sync_free=False, feature=66, **hook_kw):
    m = _net()
    m.poison_feature = feature
    st = None
    if kind is not None:
        import pyperf.fsdp
        st = pyperf.fsdp.register(m, kind, **dict(dict(block_size=32, min_numel=0) if kind in FMT else {}, **hook_kw))
        if sync_free:
            st._sync_free = True      # the CUDA path's rollback (torch.where on the stream), here on CPU
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    scales, changed, residuals = [], [], []
    for step in range(steps):
        m.poison = step in inf_steps and rank == 0
        before = [p.detach().to_local().clone() for p in m.parameters()]
        res_before = st.state_dict()["residual"] if st is not None and st.error_feedback else None
        opt.zero_grad()
        scaler.scale(_loss(m, *_batch(rank, step))).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        changed.append(any(not torch.equal(b, p.detach().to_local()) for b, p in zip(before, m.parameters())))
        if st is not None and st.error_feedback:
            residuals.append((res_before, st.state_dict()["residual"]))
    assert all(bool(torch.isfinite(p.detach().to_local()).all()) for p in m.parameters())
    return scales, changed, residuals, st, [p.detach().to_local().clone() for p in m.parameters()]


def _body_scaler(rank, W):
    """inf on rank 0 in a shard that only the last rank owns: GradScaler skips the same steps as with FSDP's
    default reduce-scatter, and EVERY rank (also those that neither sent nor received the inf) rolls its error
    feedback back to before that step."""
    inf_steps = (2, 4)
    s_ref, c_ref, _, _, _ = _scaler_run(None, rank, inf_steps)
    assert [not c for c in c_ref] == [i in inf_steps for i in range(len(c_ref))], c_ref
    for kind, kw in (("int8", {}), ("int4", {}), ("int8", dict(min_numel=10 ** 9))):   # last: all in fp32
        s, c, res, st, params = _scaler_run(kind, rank, inf_steps, **kw)
        assert s == s_ref and c == c_ref, (kind, kw, s, s_ref, c, c_ref)
        assert st.stats.nonfinite_steps == len(inf_steps), (kind, st.stats)
        for i in inf_steps:
            before, after = res[i]
            for n in before:
                assert torch.equal(before[n], after[n]), (kind, kw, i, n)
        for n, r in res[-1][1].items():
            assert bool(torch.isfinite(r).all()), (kind, n)
        if kind == "int8" and not kw:
            # the sync-free rollback (the CUDA path: torch.where on the stream, no host read) gives the same bits
            _, _, res2, st2, params2 = _scaler_run(kind, rank, inf_steps, sync_free=True)
            assert all(torch.equal(a, b) for a, b in zip(params, params2))
            assert all(torch.equal(res[-1][1][n], res2[-1][1][n]) for n in res[-1][1])
            assert st2.stats.nonfinite_steps == len(inf_steps)
    # inf on rank 0 in its own shard (the row it never sends, summed exact): its sentinel still tells every rank
    s_ref0, c_ref0, _, _, _ = _scaler_run(None, rank, inf_steps, feature=0)
    s, c, res, st, _ = _scaler_run("int8", rank, inf_steps, feature=0)
    assert s == s_ref0 and c == c_ref0 and st.stats.nonfinite_steps == len(inf_steps), (s, s_ref0, c, st.stats)
    assert all(torch.equal(res[i][0][n], res[i][1][n]) for i in inf_steps for n in res[i][0])
    # the cast kinds carry inf/nan through the cast and the fp32 sum
    for kind in ("bf16", "fp16"):
        s, c, _, _, _ = _scaler_run(kind, rank, inf_steps)
        assert s == s_ref and c == c_ref, (kind, s, s_ref, c, c_ref)
    # skip_nonfinite=False: one residual buffer; the non-finite blocks' residuals are zeroed, the rest kept
    s, c, res, st, _ = _scaler_run("int8", rank, inf_steps, skip_nonfinite=False)
    assert s == s_ref and c == c_ref
    assert all(bool(torch.isfinite(r).all()) for r in res[-1][1].values())


# ---- checkpoint / resume --------------------------------------------------------------------------------------------
def _train(kind, rank, steps, hook_kw, ckpt_dir, start=0, save_at=None):
    """AdamW on _Net with `kind`; the side branch gets no gradient in step 4 (its residuals must carry over).
    save_at: save model + optimizer with torch.distributed.checkpoint and this rank's state before that step;
    start > 0: build everything fresh and resume from that save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import pyperf.fsdp
    m = _net()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    st = pyperf.fsdp.register(m, kind, **hook_kw)
    hook_file = os.path.join(ckpt_dir, "fsdp_hook_rank%d.pt" % rank)
    if start:
        msd, osd = get_state_dict(m, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=ckpt_dir)
        set_state_dict(m, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        st.load_state_dict(torch.load(hook_file))      # before FSDP's lazy initialization: placed on first use
    for step in range(start, steps):
        if step == save_at:
            msd, osd = get_state_dict(m, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
            torch.save(st.state_dict(), hook_file)
        m.use_side = step != 4
        opt.zero_grad()
        _loss(m, *_batch(rank, step)).backward()
        opt.step()
    return [p.detach().to_local().clone() for p in m.parameters()], st.state_dict()


RESUME_CONFIGS = [("int8", dict(block_size=32, min_numel=0, stochastic_rounding=True)),
                  ("int4", dict(block_size=32, min_numel=100, start_iter=1)),
                  ("fp8", dict(block_size=64, min_numel=0)),
                  ("bf16", {})]


def _body_resume(rank, W, ckpt_root, configs):
    for i, (kind, kw) in enumerate(configs):
        d = os.path.join(ckpt_root, "c%d" % i)
        full, sd_full = _train(kind, rank, 7, kw, d, save_at=3)
        dist.barrier()
        resumed, sd_res = _train(kind, rank, 7, kw, d, start=3)
        for a, b in zip(full, resumed):
            assert torch.equal(a, b), (kind, "resume", float((a - b).abs().max()))
        assert sd_full["iter"] == sd_res["iter"] == 7
        for n, r in (sd_full["residual"] or {}).items():
            assert torch.equal(r, sd_res["residual"][n]), (kind, n)
        if kind != "bf16":
            # the run is not trivially reproducible: another seed gives other bits
            other, _ = _train(kind, rank, 7, dict(kw, seed=1) if kw.get("stochastic_rounding") else
                              dict(kw, block_size=128), os.path.join(d, "x"))
            assert any(not torch.equal(a, b) for a, b in zip(full, other)), kind


# ---- bytes, statistics, errors ----------------------------------------------------------------------------------
def _body_stats(rank, W):
    import pyperf.fsdp
    for kind, limit, err in (("int8", 0.27, 0.01), ("int4", 0.14, 0.15), ("fp8", 0.27, 0.1), ("bf16", 0.5, None),
                             ("fp32", 1.0, None)):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(512, 256), nn.Tanh(), nn.Linear(256, 384))
        for layer in (m[0], m[2], m):
            fully_shard(layer)
        st = pyperf.fsdp.register(m, kind, **(dict(stats_every=1) if err else {}))
        for step in range(2):
            m.zero_grad()
            m(torch.randn(8, 512)).square().mean().backward()
        s = st.stats
        fp32 = 2 * (W - 1) * (512 * 256 + 256 + 256 * 384 + 384) * 4 // W      # 2 steps of an fp32 reduce-scatter
        assert s.bytes_fp32 == fp32, (kind, s.bytes_fp32, fp32)
        assert 0 < s.bytes_sent <= limit * fp32, (kind, s)
        if kind in ("bf16", "fp32"):
            assert s.bytes_sent == fp32 // (2 if kind == "bf16" else 1)
        assert s.steps == 2 and s.reduce_scatters == 4 and s.compressed_reduce_scatters == 4, s
        assert s.comm_time_s > 0 and s.nonfinite_steps == 0
        if err is not None:
            assert 0 < s.rel_error < err, (kind, s)
        d = s.as_dict()
        assert d["compression"] == s.compression and "rel_error" in d
    # start_iter: the first steps go through FSDP's own reduce-scatter (fp32 bytes), uncompressed
    m = _net()
    st = pyperf.fsdp.register(m, "int8", start_iter=2)
    for step in range(3):
        m.zero_grad()
        _loss(m, *_batch(rank, step)).backward()
    assert st.stats.compressed_reduce_scatters == 3 and st.stats.reduce_scatters == 9


def _body_errors(rank, W):
    import pyperf.fsdp
    m = _net()
    with pytest.raises(ValueError, match="kind: expected one of fp32, bf16, fp16, int8"):
        pyperf.fsdp.register(m, "int3")
    with pytest.raises(ValueError, match="kind"):
        pyperf.fsdp.register(m, "allreduce")
    with pytest.raises(TypeError, match="fully_shard"):
        pyperf.fsdp.register(_net(shard=False), "int8")
    with pytest.raises(TypeError, match="nn.Module"):
        pyperf.fsdp.register("model", "int8")
    with pytest.raises(ValueError, match="block_size"):
        pyperf.fsdp.register(m, "int8", block_size=100)
    with pytest.raises(TypeError, match="unknown option.*blocksize"):
        pyperf.fsdp.register(m, "int8", blocksize=64)
    with pytest.raises(TypeError, match="error_feedback.*quantized kinds"):
        pyperf.fsdp.register(m, "bf16", error_feedback=True)
    with pytest.raises(ValueError, match="start_iter"):
        pyperf.fsdp.register(m, "int8", start_iter=-1)
    torch.manual_seed(0)
    m64 = nn.Linear(8, 8).double()
    fully_shard(m64)
    with pytest.raises(TypeError, match="float64"):
        pyperf.fsdp.register(m64, "int8")
    st = pyperf.fsdp.register(m, "int8", block_size=32, min_numel=0)
    with pytest.raises(RuntimeError, match="already"):
        pyperf.fsdp.register(m, "fp16")
    with pytest.raises(RuntimeError, match="already"):
        pyperf.fsdp.register(m.a, "fp16")          # a submodule of a registered model
    _loss(m, *_batch(rank, 0)).backward()
    sd = st.state_dict()
    # all_ranks(): every rank's state in one dict, the same on every rank; load restores this rank's part
    every = st.all_ranks().state_dict()
    assert every["world_size"] == W and len(every["ranks"]) == W
    assert torch.equal(every["ranks"][rank]["residual"]["a.weight"], sd["residual"]["a.weight"])
    assert not torch.equal(every["ranks"][(rank + 1) % W]["residual"]["a.weight"], sd["residual"]["a.weight"])
    st.all_ranks().load_state_dict(every)
    assert torch.equal(st.state_dict()["residual"]["a.weight"], sd["residual"]["a.weight"])
    for key, val in (("block_size", 64), ("rank", (rank + 1) % W), ("kind", "int4")):
        with pytest.raises(ValueError, match=key):
            st.load_state_dict(dict(sd, **{key: val}))
    bad = copy.deepcopy(sd)
    bad["residual"]["nope.weight"] = bad["residual"].pop("a.weight")
    with pytest.raises(ValueError, match="other parameters"):
        st.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["residual"]["a.weight"] = bad["residual"]["a.weight"][:, :3]
    with pytest.raises(ValueError, match="a.weight: expected shape"):
        st.load_state_dict(bad)
    with pytest.raises(KeyError, match="not a quantized parameter"):
        st.residual_of("a.nope")
    # remove(): FSDP's default reduce-scatter again, and a new registration is allowed
    st.remove()
    ref, _ = _run(None, rank)
    m.zero_grad(set_to_none=True)
    _loss(m, *_batch(rank, 0)).backward()
    _close(_local_grads(m), ref, 0.0, "after remove()")
    pyperf.fsdp.register(m, "fp16")


def _body_hsdp(rank, W):
    """HSDP (2-D mesh): a clear error, not a silently uncompressed all-reduce."""
    import pyperf.fsdp
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, W // 2), mesh_dim_names=("replicate", "shard"))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    fully_shard(m, mesh=mesh)
    with pytest.raises(NotImplementedError, match="HSDP"):
        pyperf.fsdp.register(m, "int8")


# ---- overlap on the CPU: the rows travel while backward goes on, finished when it ends ------------------------------
def _overlap_run(kind, rank, overlap, steps=2, micro=1, net_kw=None, setup=None, keep_grads=False):
    import pyperf.fsdp
    m = _net(**(net_kw or {}))
    if setup is not None:
        setup(m)
    st = pyperf.fsdp.register(m, kind, **(dict(block_size=32, min_numel=0) if kind in FMT else {}))
    st.overlap = overlap
    for step in range(steps):
        m.zero_grad(set_to_none=not keep_grads)
        for k in range(micro):
            _set_all(m, "set_requires_gradient_sync", k == micro - 1)
            _loss(m, *_batch(rank, 10 * step + k)).backward()
            if k == micro - 1:
                assert not st._inflight, "rows still in flight after backward returned"
    return _local_grads(m), st


def _body_overlap(rank, W):
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    bf16r = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)

    def premul(m):
        _set_all(m, "set_gradient_divide_factor", 3.0)

    def force_sum(m):
        _set_all(m, "set_force_sum_reduction_for_comms", True)

    def post_acc_hook(m):
        m.b.weight.register_post_accumulate_grad_hook(lambda p: p.grad.mul_(1.0))

    # (what, kwargs, whether the calls may overlap)
    cases = [("plain", {}, True), ("reshard False", dict(net_kw=dict(reshard=False)), True),
             ("param bf16 reduce fp32", dict(net_kw=dict(mp=bf16)), True), ("accumulation x3", dict(micro=3), True),
             ("PREMUL_SUM", dict(setup=premul), True),
             ("no root FSDP module (a and b are each a root)", dict(net_kw=dict(root=False)), True),
             ("reduce bf16 (FSDP casts the output)", dict(net_kw=dict(mp=bf16r)), False),
             ("SUM + FSDP's post-divide", dict(setup=force_sum), False),
             ("grads kept (FSDP accumulates into them from step 2 on)", dict(keep_grads=True), None),
             ("post-accumulate-grad hook", dict(setup=post_acc_hook), None)]
    for kind in ("int8", "bf16", "fp32"):
        for what, kw, overlaps in cases:
            ref, st0 = _overlap_run(kind, rank, False, **kw)
            got, st1 = _overlap_run(kind, rank, True, **kw)
            assert st0.stats.overlapped_reduce_scatters == 0
            n = st1.stats.overlapped_reduce_scatters
            if overlaps is True:
                assert n > 0, (kind, what)
            elif overlaps is False:
                assert n == 0, (kind, what, n)
            else:   # some calls synchronous: the module whose parameter has a hook; the steps with grads to add to
                assert 0 < n < st1.stats.reduce_scatters, (kind, what, n)
            for name, r in ref.items():
                assert (r is None) == (got[name] is None), (kind, what, name)
                if r is not None:
                    assert torch.equal(got[name], r), (kind, what, name)
            assert torch.equal(st1.stats._open_flag, st0.stats._open_flag) if st0.stats._open_flag is not None \
                else True
            if kind == "int8":
                sd0, sd1 = st0.state_dict(), st1.state_dict()
                for name in sd0["residual"]:
                    assert torch.equal(sd0["residual"][name], sd1["residual"][name]), (what, name)
    # a backward that raises after some reduce-scatters left (FSDP itself does not train on after that): what is in
    # flight is finished by the next call that needs it (state_dict here), on every rank, without a hang
    import pyperf.fsdp
    m = _net()
    st = pyperf.fsdp.register(m, "int8", block_size=32, min_numel=0)
    m.poison_raise = True
    with pytest.raises(RuntimeError, match="poisoned backward"):
        _loss(m, *_batch(rank, 0)).backward()
    assert st._inflight
    st.state_dict()
    assert not st._inflight

# ---- register_all_gather: the same parameters, bit for bit ---------------------------------------------------------
def _params_after(rank, steps, net_kw, kind=None, all_gather=False, prefetch=False, chunk=None):
    """Every parameter's local shard after `steps` AdamW steps (the all-gathers feed forward and backward)."""
    import pyperf.fsdp
    from pyperf.comm import transport
    m = _net(**net_kw)
    if prefetch:   # several all-gathers in flight at once
        m.a.set_modules_to_forward_prefetch([m.b])
        m.b.set_modules_to_backward_prefetch([m.a])
    if kind is not None:
        pyperf.fsdp.register(m, kind, block_size=32, min_numel=0)
    handle = pyperf.fsdp.register_all_gather(m) if all_gather else None
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    saved = transport.CHUNK_BYTES
    if chunk is not None:
        transport.CHUNK_BYTES = chunk
    try:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            _loss(m, *_batch(rank, step)).backward()
            opt.step()
    finally:
        transport.CHUNK_BYTES = saved
    return {n: p.to_local().detach().clone() for n, p in m.named_parameters()}, m, handle


def _body_all_gather(rank, W):
    import pyperf.fsdp
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for net_kw in (dict(), dict(reshard=False), dict(mp=bf16), dict(frozen=True)):
        for kind in (None, "int8"):
            for prefetch in (False, True):
                ref, _, _ = _params_after(rank, 3, net_kw, kind, prefetch=prefetch)
                got, _, _ = _params_after(rank, 3, net_kw, kind, all_gather=True, prefetch=prefetch, chunk=200)
                for n in ref:
                    assert torch.equal(got[n], ref[n]), (net_kw, kind, prefetch, n)
    # remove(): the modules get back the all-gathers they had
    _, m, handle = _params_after(rank, 1, {}, all_gather=True)
    groups = [g for x in _fsdp_modules(m) for g in pyperf.fsdp._fsdp_param_groups(x)]
    comms = {type(g._all_gather_comm).__name__ for g in groups}
    assert comms == {"_AllGather"}, comms
    handle.remove()
    groups = [g for x in _fsdp_modules(m) for g in pyperf.fsdp._fsdp_param_groups(x)]
    comms = {type(g._all_gather_comm).__name__ for g in groups}
    assert "_AllGather" not in comms, comms
    with pytest.raises(TypeError, match="fully_shard"):
        pyperf.fsdp.register_all_gather(_net(shard=False))
    with pytest.raises(TypeError, match="nn.Module"):
        pyperf.fsdp.register_all_gather("model")


# ---- the multi-rank tests: several bodies per process group (each spawn costs seconds of imports) -----------------
def test_kinds_ops_exact_modes_stats_errors_2_ranks():
    run_ranks(_run_all, 2, [(_body_exact, ()), (_body_kinds_ops, (KINDS,)), (_body_modes, ()), (_body_stats, ()),
                            (_body_errors, ()), (_body_all_gather, ()),
                            (_body_overlap, ())])


def test_error_feedback_gradscaler_resume_2_ranks(tmp_path):
    run_ranks(_run_all, 2, [(_body_error_feedback, ()), (_body_scaler, ()),
                            (_body_resume, (str(tmp_path), RESUME_CONFIGS))])


def test_4_ranks(tmp_path):
    """4 ranks: a padding-only shard, a rank that neither sends nor receives the inf, owners of blocks round-robin."""
    run_ranks(_run_all, 4, [(_body_exact, ()), (_body_kinds_ops, (("int8", "int4", "fp8", "bf16", "fp16"),)),
                            (_body_scaler, ()), (_body_stats, ()), (_body_hsdp, ()), (_body_all_gather, ()),
                            (_body_resume, (str(tmp_path), RESUME_CONFIGS[:2]))])


# ---- convergence: a transformers GPT-2 -----------------------------------------------------------------------------
def _text(nbytes=1 << 19):
    """Real text that ships with Python (the standard library's sources), byte tokens."""
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), "rb") as f:
                parts.append(f.read())
            total += len(parts[-1])
            if total >= nbytes:
                break
    return torch.frombuffer(bytearray(b"".join(parts)[:nbytes]), dtype=torch.uint8).long()


def _gpt2_lr(step, steps=300, lr=3e-3):
    warm = steps // 20        # the demo's schedule: linear warm-up, cosine to 10%
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))


def _gpt2_converge(rank, kind, hook_kw, steps=300, T=32, B=8):
    """Held-out loss of a GPT-2 (transformers, built from a config) after `steps` AdamW steps with fully_shard
    per block and on the root; the same seeds and batches for every kind."""
    from transformers import GPT2Config, GPT2LMHeadModel
    data = _text()
    n_train = len(data) * 7 // 8
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_positions=T, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    if isinstance(kind, str):
        import pyperf.fsdp
        pyperf.fsdp.register(model, kind, **hook_kw)
    elif kind is not None:        # a test comm of FSDP's ReduceScatter protocol
        for m in model.modules():
            if hasattr(m, "set_custom_reduce_scatter"):
                m.set_custom_reduce_scatter(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(rank)
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = _gpt2_lr(step, steps)
        starts = torch.randint(0, n_train - T - 1, (B,), generator=g)
        x = torch.stack([data[s:s + T] for s in starts.tolist()])
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    with torch.no_grad():          # every rank the same held-out windows
        starts = torch.arange(n_train, len(data) - T - 1, (len(data) - T - 1 - n_train) // 16)[:16]
        x = torch.stack([data[s:s + T] for s in starts.tolist()])
        return float(model(input_ids=x, labels=x).loss)


class _TruncatingComm:
    """The power check's control: FSDP's exact mean, but the last quarter of every output shard left at zero (the
    bug class "a buffer silently cut short"): those weights never train."""

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        W = dist.get_world_size(group)
        rows = input_tensor.view(W, -1).clone()
        dist.all_reduce(rows, group=group)
        out = output_tensor.view(-1)
        out.copy_(rows[dist.get_rank(group)] / W)
        out[out.numel() - out.numel() // 4:] = 0


def _body_gpt2(rank, W):
    # start_iter=30: twice the LR warm-up (15 steps), as documented for Adam/AdamW (docs/hooks.md, docs/fsdp.md).
    # The default min_numel (1024) and block_size (256): LayerNorm weights and biases travel in fp32.
    res = {kind: _gpt2_converge(rank, kind, dict(start_iter=30) if kind else {})
           for kind in (None, "int8", "int4", "fp8")}
    # the test can fail: a reduce-scatter that leaves a quarter of each shard's gradient at zero ends far above.
    # (Quantization noise is a weak control here: pyperf's int4 without error feedback on 4096-element blocks from
    # step 0 ends only ~2-3% above now that each rank's own row is exact.)
    broken = _gpt2_converge(rank, _TruncatingComm(), None)
    if rank == 0:
        print("GPT-2 held-out loss after 300 steps:", res, "truncating control:", broken, flush=True)
    base = res[None]
    for kind, tol in (("int8", 0.02), ("fp8", 0.02), ("int4", 0.05)):
        assert abs(res[kind] - base) <= tol * base, (kind, res)
    assert broken > 1.05 * base, ("the convergence test lost its power", broken, res)


@pytest.mark.slow
def test_gpt2_convergence_300_steps_2_ranks():
    run_ranks(_run_all, 2, [(_body_gpt2, ())])


# ---- the demo --------------------------------------------------------------------------------------------------------
def test_fsdp_demo_compare(tmp_path):
    """examples/train_gpt_fsdp.py --compare on 2 Gloo ranks: every kind and FSDP's own reduce-scatters train, with
    the bytes each sends and the same first loss (same seeds and data)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT
    hooks = ["torch-reducescatter", "torch-bf16-reduce", "fp32", "bf16", "fp16", "int8", "int4", "fp8"]
    j, png = tmp_path / "r.json", tmp_path / "loss.png"
    cmd = [sys.executable, os.path.join(ROOT, "examples", "train_gpt_fsdp.py"), "--compare", "--hooks",
           ",".join(hooks), "--steps", "3", "--start-iter", "0", "--d-model", "64", "--layers", "2", "--heads", "2",
           "--seq-len", "32", "--batch-size", "2", "--data-bytes", str(1 << 20), "--threads", "1",
           "--no-reshard-after-forward", "--json", str(j), "--plot", str(png)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, "demo failed:\n%s\n%s" % (r.stdout[-3000:], r.stderr[-3000:])
    assert "final loss" in r.stdout and "+all-gathers" in r.stdout
    res = {x["hook"]: x for x in json.loads(j.read_text())["results"]}
    assert set(res) == set(hooks)
    for h, x in res.items():
        assert len(x["losses"]) == 3 and all(0 < v < 10 for v in x["losses"]), (h, x["losses"])
        assert x["reshard_after_forward"] is False and x["allgather_bytes_per_step"] > 0
    ratio = {h: res[h]["bytes_per_step"] / res[h]["fp32_bytes_per_step"] for h in hooks}
    assert ratio["torch-reducescatter"] == 1.0 and ratio["fp32"] == pytest.approx(1.0, abs=0.01)
    for h in ("torch-bf16-reduce", "bf16", "fp16"):
        assert ratio[h] == pytest.approx(0.5, abs=0.01), (h, ratio)
    assert ratio["int4"] < ratio["int8"] < 0.3 and ratio["fp8"] < 0.3, ratio
    first = {h: x["losses"][0] for h, x in res.items()}
    assert max(first.values()) - min(first.values()) < 1e-4, first
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
