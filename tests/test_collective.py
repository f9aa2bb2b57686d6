"""The two-shot quantized all-reduce (pyperf.comm.quantized_all_reduce) on real Gloo ranks: equals the exact mean
within the format's bound for world sizes 1-4 and sizes that do not divide evenly, sync and async, identical on
every rank, error feedback, non-finite blocks, GradientBucketer's quantized compression, bad input."""
import gc

import pytest
import torch
import torch.distributed as dist

from _dist import run_ranks

FMTS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2")
QMAX = {"int8": 127.0, "int4": 7.0}
REL = {"fp8_e4m3": 2.0 ** -4, "fp8_e5m2": 2.0 ** -3}      # half-ulp relative error of one fp8 rounding
SIZES = (0, 1, 31, 257, 1031)
B = 64


def _inputs(n, W, seed):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(W, n, generator=g) * torch.logspace(-2, 1, max(n, 1))[:n]   # blocks of very different scale
    return xs


def _block_amax(v, n):
    nb = -(-n // B)
    p = torch.zeros(nb * B)
    p[:n] = v.abs()
    return p.view(nb, B).amax(1).repeat_interleave(B)[:n]


def _bound(xs, fmt, stochastic=False):
    """Per-element bound of |two-shot mean - exact mean|: the clients' rounding (averaged) plus the server's."""
    W, n = xs.shape
    mean = xs.mean(0)
    a_clients = torch.stack([_block_amax(x, n) for x in xs]).mean(0)
    step = (1.0 / QMAX[fmt]) if fmt in QMAX else 2 * REL[fmt]
    per = step if stochastic else step / 2
    e1 = per * a_clients
    e2 = per * (_block_amax(mean, n) + e1)
    return (e1 + e2) * 1.01 + 1e-7


def _body_exact(rank, W):
    from pyperf.comm import quantized_all_reduce
    for n in SIZES:
        xs = _inputs(n, W, 1000 + n)
        exact = xs.mean(0)
        for fmt in FMTS:
            for stochastic in (False, True):
                y = quantized_all_reduce(xs[rank].clone(), fmt, block_size=B, stochastic=stochastic, seed=3, offset=n)
                assert y.shape == (n,) and y.dtype == torch.float32
                err = (y - exact).abs()
                bound = _bound(xs, fmt, stochastic)
                assert bool((err <= bound).all()), (W, n, fmt, stochastic, float((err - bound).max()))
                # async: same bits
                fut = quantized_all_reduce(xs[rank].clone(), fmt, block_size=B, stochastic=stochastic, seed=3,
                                           offset=n, async_op=True)
                assert isinstance(fut, torch.futures.Future)
                assert torch.equal(fut.wait(), y)
                # every rank holds the same bits
                allv = [torch.empty_like(y) for _ in range(W)]
                dist.all_gather(allv, y)
                assert all(torch.equal(a, y) for a in allv), (W, n, fmt)
    # sum, other dtypes and shapes, in place through out=
    x = _inputs(2 * 3 * 7, W, 5)[rank].view(2, 3, 7)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xi = x.to(dtype)
        s = quantized_all_reduce(xi, "int8", block_size=B, op="sum")
        assert s.shape == xi.shape and s.dtype == dtype
        ref = _inputs(2 * 3 * 7, W, 5).to(dtype).float().sum(0).view(2, 3, 7)
        assert torch.allclose(s.float(), ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    xi = x.clone()
    out = quantized_all_reduce(xi, "int8", block_size=B, out=xi)
    assert out is xi




def _body_ef(rank, W):
    from pyperf.comm import quantized_all_reduce
    from pyperf.comm.quantized import chunk_numel, padded_numel
    n = 1031
    xs = _inputs(n, W, 7)
    exact = xs.mean(0)
    res = torch.zeros(padded_numel(n, W, B))
    srv = torch.zeros(chunk_numel(n, W, B))
    acc = torch.zeros(n)
    K = 40
    for k in range(K):
        acc += quantized_all_reduce(xs[rank], "int4", block_size=B, residual=res, server_residual=srv)
    one = quantized_all_reduce(xs[rank], "int4", block_size=B)
    one_err = float((one - exact).abs().max())
    avg_err = float((acc / K - exact).abs().max())
    # with error feedback what was not sent is sent later: the running sum tracks K * mean
    assert avg_err < one_err / 8, (avg_err, one_err)
    assert bool(torch.isfinite(res).all()) and float(res.abs().max()) < float(xs.abs().max())




def _body_nonfinite(rank, W):
    from pyperf.comm import quantized_all_reduce
    n = 5 * B + 3
    x = torch.randn(n, generator=torch.Generator().manual_seed(rank))
    if rank == 1:
        x[2 * B + 5] = float("inf")
        x[4 * B] = float("nan")
    for fmt in FMTS:
        y = quantized_all_reduce(x, fmt, block_size=B)
        fin = torch.isfinite(y).view(-1)
        bad_blocks = {2, 4}
        for b in range(-(-n // B)):
            blk = fin[b * B:(b + 1) * B]
            if b in bad_blocks:
                assert not bool(blk.any()), (fmt, b)     # never clamped into finite numbers
            else:
                assert bool(blk.all()), (fmt, b)




def _body_bucketer(rank, W):
    from pyperf.comm import GradientBucketer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.Tanh(), torch.nn.Linear(50, 3))
    ref = {}
    from pyperf.comm.quantized import QuantizedCompressor
    # "auto" takes the all-gather form at 2 ranks and the two-shot at 4: both forced once as well
    forced = {"int8 two_shot": lambda: QuantizedCompressor("int8", algorithm="two_shot"),
              "int8 all_gather": lambda: QuantizedCompressor("int8", algorithm="all_gather"),
              "int8 all_gather SR": lambda: QuantizedCompressor("int8", algorithm="all_gather",
                                                                stochastic_rounding=True)}
    for comp in ("none", "int8", "int4", "fp8") + tuple(forced):
        bk = GradientBucketer(model.parameters(), bucket_cap_mb=0.004,
                              compression=forced[comp]() if comp in forced else comp)
        model.zero_grad()
        g = torch.Generator().manual_seed(rank)
        model(torch.randn(16, 40, generator=g)).square().mean().backward()
        bk.wait()
        bk.remove()
        grads = [p.grad.clone() for p in model.parameters()]
        if comp == "none":
            ref = grads
            continue
        tol = {"int8": 0.02, "int4": 0.3, "fp8": 0.15}.get(comp, 0.04)
        for a, r in zip(grads, ref):
            assert torch.allclose(a, r, atol=tol * float(r.abs().max()), rtol=0), comp




def _body_errors(rank, W):
    from pyperf.comm import quantized_all_reduce
    x = torch.randn(100)
    with pytest.raises(ValueError, match="fmt"):
        quantized_all_reduce(x, "int3")
    with pytest.raises(ValueError, match="block_size"):
        quantized_all_reduce(x, "int8", block_size=100)
    with pytest.raises(ValueError, match="op"):
        quantized_all_reduce(x, "int8", op="max")
    with pytest.raises(TypeError, match="floating"):
        quantized_all_reduce(torch.arange(10), "int8")
    with pytest.raises(ValueError, match="residual"):
        quantized_all_reduce(x, "int8", residual=torch.zeros(100))
    with pytest.raises(ValueError, match="server_residual"):
        quantized_all_reduce(x, "int8", block_size=64, residual=torch.zeros(128), server_residual=torch.zeros(5))
    with pytest.raises(ValueError, match="out"):
        quantized_all_reduce(x, "int8", out=torch.empty(99))
    # still in step with the other rank after the errors
    y = quantized_all_reduce(x, "int8")
    assert y.shape == x.shape


def _run_all(rank, W, bodies):
    for b in bodies:
        b(rank, W)
    gc.collect()     # free what holds the process group on this thread, before the harness destroys it


# One process group per world size (spawning ranks is most of the cost on a small CI machine).
def test_world_size_1_exact_copy():
    run_ranks(_run_all, 1, [_body_exact])


def test_world_size_2_bound_async_ef_bucketer_errors():
    run_ranks(_run_all, 2, [_body_exact, _body_ef, _body_bucketer, _body_errors])


def test_world_size_3_bound_async_nonfinite():
    run_ranks(_run_all, 3, [_body_exact, _body_nonfinite, _body_bucketer])


def test_world_size_4_bound_async():
    run_ranks(_run_all, 4, [_body_exact])
