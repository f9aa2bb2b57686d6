"""GradientBucketer on real Gloo ranks: the gradients equal DistributedDataParallel's on the same model and data."""
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from _dist import run_ranks
from torch.nn.parallel import DistributedDataParallel as DDP

import pyperf  # noqa: F401
from pyperf.comm import Compressor, GradientBucketer


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(12, 32)
        self.frozen = nn.Linear(32, 32)
        self.frozen.requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32), nn.LayerNorm(32))
        self.head = nn.Linear(32, 5)
        self.extra = nn.Linear(32, 5)       # used only on rank 0: no gradient on the other ranks
        self.never = nn.Linear(3, 3)        # used on no rank

    def forward(self, x, use_extra):
        h = self.body(self.frozen(self.emb(x)))
        y = self.head(h)
        return y + self.extra(h) if use_extra else y


def _data(rank, step, micro):
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + micro)
    return torch.randn(7, 12, generator=g)


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _run(model, step_fn, steps, micro):
    out = []
    for step in range(steps):
        for m in range(micro):
            step_fn(step, m, last=(m == micro - 1))
        out.append(_grads(model))
        model.zero_grad(set_to_none=True)
    return out


def _body(rank, world_size):
    torch.manual_seed(0)
    base = Net()
    steps, micro = 2, 3
    use_extra = rank == 0

    # the reference: DDP with find_unused_parameters (rank-dependent use of `extra`), no_sync for accumulation
    ddp_model = Net()
    ddp_model.load_state_dict(base.state_dict())
    ddp = DDP(ddp_model, find_unused_parameters=True, bucket_cap_mb=0.002)

    def ddp_step(step, m, last):
        ctx = ddp.no_sync() if not last else torch.enable_grad()
        with ctx:
            ddp(_data(rank, step, m), use_extra).square().mean().backward()

    want = _run(ddp_model, ddp_step, steps, micro)

    for compression, tol in (("none", dict(rtol=1.3e-6, atol=1e-7)), ("bf16", dict(rtol=2e-2, atol=2e-3)),
                             ("fp16", dict(rtol=2e-3, atol=2e-4))):
        model = Net()
        model.load_state_dict(base.state_dict())
        bucketer = GradientBucketer(model.parameters(), bucket_cap_mb=0.002, compression=compression)
        assert len(bucketer.buckets) > 3, "the test wants several buckets"
        assert all(p is not model.frozen.weight for b in bucketer.buckets for p in b.params)

        def step_fn(step, m, last):
            if not last:
                with bucketer.no_sync():
                    model(_data(rank, step, m), use_extra).square().mean().backward()
            else:
                model(_data(rank, step, m), use_extra).square().mean().backward()
                bucketer.wait()

        got = _run(model, step_fn, steps, micro)
        bucketer.remove()
        for s in range(steps):
            for name, w in want[s].items():
                g = got[s][name]
                if name.startswith("frozen"):
                    assert g is None, "requires_grad=False params are not touched"
                elif name.startswith("never"):
                    # policy: no gradient anywhere -> zeros (DDP leaves None for globally unused params)
                    assert w is None and torch.equal(g, torch.zeros_like(g))
                else:
                    assert g is not None, name
                    torch.testing.assert_close(g, w, **tol, msg=lambda m: "%s %s step %d: %s"
                                               % (compression, name, s, m))
    # all ranks agree bit for bit (the averages are computed identically everywhere)
    flat = torch.cat([g.reshape(-1) for g in got[-1].values() if g is not None])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(gathered[0], t) for t in gathered)
    if world_size == 2:  # one process launch less
        _body_misc(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_matches_ddp(world_size):
    """2 ranks also run _body_misc: bf16 parameters, and misuse (a second synced backward before wait())."""
    run_ranks(_body, world_size)


def _body_misc(rank, world_size):
    # a bf16 model: buckets are grouped by dtype, gradients come back in bf16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).to(torch.bfloat16)
    model[1].float()
    b = GradientBucketer(model.parameters())
    assert {bk.dtype for bk in b.buckets} == {torch.bfloat16, torch.float32}
    x = torch.full((2, 8), float(rank + 1), dtype=torch.bfloat16)
    model[1](model[0](x).float()).sum().backward()
    local = [p.grad.clone() for p in model.parameters()]
    # every gradient arrived: every bucket's all-reduce started during backward (overlap), before wait()
    assert all(bk.handle is not None for bk in b.buckets)
    b.wait()
    for p, g in zip(model.parameters(), local):
        want = g.float().clone()
        dist.all_reduce(want)
        torch.testing.assert_close(p.grad.float(), (want / world_size), rtol=1e-2, atol=1e-2)
        assert p.grad.dtype == p.dtype
    # a second synced backward without wait() is an error that says what to do
    model.zero_grad()
    model[1](model[0](x).float()).sum().backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        model[1](model[0](x).float()).sum().backward()
    b.wait()
    b.remove()


def test_single_process_and_options():
    model = nn.Linear(4, 3)
    b = GradientBucketer(model.parameters())          # no process group: world size 1
    model(torch.randn(2, 4)).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    b.wait()
    assert all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    b.remove()
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()         # hooks removed: nothing happens
    assert "1 buckets" in repr(b) or "buckets" in repr(b)
    with pytest.raises(ValueError, match="compression: expected one of"):
        GradientBucketer(model.parameters(), compression="zip")
    GradientBucketer(model.parameters(), compression="int8").remove()   # registered by pyperf.comm.quantized
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        GradientBucketer(model.parameters(), bucket_cap_mb=0)

    class Custom(Compressor):
        name, align = "custom", 4
        calls = 0

        def all_reduce_async(self, flat, group, bucket_index):
            Custom.calls += 1
            assert flat.numel() % 4 == 0
            return super().all_reduce_async(flat, group, bucket_index)

    b = GradientBucketer(model.parameters(), compression=Custom())
    model.zero_grad()
    model(torch.randn(2, 4)).sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    b.wait()
    assert Custom.calls == 1 and all(torch.equal(p.grad, w) for p, w in zip(model.parameters(), want))
    b.remove()
