"""Fused activations: bias+GeLU, bias+dropout+residual (Philox mask), SwiGLU/GeGLU: forward and gradients against
pyperf/_reference.py, gradcheck, opcheck, the dropout mask contract, modules and input errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import dev, devices, gpu_devices, kernels, lib

import pyperf  # noqa: F401
from pyperf import _reference as R
from pyperf import nn as pnn
from pyperf import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# One rounding of a float32 result to the dtype, plus the float32 math differences (polynomial exp/erf).
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3),
       torch.float64: (1e-10, 1e-10)}
# 0 in every dim (a last dim of 0 once divided by zero in the CUDA launch plan), 1, primes, odd sizes, not a multiple
# of any vector width, more than one column block (4096) and several row blocks (the bias-gradient partials). On the
# CUDA kernels (GPU or emulated) these reach the vector path (4, 64) and (17, 4100) in fp32, the scalar one for the
# rest, several column blocks (4100) and several row lanes with a bias gradient (17 rows).
SHAPES = [(0, 8), (8, 0), (0, 0), (1, 1), (3, 7), (4, 64), (2, 3, 129), (5, 1031), (17, 4100)]
APPROX = ["tanh", "none"]
GATED = ["silu", "gelu", "gelu_tanh"]
GEN = torch.Generator().manual_seed(1234)


def rand(shape, dtype, device, scale=2.0):
    return (torch.randn(shape, generator=GEN, dtype=torch.float64) * scale).to(dtype=dtype, device=dev(device))


def close(actual, expected, dtype, scale=1.0, msg=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol, msg=msg or None)


def poisoned(fn, *like):
    """Runs fn after freeing nan-filled blocks of the sizes its outputs will have, so an allocator that hands the
    same memory back (CUDA's caching allocator always does; glibc usually does) exposes any unwritten element."""
    blocks = [torch.full_like(t, float("nan")) for t in like]
    del blocks
    return fn()


def ref_grads(fn, inputs, grad):
    """Reference output and input gradients, computed in float64 on upcast inputs."""
    xs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    out = fn(*xs)
    out.backward(grad.double())
    return out, [None if t is None else t.grad for t in xs]


# ---- bias + GeLU -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", APPROX)
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu(device, dtype, shape, approximate, with_bias):
    x = rand(shape, dtype, device).requires_grad_()
    b = rand(shape[-1:], dtype, device).requires_grad_() if with_bias else None
    y = poisoned(lambda: ops.bias_gelu(x, b, approximate), x)
    g = rand(shape, dtype, device)
    y.backward(g)
    ref, (rgx, rgb) = ref_grads(lambda x, b: R.bias_gelu(x, b, approximate), [x, b], g)
    close(y, ref, dtype)
    close(x.grad, rgx, dtype)
    if with_bias:
        rows = max(1, x.numel() // max(1, shape[-1]))
        close(b.grad, rgb, dtype, scale=math.sqrt(rows) * 4)


# ---- bias + dropout + residual -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_dropout_residual(device, dtype, shape, p, with_bias):
    seed, offset = 0x1234_5678_9ABC_DEF0 + shape[-1], 17
    x = rand(shape, dtype, device).requires_grad_()
    r = rand(shape, dtype, device).requires_grad_()
    b = rand(shape[-1:], dtype, device).requires_grad_() if with_bias else None
    y = poisoned(lambda: ops.bias_dropout_residual(x, b, r, p, seed, offset), x)
    g = rand(shape, dtype, device)
    y.backward(g)
    ref, (rgx, rgb, rgr) = ref_grads(lambda x, b, r: R.bias_dropout_residual(x, b, r, p, seed, offset), [x, b, r], g)
    close(y, ref, dtype, scale=2.0)
    close(x.grad, rgx, dtype, scale=2.0)
    assert torch.equal(r.grad, g)
    if with_bias:
        rows = max(1, x.numel() // max(1, shape[-1]))
        close(b.grad, rgb, dtype, scale=math.sqrt(rows) * 8)


def _mask(shape, p, seed, offset, device="cpu"):
    """The mask*scale a call applies, read off the forward (x = 1, no bias, residual = 0)."""
    ones = torch.ones(shape, device=dev(device))
    return ops.bias_dropout_residual(ones, None, torch.zeros_like(ones), p, seed, offset)


@pytest.mark.parametrize("device", devices())
def test_dropout_mask_matches_reference_philox_bit_for_bit(device):
    for seed, offset, p in [(0, 0, 0.5), (2**64 - 1, 2**63 + 5, 0.1), (-7, 3, 0.9), (12345, 2**40, 0.3)]:
        m = _mask((7, 131), p, seed, offset, device)
        assert torch.equal(m.cpu(), R.dropout_scale(p, seed, offset, (7, 131)))


@pytest.mark.cpu_vs_cuda
@pytest.mark.parametrize("device", gpu_devices())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
def test_dropout_same_bits_on_cpu_and_device(device, dtype):
    """The documented contract: the same (seed, offset) gives the same mask on CPU and CUDA, and the same output
    and grad_x bits (the CUDA kernel rounds the product before the add, as the CPU does: no FMA). Vectorized and
    scalar CUDA paths: hidden a multiple of the vector width or not."""
    d = dev(device)
    for shape in [(5, 1031), (3, 4096), (2, 3, 136)]:
        for p in (0.3, 0.0):
            x, r, g = (rand(shape, dtype, "cpu") for _ in range(3))
            b = rand(shape[-1:], dtype, "cpu")
            want = ops.bias_dropout_residual(x, b, r, p, 77, 9)
            want_gx, want_gb = torch.ops.pyperf.bias_dropout_residual_backward(g, p, 77, 9, True)
            with kernels(device):
                got = ops.bias_dropout_residual(x.to(d, copy=True), b.to(d, copy=True), r.to(d, copy=True), p, 77, 9)
                gx, gb = lib(device).bias_dropout_residual_backward(g.to(d, copy=True), p, 77, 9, True)
            assert torch.equal(got.cpu(), want), (shape, p)
            assert torch.equal(gx.cpu(), want_gx), (shape, p)
            # the bias gradient sums rows in another order on CUDA: equal within rounding, not bits
            close(gb.cpu(), want_gb, dtype, scale=shape[0])


@pytest.mark.parametrize("device", devices())
def test_bias_grads_are_deterministic(device):
    x = rand((300, 520), torch.float32, device)
    g = rand((300, 520), torch.float32, device)
    b = rand((520,), torch.float32, device)
    L = lib(device)
    for _ in range(2):
        runs = [L.bias_gelu_backward(g, x, b, "tanh", True)[1] for _ in range(3)]
        runs += [L.bias_dropout_residual_backward(g, 0.2, 3, 4, True)[1] for _ in range(3)]
        assert all(torch.equal(runs[i], runs[0]) for i in range(3))
        assert all(torch.equal(runs[i], runs[3]) for i in range(3, 6))


@pytest.mark.parametrize("device", devices())
def test_dropout_same_mask_in_forward_and_backward(device):
    x = torch.ones(9, 257, device=dev(device), requires_grad=True)
    b = torch.zeros(257, device=dev(device), requires_grad=True)
    r = torch.zeros(9, 257, device=dev(device))
    y = ops.bias_dropout_residual(x, b, r, 0.4, 99, 5)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, y.detach())           # grad_x = mask * scale, the forward's mask
    torch.testing.assert_close(b.grad, y.detach().sum(0), atol=1e-5, rtol=1e-6)
    assert not torch.equal(_mask((9, 257), 0.4, 99, 6, device), y)   # another offset, another mask
    assert not torch.equal(_mask((9, 257), 0.4, 98, 5, device), y)   # another seed, another mask


def test_dropout_never_touches_global_rng_and_is_thread_count_independent():
    state = torch.get_rng_state()
    x = rand((65, 1031), torch.float32, "cpu").requires_grad_()
    b = rand((1031,), torch.float32, "cpu").requires_grad_()
    r = rand((65, 1031), torch.float32, "cpu")
    g = rand((65, 1031), torch.float32, "cpu")
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x.grad = b.grad = None
            y = ops.bias_dropout_residual(x, b, r, 0.3, 42, 7)
            y.backward(g)
            outs.append((y.detach(), x.grad.clone(), b.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch.get_rng_state(), state)
    for o in outs[1:]:
        for a, e in zip(o, outs[0]):
            assert torch.equal(a, e)   # bit for bit, the bias gradient included (deterministic reduction)


def test_dropout_recompute_under_checkpoint_reproduces_the_mask():
    """Non-reentrant checkpoint recomputes the forward in backward: the recomputed mask must equal the original,
    so the gradients equal those of the run without checkpointing."""
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(64, 96), torch.nn.Linear(96, 32)
    drop = pnn.BiasDropoutResidual(96, p=0.5)
    x = torch.randn(13, 64)

    def block(x):
        h = lin1(x)
        return lin2(drop(h, h.sin()))   # lin2 saves the dropout output: recompute must rebuild it exactly

    def grads(use_ckpt, **kw):
        for m in (lin1, lin2, drop):
            m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kw) if use_ckpt else block(x)
        out.square().sum().backward()
        return [p.grad.clone() for p in (*lin1.parameters(), *lin2.parameters(), drop.bias)]

    plain = grads(False)
    for a, e in zip(grads(True), plain):
        assert torch.equal(a, e)

    # Explicit (seed, offset): no generator involved, so even preserve_rng_state=False recomputes the same mask.
    def block_seeded(x):
        h = lin1(x)
        return lin2(ops.bias_dropout_residual(h, drop.bias, h.sin(), 0.5, 7, 11))

    def grads_seeded(use_ckpt):
        for m in (lin1, lin2, drop):
            m.zero_grad(set_to_none=True)
        state = torch.get_rng_state()
        out = (torch.utils.checkpoint.checkpoint(block_seeded, x, use_reentrant=False, preserve_rng_state=False)
               if use_ckpt else block_seeded(x))
        out.square().sum().backward()
        assert torch.equal(torch.get_rng_state(), state)
        return [p.grad.clone() for p in (*lin1.parameters(), *lin2.parameters(), drop.bias)]

    for a, e in zip(grads_seeded(True), grads_seeded(False)):
        assert torch.equal(a, e)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(device, p):
    m = _mask((256, 1000), p, 2024, 3, device)
    keep = (m != 0).double().mean().item()
    assert abs(keep - (1 - p)) < 0.01   # 256k draws: std ~ 0.001
    assert torch.all((m == 0) | (m == torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))).item()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_p0_eval_and_p1_exact(device, dtype):
    x, r = rand((6, 77), dtype, device), rand((6, 77), dtype, device)
    b = rand((77,), dtype, device)
    exact = (r.float() + (x.float() + b.float())).to(dtype)
    assert torch.equal(ops.bias_dropout_residual(x, b, r, 0.0, 1, 2), exact)
    assert torch.equal(ops.bias_dropout_residual(x, b, r, 0.7, 1, 2, training=False), exact)
    assert torch.equal(ops.bias_dropout_residual(x, b, r, 1.0, 1, 2), r)
    # module in eval mode: the identity path, and no draw from the generator
    mod = pnn.BiasDropoutResidual(77, p=0.5).to(device=dev(device), dtype=dtype).eval()
    with torch.no_grad():
        mod.bias.copy_(b)
    state = torch.get_rng_state()
    assert torch.equal(mod(x, r), exact)
    assert torch.equal(torch.get_rng_state(), state)
    # p == 1: every gradient but the residual's is zero
    xg = x.clone().requires_grad_()
    bg = b.clone().requires_grad_()
    ops.bias_dropout_residual(xg, bg, r, 1.0, 1, 2).sum().backward()
    assert torch.count_nonzero(xg.grad) == 0 and torch.count_nonzero(bg.grad) == 0


# ---- SwiGLU / GeGLU ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", GATED)
@pytest.mark.parametrize("split", [True, False])
def test_gated_act(device, dtype, shape, activation, split):
    if split:
        a = rand((*shape[:-1], 2 * shape[-1]), dtype, device).requires_grad_()
        b = None
    else:
        a = rand(shape, dtype, device).requires_grad_()
        b = rand(shape, dtype, device).requires_grad_()
    y = poisoned(lambda: ops.gated_act(a, b, activation), a)
    assert tuple(y.shape) == tuple(shape)
    g = rand(shape, dtype, device)
    y.backward(g)
    ref, rgrads = ref_grads(lambda a, b: R.gated_act(a, b, activation), [a, b], g)
    close(y, ref, dtype, scale=4.0)
    close(a.grad, rgrads[0], dtype, scale=4.0)
    if not split:
        close(b.grad, rgrads[1], dtype, scale=4.0)


def test_swiglu_geglu_wrappers():
    x = rand((3, 2, 40), torch.float32, "cpu")
    a, b = x.chunk(2, dim=-1)
    torch.testing.assert_close(ops.swiglu(x), F.silu(a) * b)
    torch.testing.assert_close(ops.swiglu(a.contiguous(), b.contiguous()), F.silu(a) * b)
    torch.testing.assert_close(ops.geglu(x, approximate="none"), F.gelu(a) * b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.geglu(a, b), F.gelu(a, approximate="tanh") * b, atol=1e-5, rtol=1e-5)
    # non-contiguous inputs are accepted (made contiguous inside)
    torch.testing.assert_close(ops.swiglu(a, b), F.silu(a) * b)


# ---- gradcheck (float64, CPU) --------------------------------------------------------------------------------

def _d(shape):
    return rand(shape, torch.float64, "cpu", scale=1.5).requires_grad_()


@pytest.mark.parametrize("approximate", APPROX)
def test_gradcheck_bias_gelu(approximate):
    x, b = _d((4, 13)), _d((13,))
    assert torch.autograd.gradcheck(lambda x, b: ops.bias_gelu(x, b, approximate), (x, b))
    assert torch.autograd.gradcheck(lambda x: ops.bias_gelu(x, None, approximate), (x,))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_bias_dropout_residual(p):
    x, b, r = _d((5, 11)), _d((11,)), _d((5, 11))
    assert torch.autograd.gradcheck(lambda x, b, r: ops.bias_dropout_residual(x, b, r, p, 3, 4), (x, b, r))
    assert torch.autograd.gradcheck(lambda x, r: ops.bias_dropout_residual(x, None, r, p, 3, 4), (x, r))


@pytest.mark.parametrize("activation", GATED)
def test_gradcheck_gated(activation):
    assert torch.autograd.gradcheck(lambda a: ops.gated_act(a, None, activation), (_d((3, 14)),))
    assert torch.autograd.gradcheck(lambda a, b: ops.gated_act(a, b, activation), (_d((3, 7)), _d((3, 7))))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(3, 7), (5, 64)])
def test_float64(device, shape):
    """float64 (the dtype of gradcheck) through every activation kernel and variant: forward, backward with and
    without a bias gradient, the gated ops split and not; vector (64: two doubles per 16 bytes) and scalar (7)."""
    x, g, r = (rand(shape, torch.float64, device) for _ in range(3))
    b = rand(shape[-1:], torch.float64, device)
    L = lib(device)
    tol = TOL[torch.float64]
    for ap in APPROX:
        y, ref = L.bias_gelu(x, b, ap), R.bias_gelu(x, b, ap)
        torch.testing.assert_close(y, ref, atol=tol[0], rtol=tol[1])
        want = ref_grads(lambda x_, b_: R.bias_gelu(x_, b_, ap), [x, b], g)[1]
        for bias_grad in (True, False):
            gx, gb = L.bias_gelu_backward(g, x, b, ap, bias_grad)
            torch.testing.assert_close(gx, want[0], atol=tol[0], rtol=tol[1])
            if bias_grad:
                torch.testing.assert_close(gb, want[1], atol=tol[0] * shape[0], rtol=tol[1])
    for bias_grad in (True, False):
        gx, gb = L.bias_dropout_residual_backward(g, 0.3, 5, 6, bias_grad)
        torch.testing.assert_close(gx, g * R.dropout_scale(0.3, 5, 6, shape).double().to(gx.device), atol=0, rtol=0)
    for act in GATED:
        for a, bb in ((torch.cat([x, r], -1), None), (x, r)):
            y = L.gated_act(a, bb, act)
            torch.testing.assert_close(y, R.gated_act(a, bb, act), atol=tol[0], rtol=tol[1])
            ga, gb = L.gated_act_backward(g, a, bb, act)
            want = ref_grads(lambda a_, b_=None: R.gated_act(a_, b_, act), [a] + ([bb] if bb is not None else []), g)
            torch.testing.assert_close(ga, want[1][0], atol=tol[0], rtol=tol[1])
            if bb is not None:
                torch.testing.assert_close(gb, want[1][1], atol=tol[0], rtol=tol[1])


# ---- opcheck -------------------------------------------------------------------------------------------------

def _opcheck_cases(device):
    x = rand((3, 5, 36), torch.float32, device)
    b = rand((36,), torch.float32, device)
    r = rand((3, 5, 36), torch.float32, device)
    g = rand((3, 5, 36), torch.float32, device)
    g18 = rand((3, 5, 18), torch.float32, device)
    req = lambda t: t.clone().requires_grad_()  # noqa: E731
    L = lib(device)
    return [
        (L.bias_gelu.default, (req(x), req(b), "tanh")),
        (L.bias_gelu.default, (x, None, "none")),
        (L.bias_gelu_backward.default, (g, x, b, "tanh", True)),
        (L.bias_gelu_backward.default, (g, x, None, "none", False)),
        (L.bias_dropout_residual.default, (req(x), req(b), req(r), 0.25, 5, 6)),
        (L.bias_dropout_residual.default, (x, None, r, 0.0, 0, 0)),
        (L.bias_dropout_residual_backward.default, (g, 0.25, 5, 6, True)),
        (L.bias_dropout_residual_backward.default, (g, 0.25, 5, 6, False)),
        (L.gated_act.default, (req(x), None, "silu")),
        (L.gated_act.default, (req(x), req(r), "gelu_tanh")),
        (L.gated_act_backward.default, (g18, x, None, "gelu")),
        (L.gated_act_backward.default, (g, x, r, "silu")),
    ]


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


# ---- non-finite values come through --------------------------------------------------------------------------

@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_propagates(device, dtype):
    """NaN-ness, not NaN bits: bf16/fp16 NaNs have backend-specific bits (docs/activation.md)."""
    x = rand((4, 9), dtype, device)
    x[0, 0], x[1, 3], x[2, 5] = float("nan"), float("inf"), float("-inf")
    bad = ~torch.isfinite(x)
    for ap in APPROX:
        y = ops.bias_gelu(x, None, ap)
        assert torch.isnan(y[0, 0]) and not torch.isfinite(y[1, 3])
        assert torch.isfinite(y[~bad]).all()
    r = torch.zeros_like(x)
    y = ops.bias_dropout_residual(x, None, r, 0.0, 0, 0)
    assert torch.equal(~torch.isfinite(y), bad)
    y = ops.bias_dropout_residual(x, None, r, 0.5, 0, 0)
    assert (~torch.isfinite(y))[bad].all()   # a dropped inf is nan (inf * 0), never hidden
    for act in GATED:
        y = ops.gated_act(x, torch.ones_like(x), act)
        assert torch.isnan(y[0, 0]) and torch.isfinite(y[~bad]).all()
    # a nan gradient reaches grad_x and grad_bias
    g = torch.ones_like(x)
    g[2, 2] = float("nan")
    gx, gb = lib(device).bias_gelu_backward(g, x.nan_to_num(), torch.zeros(9, dtype=dtype, device=dev(device)), "tanh",
                                            True)
    assert torch.isnan(gx[2, 2]) and torch.isnan(gb[2]) and torch.isfinite(gb[:2]).all()
    gx, gb = lib(device).bias_dropout_residual_backward(g, 0.0, 0, 0, True)
    assert torch.isnan(gx[2, 2]) and torch.isnan(gb[2])


# ---- modules -------------------------------------------------------------------------------------------------

def test_modules():
    x = rand((2, 5, 48), torch.float32, "cpu")
    m = pnn.BiasGeLU(48, approximate="none")
    with torch.no_grad():
        m.bias.normal_()
    torch.testing.assert_close(m(x), F.gelu(x + m.bias), atol=1e-5, rtol=1e-5)
    assert list(m.state_dict()) == ["bias"]
    assert pnn.BiasGeLU(48, bias=False).bias is None
    torch.testing.assert_close(pnn.BiasGeLU(48, bias=False)(x), F.gelu(x, approximate="tanh"), atol=1e-5, rtol=1e-5)

    d = pnn.BiasDropoutResidual(48, p=0.2)
    y = d(x, x)
    seed, offset = d.last_seed_offset
    assert torch.equal(y, ops.bias_dropout_residual(x, d.bias, x, 0.2, seed, offset))
    assert torch.equal(d(x, x, seed=5, offset=6), ops.bias_dropout_residual(x, d.bias, x, 0.2, 5, 6))
    g = torch.Generator().manual_seed(3)
    d2 = pnn.BiasDropoutResidual(48, p=0.2, generator=g)
    state = torch.get_rng_state()
    d2(x, x)
    assert torch.equal(torch.get_rng_state(), state)   # drew from its own generator

    torch.testing.assert_close(pnn.SwiGLU()(x), F.silu(x[..., :24]) * x[..., 24:])
    torch.testing.assert_close(pnn.GeGLU("none")(x, x), F.gelu(x) * x, atol=1e-5, rtol=1e-5)
    mlp = pnn.SwiGLUMLP(48, 40)
    h = mlp.gate_up(x)
    torch.testing.assert_close(mlp(x), mlp.down(F.silu(h[..., :40]) * h[..., 40:]))
    assert mlp(x).shape == x.shape
    gmlp = pnn.GeGLUMLP(48, 40, out_features=8, bias=True, approximate="none")
    h = gmlp.gate_up(x)
    torch.testing.assert_close(gmlp(x), gmlp.down(F.gelu(h[..., :40]) * h[..., 40:]), atol=1e-5, rtol=1e-5)


def test_module_bias_follows_activation_dtype():
    """fp32 parameters with bf16 activations (autocast): the bias is cast, its gradient lands in fp32."""
    m = pnn.BiasGeLU(40)
    x = rand((3, 40), torch.bfloat16, "cpu").requires_grad_()
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert m.bias.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16


# ---- errors ----------------------------------------------------------------------------------------------------

def test_errors():
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="p: expected a dropout probability"):
        ops.bias_dropout_residual(x, None, x, 1.5, 0, 0)
    with pytest.raises(RuntimeError, match="p: expected a dropout probability"):
        ops.bias_dropout_residual(x, None, x, -0.1, 0, 0)
    with pytest.raises(RuntimeError, match="p: expected a dropout probability"):
        ops.bias_dropout_residual(x, None, x, float("nan"), 0, 0)
    with pytest.raises(ValueError, match="p: expected"):
        pnn.BiasDropoutResidual(8, p=2.0)
    with pytest.raises(RuntimeError, match="residual: expected shape"):
        ops.bias_dropout_residual(x, None, torch.randn(4, 9), 0.1, 0, 0)
    with pytest.raises(RuntimeError, match="residual: expected dtype"):
        ops.bias_dropout_residual(x, None, x.half(), 0.1, 0, 0)
    with pytest.raises(RuntimeError, match="bias: expected shape"):
        ops.bias_gelu(x, torch.randn(7))
    with pytest.raises(RuntimeError, match="bias: expected dtype"):
        ops.bias_gelu(x, torch.randn(8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="x: expected dtype"):
        ops.bias_gelu(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="approximate"):
        ops.bias_gelu(x, None, "fast")
    with pytest.raises(RuntimeError, match="bias_grad: True needs a bias"):
        torch.ops.pyperf.bias_gelu_backward(x, x, None, "tanh", True)
    with pytest.raises(RuntimeError, match="grad: expected shape"):
        torch.ops.pyperf.bias_gelu_backward(torch.randn(4, 7), x, None, "tanh", False)
    with pytest.raises(RuntimeError, match="a: expected an even last dim"):
        ops.swiglu(torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="b: expected shape"):
        ops.swiglu(x, torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="b: expected dtype"):
        ops.swiglu(x, x.double())
    with pytest.raises(RuntimeError, match="activation"):
        ops.gated_act(x, x, "relu")
    with pytest.raises(RuntimeError, match="grad: expected shape"):
        torch.ops.pyperf.gated_act_backward(x, x, None, "silu")
    with pytest.raises(ValueError, match="approximate"):
        ops.geglu(x, approximate="fast")
    with pytest.raises(ValueError, match="seed"):
        ops.bias_dropout_residual(x, None, x, 0.1, 2**64, 0)


def test_wrapper_and_registered_autograd_agree():
    """ops.* and torch.ops.pyperf.* share the one C++ autograd kernel (csrc/autograd/activation.cpp): same values and
    gradients."""
    x, b, r = _d((6, 10)), _d((10,)), _d((6, 10))
    L = torch.ops.pyperf
    pairs = [
        (lambda: ops.bias_gelu(x, b, "none"), lambda: L.bias_gelu(x, b, "none"), (x, b)),
        (lambda: ops.bias_dropout_residual(x, b, r, 0.4, 9, 1), lambda: L.bias_dropout_residual(x, b, r, 0.4, 9, 1),
         (x, b, r)),
        (lambda: ops.swiglu(x), lambda: L.gated_act(x, None, "silu"), (x,)),
        (lambda: ops.geglu(x, r), lambda: L.gated_act(x, r, "gelu_tanh"), (x, r)),
    ]
    for wrapped, registered, inputs in pairs:
        ya, yb = wrapped(), registered()
        assert torch.equal(ya, yb)
        ga = torch.autograd.grad(ya.square().sum(), inputs)
        gb = torch.autograd.grad(yb.square().sum(), inputs)
        for u, v in zip(ga, gb):
            assert torch.equal(u, v)


def test_compile_keeps_the_seed_symbolic():
    """A fresh seed per call must not recompile torch.compile'd code every step (seed/offset are SymInt)."""
    import torch._dynamo.testing
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    cnt = torch._dynamo.testing.CompileCounter()
    f = torch.compile(lambda x, r, s: ops.bias_dropout_residual(x, None, r, 0.5, s, 0), backend=cnt)
    for s in range(6):
        assert torch.equal(f(x, r, 100 + s), ops.bias_dropout_residual(x, None, r, 0.5, 100 + s, 0))
    assert cnt.frame_count <= 2   # the first (static) compile, then one dynamic one


def test_benchmark_cases_run():
    """benchmarks/bench_activation.py builds its cases and the pyperf and eager impls run (no timing here)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "bench_activation.py")
    spec = importlib.util.spec_from_file_location("bench_activation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._shapes = lambda device, quick: [(16, 64)]   # the plumbing, not the sizes
    mod._compiled = lambda fn: None                   # torch.compile's import alone takes seconds
    cases = mod.cases("cpu", torch.float32, True)
    assert len(cases) == 9 and all(c.bytes > 0 for c in cases)
    for c in cases:
        inputs = c.setup()
        for name, fn in c.impls.items():
            fn(inputs)
            fn(inputs)   # bwd-only impls reuse their retained graph


def test_autograd_is_cpp_and_skips_frozen_bias_grads():
    """The autograd is the C++ kernel at the Autograd key (csrc/autograd/activation.cpp), and its backward asks for
    the bias-gradient reduction only when the bias needs a gradient (the bias is graph edge 1 when given)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    for op in ("bias_gelu", "bias_dropout_residual", "gated_act"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("pyperf::" + op, "Autograd"), op

    class Flags(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bias_grad = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.pyperf.bias_gelu_backward.default,
                        torch.ops.pyperf.bias_dropout_residual_backward.default):
                self.bias_grad.append(args[-1])
            return func(*args, **(kwargs or {}))

    x, r = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    for bias_rg, residual_rg in ((False, False), (True, False), (False, True), (True, True)):
        b = torch.randn(8, requires_grad=bias_rg)
        r.requires_grad_(residual_rg)
        y = ops.bias_gelu(x, b) + ops.bias_dropout_residual(x, b, r, 0.5, 1, 2) + ops.swiglu(x, r)
        assert "pyperf::autograd::BiasGeluBackward" in ops.bias_gelu(x, b).grad_fn.name()
        with Flags() as f:
            y.sum().backward()
        assert f.bias_grad == [bias_rg, bias_rg], (bias_rg, residual_rg, f.bias_grad)
        assert (b.grad is not None) == bias_rg and (r.grad is not None) == residual_rg
        r.grad = None
    with torch.no_grad():
        assert ops.bias_gelu(x, b).grad_fn is None and not ops.swiglu(x).requires_grad


def test_compiled_autograd_traces_the_backward():
    """The C++ autograd Functions are is_traceable: torch.compile's compiled autograd traces their backward with
    fullgraph=True (an opaque C++ node would be a graph break) and gives the eager gradients bit for bit."""
    import torch._dynamo.compiled_autograd as ca
    x, r = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    for bias_rg in (True, False):
        b = torch.randn(16, requires_grad=bias_rg)
        leaves = [t for t in (x, r, b) if t.requires_grad]

        def loss(seed):
            z = ops.bias_gelu(x, b, "none") + ops.bias_dropout_residual(x, b, r, 0.3, seed, 6) + ops.geglu(x, r)
            return z.square().sum()

        for seed in (5, 6):
            want = torch.autograd.grad(loss(seed), leaves)
            torch._dynamo.reset()
            with ca._enable(torch.compile(backend="aot_eager", fullgraph=True)):
                got = torch.autograd.grad(loss(seed), leaves)
            for g, w in zip(got, want):
                assert torch.equal(g, w)
