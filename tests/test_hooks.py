"""pyperf.hooks on real DDP models over Gloo ranks: every kind within bound of `allreduce`, DDP's modes (bucket
view, static graph, unused parameters, no_sync, bf16 parameters), error feedback over 50 steps, GradScaler skips,
bit-identical checkpoint/resume, independence from DDP's bucket layout, statistics, bad input, convergence."""
import copy
import gc
import math

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from _dist import run_ranks

KINDS = ("allreduce", "bf16", "fp16", "int8", "int4", "fp8", "fp8_e5m2")
# max |hook grad - allreduce grad| / max |allreduce grad| per parameter
TOL = {"allreduce": 1e-6, "bf16": 0.01, "fp16": 2e-3, "int8": 0.02, "int4": 0.3, "fp8": 0.15, "fp8_e5m2": 0.3}


class _WithUnused(torch.nn.Module):
    def __init__(self, seq):
        super().__init__()
        self.seq = seq
        self.unused = torch.nn.Linear(64, 64)     # never called in forward: find_unused_parameters territory

    def forward(self, x):
        return self.seq(x)


def _model(seed=0, dtype=torch.float32, unused=False):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
              torch.nn.Linear(64, 8)]
    m = torch.nn.Sequential(*layers)
    if unused:
        m = _WithUnused(m)
    return m.to(dtype)


def _batch(rank, step, dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(n, 32, generator=g).to(dtype), torch.randn(n, 8, generator=g).to(dtype)


def _loss(m, x, y):
    return (m(x).float() - y.float()).square().mean()


def _grads(kind, rank, ddp_kw=None, model_kw=None, hook_kw=None, micro=1):
    from pyperf import hooks
    dtype = (model_kw or {}).get("dtype", torch.float32)
    ddp = DDP(_model(**(model_kw or {})), **(ddp_kw or {}))
    st = hooks.register(ddp, kind, **dict(dict(block_size=64, min_numel=0), **(hook_kw or {})))
    for step in range(2):          # the 2nd step runs on DDP's rebuilt buckets
        ddp.zero_grad()
        for k in range(micro):
            x, y = _batch(rank, 10 * step + k, dtype)
            if k < micro - 1:
                with ddp.no_sync():
                    _loss(ddp, x, y).backward()
            else:
                _loss(ddp, x, y).backward()
    return [None if p.grad is None else p.grad.float().clone() for p in ddp.parameters()], st


def _close(got, ref, tol, what):
    for i, (a, r) in enumerate(zip(got, ref)):
        if r is None:
            assert a is None or not bool(a.any()), what
            continue
        scale = max(float(r.abs().max()), 1e-12)
        err = float((a - r).abs().max()) / scale
        assert err <= tol, "%s: param %d off by %.3g of its max (tolerance %.3g)" % (what, i, err, tol)


def _body_kinds(rank, W):
    ref, _ = _grads("allreduce", rank)
    plain = DDP(_model())
    plain.zero_grad()
    for step in range(2):
        plain.zero_grad()
        _loss(plain, *_batch(rank, 10 * step)).backward()
    _close(ref, [p.grad for p in plain.parameters()], 1e-6, "allreduce hook vs DDP's default")
    for kind in KINDS[1:]:
        got, st = _grads(kind, rank)
        _close(got, ref, TOL[kind], kind)
        assert st.stats.steps == 2 and st.stats.buckets >= 2
    for kind in ("int8", "int4"):
        # stochastic rounding, no error feedback, default min_numel
        got, _ = _grads(kind, rank, hook_kw=dict(stochastic_rounding=True, error_feedback=False, min_numel=1024))
        _close(got, ref, 2 * TOL[kind], kind + " stochastic")
        got, st = _grads(kind, rank, hook_kw=dict(algorithm="two_shot"))
        assert not st._all_gather
        _close(got, ref, TOL[kind], kind + " two_shot")


def _body_all_gather_exact(rank, W):
    """The all-gather form's result is, bit for bit, every rank's quantized local gradient dequantized and summed
    in rank order, times 1/W, per parameter (blocks start at parameter boundaries, whatever the buckets)."""
    from pyperf import _reference as R
    from pyperf import hooks
    local = []
    for r in range(W):           # every rank's local gradient, recomputed here from its batch
        m = _model()
        _loss(m, *_batch(r, 0)).backward()
        local.append([p.grad.clone() for p in m.parameters()])
    for kind, fmt in (("int8", "int8"), ("int4", "int4"), ("fp8", "fp8_e4m3")):
        for cap in (25, 0.0001):
            ddp = DDP(_model(), bucket_cap_mb=cap)
            st = hooks.register(ddp, kind, block_size=64, min_numel=0)
            assert st._all_gather == (W == 2)
            _loss(ddp, *_batch(rank, 0)).backward()
            for i, p in enumerate(ddp.parameters()):
                wires = torch.stack([R.quantize(local[r][i], fmt, 64) for r in range(W)])
                want = R.reduce_quantized(wires, p.numel(), fmt, 64, scale=1.0 / W).view(p.shape)
                assert torch.equal(p.grad, want), (kind, cap, i, float((p.grad - want).abs().max()))


def _body_variants(rank, W):
    cases = [
        ("bucket view", dict(gradient_as_bucket_view=True), {}, 1),
        ("no bucket view", dict(gradient_as_bucket_view=False), {}, 1),
        ("static graph", dict(static_graph=True), {}, 1),
        ("unused params", dict(find_unused_parameters=True), dict(unused=True), 1),
        ("no_sync x3", {}, {}, 3),
        ("bf16 params", {}, dict(dtype=torch.bfloat16), 1),
        ("small buckets", dict(bucket_cap_mb=0.005), {}, 1),
    ]
    for what, ddp_kw, model_kw, micro in cases:
        ref, _ = _grads("allreduce", rank, ddp_kw, model_kw, micro=micro)
        for kind in ("int8", "fp8"):
            got, _ = _grads(kind, rank, ddp_kw, model_kw, micro=micro)
            tol = TOL[kind] + (0.02 if "bf16" in what else 0)
            _close(got, ref, tol, "%s %s" % (kind, what))


def _body_stats(rank, W):
    from pyperf import hooks
    for kind, limit, err in (("int8", 0.27, 0.01), ("int4", 0.14, 0.15), ("allreduce", 1.0, None)):
        torch.manual_seed(0)
        ddp = DDP(torch.nn.Linear(512, 256))
        st = hooks.register(ddp, kind, stats_every=1)
        for step in range(2):
            ddp.zero_grad()
            ddp(torch.randn(8, 512)).square().mean().backward()
        s = st.stats
        assert s.bytes_sent > 0 and s.bytes_fp32_ring == 2 * 2 * (W - 1) * (512 * 256 + 256) * 4 // W
        assert s.compression <= limit, (kind, s)
        assert s.hook_time_s > 0 and s.steps == 2
        if err is not None:
            assert 0 < s.rel_error < err, (kind, s)
            assert s.compressed_buckets == s.buckets
        assert "compression" in s.as_dict()


def _body_errors(rank, W):
    from pyperf import hooks
    ddp = DDP(_model())
    with pytest.raises(ValueError, match="kind"):
        hooks.register(ddp, "int3")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        hooks.register(_model(), "int8")
    with pytest.raises(ValueError, match="block_size"):
        hooks.register(ddp, "int8", block_size=100)
    with pytest.raises(ValueError, match="block_size"):
        hooks.register(ddp, "int4", block_size=1 << 20)
    with pytest.raises(TypeError, match="option"):
        hooks.register(ddp, "int8", blocksize=64)
    with pytest.raises(ValueError, match="start_iter"):
        hooks.register(ddp, "int8", start_iter=-1)
    with pytest.raises(ValueError, match="algorithm: expected one of auto, two_shot, all_gather, got 'ring'"):
        hooks.register(ddp, "int8", algorithm="ring")
    other = dist.new_group(list(range(W)))
    with pytest.raises(ValueError, match="process_group"):
        hooks.register(ddp, "int8", process_group=other)
    with pytest.raises(TypeError, match="float64"):
        hooks.register(DDP(_model(dtype=torch.float64)), "int8")
    st = hooks.register(ddp, "int8")
    with pytest.raises(RuntimeError, match="already"):
        hooks.register(ddp, "fp16")
    bad = st.state_dict()
    bad["block_size"] = 128
    with pytest.raises(ValueError, match="block_size"):
        st.load_state_dict(bad)
    with pytest.raises(ValueError, match="kind"):
        hooks.hook_for("nope")
    # the raw hooks have torch's signature and work with register_comm_hook directly
    raw = DDP(_model())
    raw.register_comm_hook(hooks.HookState("fp16", None, list(raw.parameters())), hooks.fp16_hook)
    _loss(raw, *_batch(rank, 0)).backward()


def test_kinds_within_bound_of_allreduce_2_ranks():
    run_ranks(_run_all, 2, [_body_kinds, _body_all_gather_exact])


def test_ddp_modes_stats_and_errors_2_ranks():
    run_ranks(_run_all, 2, [_body_variants, _body_stats, _body_errors])


def _run_all(rank, W, bodies, *args):
    for b in bodies:
        b(rank, W, *args)
    # DDP models sit in reference cycles: collect them (and the process groups they hold) now, on this thread,
    # before the harness destroys the default group; left to interpreter exit, a Gloo group's threads can be torn
    # down without a join (an occasional SIGABRT "terminate called without an active exception")
    gc.collect()


# ---- error feedback, GradScaler -----------------------------------------------------------------------------------
def _grad_sums(kind, rank, steps, **hook_kw):
    from pyperf import hooks
    ddp = DDP(_model())
    st = hooks.register(ddp, kind, block_size=64, min_numel=0, **hook_kw)
    sums = [torch.zeros_like(p) for p in ddp.parameters()]
    rmax = 0.0
    for step in range(steps):     # lr 0: every step sees the same model, so the updates sum exactly
        ddp.zero_grad()
        _loss(ddp, *_batch(rank, step)).backward()
        for s, p in zip(sums, ddp.parameters()):
            s += p.grad
        if st._residual is not None:
            rmax = max(rmax, float(st._residual.abs().max()))
    return torch.cat([s.view(-1) for s in sums]), rmax


def _body_ef(rank, W):
    exact, _ = _grad_sums("allreduce", rank, 50)
    for kind in ("int4", "fp8"):
        ef, rmax = _grad_sums(kind, rank, 50)
        noef, _ = _grad_sums(kind, rank, 50, error_feedback=False)
        e_ef = float((ef - exact).norm() / exact.norm())
        e_no = float((noef - exact).norm() / exact.norm())
        assert e_ef < 0.5 * e_no, (kind, e_ef, e_no)
        assert e_ef < 0.02, (kind, e_ef)
        gmax = float(exact.abs().max()) / 50 * 4
        assert rmax < gmax, (kind, rmax, gmax)      # the residual stays bounded (about one step's error)


def _scaler_run(kind, rank, inf_steps, steps=8, min_numel=0):
    from pyperf import hooks
    ddp = DDP(_model())
    st = hooks.register(ddp, kind, block_size=64, min_numel=min_numel)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3)
    target = ddp.module[2].weight
    cur = {"step": -1}
    target.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), float("inf"))
                         if (cur["step"] in inf_steps and rank == 0) else g)
    scales, changed, residuals = [], [], []
    for step in range(steps):
        cur["step"] = step
        before = [p.detach().clone() for p in ddp.parameters()]
        res_before = st.state_dict()["residual"]
        opt.zero_grad()
        scaler.scale(_loss(ddp, *_batch(rank, step))).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        changed.append(any(not torch.equal(b, p) for b, p in zip(before, ddp.parameters())))
        residuals.append((res_before, st.state_dict()["residual"]))
    assert all(bool(torch.isfinite(p).all()) for p in ddp.parameters())
    return scales, changed, residuals, st


def _body_scaler(rank, W):
    inf_steps = (2, 5)
    s_ref, c_ref, _, _ = _scaler_run("allreduce", rank, inf_steps)
    assert [not c for c in c_ref] == [i in inf_steps for i in range(len(c_ref))]
    for kind in ("int8", "int4"):
        s, c, res, st = _scaler_run(kind, rank, inf_steps)
        assert s == s_ref and c == c_ref, (kind, s, s_ref, c, c_ref)
        assert st.stats.nonfinite_steps == len(inf_steps)
        for i in inf_steps:     # a skipped step leaves the error feedback exactly as it was
            before, after = res[i]
            assert torch.equal(before, after), (kind, i)
        assert bool(torch.isfinite(res[-1][1]).all())
    # the inf in a parameter sent uncompressed (below min_numel): the fp32 path flags it the same way
    s, c, _, st = _scaler_run("int8", rank, inf_steps, min_numel=10 ** 9)
    assert s == s_ref and c == c_ref and st.stats.nonfinite_steps == len(inf_steps), (s, s_ref, c, c_ref)


def test_error_feedback_and_gradscaler_2_ranks():
    run_ranks(_run_all, 2, [_body_ef, _body_scaler])


# ---- checkpoint / resume, layout independence --------------------------------------------------------------------
def _train(kind, rank, steps, cap, hook_kw, start=0, ckpt=None, save_at=None):
    from pyperf import hooks
    ddp = DDP(_model(), bucket_cap_mb=cap)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    st = hooks.register(ddp, kind, **hook_kw)
    if ckpt is not None:
        ddp.module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        st.load_state_dict(ckpt["hook"])
    saved = None
    for step in range(start, steps):
        if step == save_at:
            saved = copy.deepcopy({"model": ddp.module.state_dict(), "opt": opt.state_dict(),
                                   "hook": st.state_dict()})
        opt.zero_grad()
        _loss(ddp, *_batch(rank, step)).backward()
        opt.step()
    return [p.detach().clone() for p in ddp.parameters()], saved


RESUME_CONFIGS = [("int8", dict(block_size=64, min_numel=0, stochastic_rounding=True)),
                  ("int4", dict(block_size=32, min_numel=100, start_iter=1)),
                  ("fp8", dict(block_size=64, min_numel=0)),
                  # the algorithm "auto" does not pick at this world size (2 ranks: all_gather, 4: two_shot)
                  ("int8", dict(block_size=64, min_numel=0, stochastic_rounding=True, algorithm="two_shot")),
                  ("int8", dict(block_size=64, min_numel=0, stochastic_rounding=True, algorithm="all_gather"))]


def _body_resume_layout(rank, W, configs):
    for kind, kw in configs:
        full, saved = _train(kind, rank, 6, 0.01, kw, save_at=3)
        # resume: a fresh DDP (initial bucket layout again), states loaded from this rank's save
        resumed, _ = _train(kind, rank, 6, 0.01, kw, start=3, ckpt=saved)
        for a, b in zip(full, resumed):
            assert torch.equal(a, b), (kind, "resume", float((a - b).abs().max()))
        # layout: other bucket caps give other buckets (one bucket, one per parameter), same bits
        for cap in (25, 0.0001):
            other, _ = _train(kind, rank, 6, cap, kw)
            for a, b in zip(full, other):
                assert torch.equal(a, b), (kind, "bucket_cap_mb", cap, float((a - b).abs().max()))


def test_resume_bit_identical_and_layout_independent_2_ranks():
    run_ranks(_run_all, 2, [_body_resume_layout], RESUME_CONFIGS)


def test_resume_bit_identical_and_layout_independent_4_ranks():
    # the hardest config (stochastic rounding + both error feedbacks; 4 ranks own blocks round-robin), and the
    # all-gather form at 4 ranks
    run_ranks(_run_all, 4, [_body_resume_layout], [RESUME_CONFIGS[0], RESUME_CONFIGS[-1]])


# ---- convergence ----------------------------------------------------------------------------------------------------
def _teacher_data():
    g = torch.Generator().manual_seed(123)
    teacher = torch.randn(32, 8, generator=g) / 4
    xs = torch.randn(4096, 32, generator=g)
    ys = torch.tanh(xs @ teacher) + 0.01 * torch.randn(4096, 8, generator=g)
    return xs, ys


def _converge(rank, kind, make_opt, hook_kw, steps=300, lr_at=None):
    """Final eval loss of _model(seed=1) trained `steps` steps on the teacher task with `kind` (same seeds and data
    for every kind: rank r draws its batches from generator seed r)."""
    from pyperf import hooks
    xs, ys = _teacher_data()
    xe, ye = xs[-512:], ys[-512:]
    ddp = DDP(_model(seed=1))
    hooks.register(ddp, kind, **({} if kind == "allreduce" else hook_kw))
    opt = make_opt(ddp.parameters())
    gb = torch.Generator().manual_seed(rank)
    for step in range(steps):
        if lr_at is not None:
            for pg in opt.param_groups:
                pg["lr"] = lr_at(step)
        idx = torch.randint(0, 3584, (32,), generator=gb)
        opt.zero_grad()
        (ddp(xs[idx]) - ys[idx]).square().mean().backward()
        opt.step()
    with torch.no_grad():
        return float((ddp.module(xe) - ye).square().mean())


BOUNDS = (("int8", 0.02), ("int4", 0.05), ("fp8", 0.03))      # issue 3: final loss within 2% / 5% / 3%


def _check_bounds(res, what):
    base = res["allreduce"]
    for kind, tol in BOUNDS:
        assert abs(res[kind] - base) <= tol * base, (what, kind, res)


def _body_converge(rank, W, out):
    # SGD with momentum: the setting error feedback is analysed for. (With Adam at a constant lr 3e-3 this toy is
    # still halving its loss every ~50 steps at step 300, so the final loss measures speed: int4 (block 64) ends
    # +6.8%, i.e. 4 steps behind; int8 and fp8 +0.2%. The AdamW test below uses the demo's lr schedule.)
    res = {kind: _converge(rank, kind, lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9),
                           dict(min_numel=0, block_size=64))
           for kind in ("allreduce", "int8", "int4", "fp8")}
    if rank == 0:
        print("SGD: final eval loss after 300 steps:", res, flush=True)
        _check_bounds(res, "SGD")


def _adamw_lr(step, steps=300, lr=1e-2):
    warm = steps // 20          # the demo's schedule (examples/train_gpt_ddp.py): linear warm-up, cosine to 10%
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (steps - warm))))


def _body_converge_adamw(rank, W, out):
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)   # noqa: E731
    # start_iter=30 (the default is 0): with Adam-family optimizers, send the first steps uncompressed, past the LR
    # warm-up (15 steps here): the recommended setting (docs/hooks.md). Quantization noise while Adam's moments are
    # young and the LR is at its peak is what costs (the demo GPT at start_iter=0: int8 +7.5%, int4 +9.5%, fp8 +8.0%
    # final loss after a spike at step 18; at start_iter=30: +0.03%, +0.6%, +0.1%). min_numel=0: every parameter of
    # this small MLP is quantized. block_size is the default, 256.
    kw = dict(start_iter=30, min_numel=0)
    res = {kind: _converge(rank, kind, adamw, kw, lr_at=_adamw_lr) for kind in ("allreduce", "int8", "int4", "fp8")}
    # the test can fail: int4 without error feedback on coarse blocks ends ~7% above allreduce (measured +7.4%)
    broken = _converge(rank, "int4", adamw, dict(block_size=4096, min_numel=0, error_feedback=False),
                       lr_at=_adamw_lr)
    if rank == 0:
        print("AdamW: final eval loss after 300 steps:", res, "int4 no EF, block 4096:", broken, flush=True)
        _check_bounds(res, "AdamW")
        assert broken > 1.05 * res["allreduce"], ("the AdamW convergence test lost its power", broken, res)


@pytest.mark.slow
def test_convergence_300_steps_2_ranks():
    run_ranks(_run_all, 2, [_body_converge], {})


@pytest.mark.slow
def test_convergence_adamw_300_steps_2_ranks():
    run_ranks(_run_all, 2, [_body_converge_adamw], {})
