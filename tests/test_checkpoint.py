"""pyperf.checkpoint: every policy gives the loss and gradients of no checkpointing (bitwise on CPU, dropout
included), saves what it claims (measured with saved_tensors_hooks), the memory budget is met, DDP and
torch.compile work on checkpointed blocks, and bad input is refused with a clear message."""
import copy
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from _dist import run_ranks
from conftest import dev, devices
from pyperf.checkpoint import (CheckpointedBlock, SavedTensorMeter, checkpoint_blocks, checkpoint_plan,
                               plan_budget, BlockStats)
from pyperf.models import GPT, BlockStack, GPTConfig, fused_layers_available

CFG = dict(vocab=256, d_model=48, n_heads=4, n_layers=3, seq_len=24, dropout=0.1)


def _model(fused=False, device="cpu", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CFG, **kw, "fused": fused})).to(dev(device))


def _batch(B=3, T=24, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    idx, tgt = torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)
    return idx.to(dev(device)), tgt.to(dev(device))


def _same(a, b, device):
    # CPU: bitwise. CUDA: attention backward kernels may accumulate in a different order run to run
    return torch.equal(a, b) if device == "cpu" else torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def _grads(model):
    # the wrapper adds ".module." to parameter names; compare under the unwrapped names
    return {n.replace(".module.", "."): p.grad.clone() for n, p in model.named_parameters()}


def _step(model, idx, tgt, seed=123):
    torch.manual_seed(seed)                     # the same dropout masks for every variant
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        loss = model(idx, tgt)
    loss.backward()
    return loss.detach(), _grads(model), meter.bytes


def _keep_mm(ctx, op, *args, **kwargs):
    return op in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)


POLICIES = ["none", "full", "selective", "callable", "oplist"]


def _policy(name):
    if name == "callable":
        return _keep_mm
    if name == "oplist":
        return [torch.ops.aten.addmm.default, torch.ops.aten.bmm.default]
    return name


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_same_loss_and_grads_bitwise(policy, fused, device):
    if fused and not fused_layers_available():
        pytest.skip("pyperf.nn fused layers are not in this build")
    ref_model = _model(fused, device)
    idx, tgt = _batch(device=dev(device))
    ref = _step(ref_model, idx, tgt)
    model = copy.deepcopy(ref_model)
    model.zero_grad(set_to_none=True)
    plan = checkpoint_blocks(model, _policy(policy))
    assert len(plan.names) == CFG["n_layers"]
    assert all(isinstance(b, CheckpointedBlock) for b in model.blocks)
    got = _step(model, idx, tgt)
    assert _same(got[0], ref[0], device)
    assert got[1].keys() == ref[1].keys()
    for k in ref[1]:
        assert _same(got[1][k], ref[1][k], device), k
    # a second step: nothing left over from the first (caches, RNG)
    model.zero_grad(set_to_none=True)
    ref_model.zero_grad(set_to_none=True)
    assert _same(_step(model, idx, tgt, seed=7)[0], _step(ref_model, idx, tgt, seed=7)[0], device)


class _Recorder(nn.Module):
    """Dropout between two linears; records every forward's output, so a test sees the recompute."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)
        self.outs = []

    def forward(self, x):
        h = F.dropout(F.gelu(self.a(x)), 0.5, self.training)
        self.outs.append(h.detach().clone())
        return self.b(h)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("policy", ["full", "selective"])
def test_dropout_recompute_is_bit_identical(policy, device):
    torch.manual_seed(0)
    block = CheckpointedBlock(_Recorder().to(dev(device)), policy)
    x = torch.randn(5, 16, device=dev(device), requires_grad=True)
    torch.manual_seed(3)
    block(x).sum().backward()
    assert len(block.module.outs) == 2                      # the forward and its recompute
    assert torch.equal(block.module.outs[0], block.module.outs[1])
    assert (block.module.outs[0] == 0).any()                # dropout did drop
    # and the RNG stream after the step is what it would be without checkpointing
    after_ckpt = torch.rand(4, device=dev(device))
    torch.manual_seed(3)
    block.module(x)
    assert torch.equal(torch.rand(4, device=dev(device)), after_ckpt)


@pytest.mark.parametrize("device", ["cuda"])   # torch.cuda.memory_allocated: a GPU only
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_memory_follows_the_meter(device, fused):
    """On the GPU, what the forward leaves allocated for backward orders none > selective > full and matches what
    SavedTensorMeter counts (the planner's measure)."""
    if fused and not fused_layers_available():
        pytest.skip("pyperf.nn fused layers not in this build")
    torch.manual_seed(0)
    cfg = GPTConfig(d_model=256, n_heads=4, n_layers=4, seq_len=256, dropout=0.1, fused=fused)
    stack = BlockStack(cfg).to(dev(device))
    x = torch.randn(4, 256, 256, device=dev(device), requires_grad=True)
    checkpoint_blocks(stack, "none")
    held = {}
    for policy in ("none", "selective", "full"):
        checkpoint_blocks(stack, policy)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with SavedTensorMeter(exclude=stack.parameters()) as meter:
            y = stack(x)
        torch.cuda.synchronize()
        # what the forward holds = saved tensors + y itself - x (counted by the meter, allocated before)
        alloc = torch.cuda.memory_allocated() - base + x.untyped_storage().nbytes() - y.untyped_storage().nbytes()
        held[policy] = (alloc, meter.bytes)
        y.sum().backward()
        del y
    assert held["full"][0] < held["selective"][0] < held["none"][0], held
    for policy, (alloc, metered) in held.items():
        assert abs(alloc - metered) <= 0.1 * held["none"][1], (policy, alloc, metered)


def _saved(model, policy, idx):
    m = copy.deepcopy(model)
    checkpoint_blocks(m, policy)
    with SavedTensorMeter(exclude=m.parameters()) as meter:
        loss = m(idx[0], idx[1])
    del loss
    return meter.bytes


def test_selective_saves_less_than_none_more_than_full():
    model = _model(dropout=0.0)
    batch = _batch()
    none, sel, full = (_saved(model, p, batch) for p in ("none", "selective", "full"))
    assert full < sel < none, (full, sel, none)
    # full keeps only each block's input (B*T*d fp32) beyond what the embedding and head save
    B, T = batch[0].shape
    assert none - full >= CFG["n_layers"] * 4 * B * T * CFG["d_model"]


def test_meter_counts_storages_once_and_skips_params():
    lin = nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedTensorMeter(exclude=lin.parameters()) as m:
        y = lin(x)
        z = (x * x).sum() + y.sum()
    del z
    assert m.bytes == x.untyped_storage().nbytes()          # x saved by addmm and mul: counted once
    assert m.count == 1


def _stack(n=4, d=32, T=16, B=2):
    torch.manual_seed(0)
    cfg = GPTConfig(d_model=d, n_heads=4, n_layers=n, seq_len=T, dropout=0.0)
    return BlockStack(cfg), torch.randn(B, T, d, requires_grad=True)


def _stack_bytes(stack, x):
    with SavedTensorMeter(exclude=stack.parameters()) as m:
        y = stack(x)
    del y
    return m.bytes


@pytest.mark.parametrize("frac", [0.85, 0.5, 0.2])
def test_memory_budget_fits_in_measured_bytes(frac):
    stack, x = _stack()
    unchecked = _stack_bytes(stack, x)
    budget = int(frac * unchecked)
    ref = copy.deepcopy(stack)
    plan = checkpoint_blocks(stack, memory_budget=budget, example_inputs=(x,), reps=1)
    assert plan.saved_bytes <= budget
    assert any(p != "none" for p in plan.policies)
    assert _stack_bytes(stack, x) <= budget                 # measured on the real forward, not only the plan
    assert checkpoint_plan(stack).policies == plan.policies
    for s in plan.stats:
        assert s.saved["full"] < s.saved["selective"] < s.saved["none"]
        assert 0 <= s.recompute_s["selective"] <= s.recompute_s["full"]
    # and the gradients are still those of the unchecked stack
    stack(x).square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    ref(x).square().sum().backward()
    assert torch.equal(gx, x.grad)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(stack.parameters(), ref.parameters()))


def test_memory_budget_loose_keeps_blocks_unchecked_and_percent_works():
    stack, x = _stack(n=2)
    plan = checkpoint_blocks(stack, memory_budget=10 * 2**30, example_inputs=(x,), reps=1)
    assert plan.policies == ["none", "none"]
    plan = checkpoint_blocks(stack, memory_budget="30%", example_inputs=(x,), reps=1, policy="full")
    assert plan.policies == ["full", "full"]                 # one unchecked block alone is ~50% of the total
    assert plan.budget == pytest.approx(0.3 * sum(s.saved["none"] for s in plan.stats))
    assert plan.saved_bytes <= plan.budget


def test_memory_budget_greedy_prefers_cheap_recompute():
    cheap = BlockStats("cheap", 1.0, {"none": 100, "full": 10}, {"none": 0.0, "full": 0.1})
    dear = BlockStats("dear", 1.0, {"none": 100, "full": 10}, {"none": 0.0, "full": 1.0})
    assert plan_budget([dear, cheap], ["full"], 120) == ["none", "full"]
    assert plan_budget([dear, cheap], ["full"], 200) == ["none", "none"]
    # the last move takes the cheapest way to the budget, not the best ratio
    sel = {"none": 0.0, "selective": 0.1, "full": 1.0}
    a = BlockStats("a", 1.0, {"none": 100, "selective": 80, "full": 10}, sel)
    b = BlockStats("b", 1.0, {"none": 100, "selective": 80, "full": 10}, sel)
    assert plan_budget([a, b], ["selective", "full"], 185) == ["selective", "none"]
    assert plan_budget([a, b], ["selective", "full"], 160) == ["selective", "selective"]
    assert sorted(plan_budget([a, b], ["selective", "full"], 90)) == ["full", "selective"]
    assert plan_budget([dear, cheap], ["full"], 20) == ["full", "full"]
    with pytest.raises(ValueError, match="cannot be met"):
        plan_budget([dear, cheap], ["full"], 19)


def test_memory_budget_too_small_raises_and_leaves_model_alone():
    stack, x = _stack(n=2)
    keys = list(stack.state_dict())
    with pytest.raises(ValueError, match="cannot be met"):
        checkpoint_blocks(stack, memory_budget=0, example_inputs=(x,), reps=1)
    assert not any(isinstance(b, CheckpointedBlock) for b in stack.blocks)
    assert list(stack.state_dict()) == keys


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="policy must be one of"):
        checkpoint_blocks(model, "everything")
    with pytest.raises(ValueError, match="policy must be one of"):
        CheckpointedBlock(nn.Linear(2, 2), "sometimes")
    with pytest.raises(TypeError, match="policy must be"):
        CheckpointedBlock(nn.Linear(2, 2), 3)
    with pytest.raises(TypeError, match="OpOverloads"):
        CheckpointedBlock(nn.Linear(2, 2), [torch.ops.aten.mm])
    with pytest.raises(ValueError, match=">= 0 bytes"):
        checkpoint_blocks(model, memory_budget=-1, example_inputs=_batch())
    with pytest.raises(ValueError, match=">= 0 bytes"):
        checkpoint_blocks(model, memory_budget=math.nan, example_inputs=_batch())
    with pytest.raises(ValueError, match="percentage"):
        checkpoint_blocks(model, memory_budget="lots", example_inputs=_batch())
    with pytest.raises(TypeError, match="memory_budget must be"):
        checkpoint_blocks(model, memory_budget=[1], example_inputs=_batch())
    with pytest.raises(ValueError, match="example_inputs"):
        checkpoint_blocks(model, memory_budget=1 << 20)
    with pytest.raises(ValueError, match="needs memory_budget"):
        checkpoint_blocks(model, ["full", "selective"])
    with pytest.raises(ValueError, match="not submodules"):
        checkpoint_blocks(model, blocks=["blocks.0", "nope"])
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        checkpoint_blocks(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="wraps an nn.Module"):
        CheckpointedBlock(lambda x: x)
    with pytest.raises(TypeError, match="already a CheckpointedBlock"):
        CheckpointedBlock(CheckpointedBlock(nn.Linear(2, 2)))
    assert not any(isinstance(m, CheckpointedBlock) for m in model.modules())   # nothing was wrapped

    bad = CheckpointedBlock(nn.Linear(4, 4), lambda ctx, op, *a, **k: "yes")
    with pytest.raises(TypeError, match="returned 'yes'"):
        bad(torch.randn(2, 4, requires_grad=True))


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_a_raising_block_leaves_no_checkpoint_state_behind(policy):
    """The exception is kept alive (as a caller or pytest's report would keep it): torch 2.11's checkpoint then kept
    its saved-tensors hooks and selective-checkpoint dispatch mode active, and every later op ran under them."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    class Raises(nn.Module):
        def forward(self, x, fail=False):
            if fail:
                raise ValueError("from the block")
            return x.sin()

    block = CheckpointedBlock(Raises(), policy)
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="from the block") as kept:
        block(x, fail=True)
    assert kept.value is not None
    assert _get_current_dispatch_mode_stack() == []
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None
    block(x).sum().backward()                      # and the block still works
    torch.testing.assert_close(x.grad, x.detach().cos())


def test_block_selection_state_dict_and_rewrap():
    from pyperf.models.gpt import Block, Attention
    model = _model()
    keys = list(model.state_dict())
    sd = copy.deepcopy(model.state_dict())
    plan = checkpoint_blocks(model, "selective", blocks=Block)
    assert plan.names == ["blocks.0", "blocks.1", "blocks.2"]
    assert list(model.state_dict()) == keys                 # no "module." in the keys
    model.load_state_dict(sd)                                # and unwrapped checkpoints load
    plan = checkpoint_blocks(model, "full")                  # re-applying changes the policy, no double wrap
    assert plan.policies == ["full"] * 3
    assert not isinstance(model.blocks[0].module, CheckpointedBlock)
    m2 = _model()
    assert checkpoint_blocks(m2, blocks=lambda n, m: isinstance(m, Attention)).names == [
        "blocks.%d.attn" % i for i in range(3)]
    assert checkpoint_blocks(_model(), blocks=["blocks.1"]).names == ["blocks.1"]
    plain = _model()
    plain.load_state_dict(model.state_dict())
    assert model.blocks[0].attn is model.blocks[0].module.attn          # attributes fall through the wrapper
    with pytest.raises(AttributeError):
        model.blocks[0].nonexistent


def test_no_grad_and_kwargs_pass_through():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

    blk = CheckpointedBlock(KW(), "full")
    x = torch.randn(3, 4, requires_grad=True)
    with torch.no_grad():
        y = blk(x, scale=2.0)
    assert torch.equal(y, blk.module(x, scale=2.0).detach())
    blk(x, scale=3.0).sum().backward()
    assert torch.allclose(x.grad, 3.0 * blk.module.lin.weight.sum(0).expand(3, 4))


def _ddp_body(rank, world_size, fused=False):
    from torch.nn.parallel import DistributedDataParallel as DDP
    idx, tgt = _batch(B=4)
    shard = slice(rank * 2, rank * 2 + 2)
    plans = [("full", None), ("selective", None)] + ([] if fused else [(None, "40%")])
    for policy, budget in plans:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**CFG, "dropout": 0.0, "fused": fused}))
        ref = copy.deepcopy(model)
        if budget is not None:
            plan = checkpoint_blocks(model, memory_budget=budget, example_inputs=(idx[:1], tgt[:1]), reps=1)
            assert plan.saved_bytes <= plan.budget
        else:
            checkpoint_blocks(model, policy)
        ddp = DDP(model, find_unused_parameters=False)
        for _ in range(2):                                   # a second step: buckets rebuilt, hooks re-armed
            ddp.zero_grad(set_to_none=True)
            ddp(idx[shard], tgt[shard]).backward()
        ref(idx, tgt).backward()                            # mean loss over the batch = mean of the shard means
        got = _grads(ddp.module)
        for n, p in ref.named_parameters():
            assert torch.allclose(got[n], p.grad, rtol=1e-5, atol=1e-6), (policy, budget, n)


@pytest.mark.slow
def test_ddp_two_ranks():
    """find_unused_parameters=False, full / selective / budget plans: no "marked ready twice", the gradients of
    the full batch."""
    run_ranks(_ddp_body, 2)


@pytest.mark.slow
def test_ddp_two_ranks_fused():
    """The same with pyperf's fused layers (their C++ autograd under DDP's hooks and checkpoint's recompute)."""
    if not fused_layers_available():
        pytest.skip("pyperf.nn fused layers not in this build")
    run_ranks(_ddp_body, 2, True)


needs_fused = pytest.mark.skipif(not fused_layers_available(), reason="pyperf.nn fused layers not in this build")


@needs_fused
def test_policies_see_pyperf_ops():
    """Selective-checkpoint policies see pyperf's ops (they go through TORCH_LIBRARY); selective recomputes them."""
    from pyperf.checkpoint import selective_policy, SAVE_OPS
    seen = []
    keep = selective_policy(SAVE_OPS)

    def spy(ctx, op, *args, **kwargs):
        seen.append((str(op), ctx.is_recompute, keep(ctx, op, *args, **kwargs)))
        return keep(ctx, op, *args, **kwargs)

    model = _model(fused=True)
    checkpoint_blocks(model, spy)
    model(*_batch()).backward()
    pyperf_ops = {name for name, _, _ in seen if name.startswith("pyperf.")}
    assert {"pyperf.add_layer_norm.default", "pyperf.bias_gelu.default",
            "pyperf.bias_dropout_residual.default"} <= pyperf_ops, pyperf_ops
    assert all(p == CheckpointPolicy.PREFER_RECOMPUTE for name, _, p in seen if name.startswith("pyperf."))


@needs_fused
def test_fused_model_matches_torch_model():
    torch.manual_seed(0)
    ref = _model(fused=False, dropout=0.0)
    fused = _model(fused=True, dropout=0.0)
    fused.load_state_dict(ref.state_dict())                  # same parameter names
    checkpoint_blocks(fused, "selective")
    idx, tgt = _batch()
    a, b = ref(idx, tgt), fused(idx, tgt)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    a.backward()
    b.backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), fused.named_parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), n


def _compiled_matches_eager(policy, fused, backend, dropout):
    model = _model(fused, dropout=dropout, n_layers=2)
    idx, tgt = _batch()
    ref = _step(model, idx, tgt)
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    checkpoint_blocks(m, policy)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=backend, fullgraph=(dropout == 0.0 or not fused))
    torch.manual_seed(123)                                   # as _step: the same dropout draws
    loss = compiled(idx, tgt)
    loss.backward()
    assert torch.allclose(loss, ref[0], rtol=1e-5, atol=1e-6)
    got = _grads(m)
    for k in ref[1]:
        assert torch.allclose(got[k], ref[1][k], rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("policy,fused", [("full", False), ("selective", False), ("selective", True)])
def test_torch_compile(policy, fused):
    """aot_eager: dynamo + AOTAutograd + checkpoint's compile path (tag_activation_checkpoint), without inductor's
    code generation (minutes on a CPU CI). Dropout on: pyperf's draws its (seed, offset) eagerly (a graph break),
    torch's is traced."""
    if fused and not fused_layers_available():
        pytest.skip("pyperf.nn fused layers not in this build")
    _compiled_matches_eager(policy, fused, "aot_eager", 0.1)


@pytest.mark.skipif(not os.environ.get("PYPERF_SLOW_TESTS"), reason="inductor compiles for ~1 min on CPU; "
                    "set PYPERF_SLOW_TESTS=1")
@pytest.mark.parametrize("policy,fused", [("full", False), ("selective", False), ("full", True), ("selective", True)])
def test_torch_compile_inductor(policy, fused):
    if fused and not fused_layers_available():
        pytest.skip("pyperf.nn fused layers not in this build")
    _compiled_matches_eager(policy, fused, "inductor", 0.0)


def test_benchmark_impls_agree(monkeypatch):
    """benchmarks/bench_checkpoint.py: every impl of every case runs, measures, and computes the same gradients."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "bench_checkpoint.py")
    spec = importlib.util.spec_from_file_location("bench_checkpoint", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "CPU", dict(d_model=32, n_heads=2, n_layers=3, seq_len=16, batch=2))
    cases = bench.cases("cpu", None, quick=True)
    assert len(cases) == (2 if fused_layers_available() else 1)
    for case in cases:
        inputs = case.setup()
        grads, saved = {}, {}
        for name, fn in case.impls.items():
            fn(inputs)
            grads[name] = inputs[0].grad.clone()
            saved[name] = case.measure(name, inputs)["saved_mib"]
        for name, g in grads.items():
            assert torch.allclose(g, grads["torch none"], rtol=1e-5, atol=1e-6), (case.name, name)
        assert saved["pyperf full"] == saved["torch checkpoint full"] < saved["pyperf selective"] < saved["torch none"]
        assert saved["pyperf budget 50%"] <= 0.5 * saved["torch none"]
