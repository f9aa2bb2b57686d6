"""residual-add + RMSNorm / LayerNorm: ops vs pyperf/_reference.py, gradcheck, opcheck, save="output",
the Fused* modules as drop-ins for torch.nn.LayerNorm / RMSNorm (also inside a real GPT-2), bad input."""
import copy

import pytest
import torch
from torch import nn

import pyperf  # noqa: F401  (loads the ops)
from pyperf import _reference as ref
from pyperf import ops
from pyperf.nn import FusedLayerNorm, FusedRMSNorm, replace_norms
from conftest import dev, devices, lib, stable_seed

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# max |got - want| / max(1, max |want|), against a float64 reference of the same inputs
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
SIZES = [1, 3, 63, 127, 1000, 4099]


def _skip_unsupported(device, dtype):
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 is CPU-only (for gradcheck)")


def _err(got, want):
    got, want = got.double(), want.double()
    if want.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / max(1.0, want.abs().max().item())).item()


def _inputs(kind, M, N, dtype, device, residual=True, weight=True, bias=True, weight_dtype=None, away_from_zero=False):
    g = torch.Generator().manual_seed(stable_seed(kind, M, N, str(dtype), residual, weight, bias))
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    wd = weight_dtype or dtype
    x = (mk(M, N) * 2 + 0.5).to(device=dev(device), dtype=dtype)
    r = mk(M, N).to(device=dev(device), dtype=dtype) if residual else None
    if away_from_zero:  # save="output" divides by the weight
        w = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5) * (torch.randint(0, 2, (N,), generator=g) * 2 - 1)
    else:
        w = mk(N)
    w = w.to(device=dev(device), dtype=wd) if weight else None
    b = mk(N).to(device=dev(device), dtype=wd) if (bias and kind == "ln") else None
    return x, r, w, b


def _run(kind, x, r, w, b, eps, save="input", impl=ops):
    """(y, h) from pyperf (impl=ops) or the reference (impl=ref)."""
    if kind == "rms":
        if impl is ops:
            y, h, _ = ops.add_rms_norm(x, r, w, eps, save)
        else:
            y, h, _ = ref.add_rms_norm(x, r, w, eps)
    else:
        if impl is ops:
            y, h, _, _ = ops.add_layer_norm(x, r, w, b, eps, save)
        else:
            y, h, _, _ = ref.add_layer_norm(x, r, w, b, eps)
    return y, h


def _fwd_bwd(kind, x, r, w, b, eps, save, impl, gy, gh):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, r, w, b)]
    y, h = _run(kind, *leaves, eps, save=save, impl=impl)
    loss = (y.double() * gy).sum()
    if r is not None:
        loss = loss + (h.double() * gh).sum()
    want = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, want)
    return y, h, grads


def _check_against_reference(kind, x, r, w, b, eps, save, dtype):
    gy = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    gh = torch.randn(x.shape, dtype=torch.float64, device=x.device)
    y, h, grads = _fwd_bwd(kind, x, r, w, b, eps, save, ops, gy, gh)
    up = lambda t: None if t is None else t.double()  # noqa: E731
    # The kernels normalize h = x + r rounded to x's dtype (the h they return and save), as eager torch would. The
    # reference must normalize that same rounded h: at N=3 in bfloat16 the rounding alone moves dx by ~10%. The
    # float64 residual r_ref = up(h) - up(x) is exact, so x_ref + r_ref is exactly up(h) and both still get a grad.
    r_ref = None if r is None else up(x + r) - up(x)
    y_ref, h_ref, grads_ref = _fwd_bwd(kind, up(x), r_ref, up(w), up(b), eps, "input", ref, gy, gh)
    tol = TOL[dtype] * (4 if save == "output" else 1)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert _err(y, y_ref) <= TOL[dtype], ("y", _err(y, y_ref))
    if r is not None:
        assert torch.equal(h, x + r)
    names = [n for n, t in zip(("x", "residual", "weight", "bias"), (x, r, w, b)) if t is not None]
    for name, g, g_ref, t in zip(names, grads, grads_ref, [t for t in (x, r, w, b) if t is not None]):
        assert g.dtype == t.dtype, name
        # weight/bias gradients sum over rows: compare relative to their scale
        assert _err(g, g_ref) <= tol, (name, _err(g, g_ref))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("N", SIZES)
def test_matches_reference(device, dtype, kind, N):
    _skip_unsupported(device, dtype)
    torch.manual_seed(N)
    for residual in (True, False):
        x, r, w, b = _inputs(kind, 7, N, dtype, device, residual=residual)
        _check_against_reference(kind, x, r, w, b, 1e-5, "input", dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("affine", ["w", "b", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_affine_variants(device, kind, affine, dtype):
    if kind == "rms" and affine == "b":
        pytest.skip("RMSNorm has no bias")
    for N in (64, 1000):
        x, r, w, b = _inputs(kind, 5, N, dtype, device, weight=affine == "w", bias=affine == "b")
        _check_against_reference(kind, x, r, w, b, 1e-6, "input", dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_with_half_activations(device, kind, dtype):
    x, r, w, b = _inputs(kind, 6, 4096 + 8, dtype, device, weight_dtype=torch.float32)
    _check_against_reference(kind, x, r, w, b, 1e-5, "input", dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [3, 1024, 4099])
def test_save_output_same_gradients(device, kind, dtype, N):
    x, r, w, b = _inputs(kind, 9, N, dtype, device, away_from_zero=True)
    gy = torch.randn(x.shape, dtype=torch.float64, device=dev(device))
    gh = torch.randn(x.shape, dtype=torch.float64, device=dev(device))
    _, _, g_in = _fwd_bwd(kind, x, r, w, b, 1e-5, "input", ops, gy, gh)
    _, _, g_out = _fwd_bwd(kind, x, r, w, b, 1e-5, "output", ops, gy, gh)
    # y is rounded to the activation dtype before xhat is rebuilt from it: a few ulps of that dtype
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    for a, c in zip(g_in, g_out):
        assert _err(a, c) <= tol
    _check_against_reference(kind, x, r, w, b, 1e-5, "output", dtype)


def test_save_output_keeps_less():
    """save="output" keeps y (which the next layer keeps anyway), not x/h."""
    x, r, w, b = _inputs("ln", 4, 32, torch.float32, "cpu", away_from_zero=True)
    x.requires_grad_(True)
    for save, keeps in (("input", "h"), ("output", "y")):
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            y, h, _, _ = ops.add_layer_norm(x, r, w, b, 1e-5, save)
        target = h if keeps == "h" else y
        assert any(p.data_ptr() == target.data_ptr() for p in packed), save
        big = [p for p in packed if p.numel() == x.numel()]
        assert len(big) == 1, (save, [p.shape for p in packed])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_shapes_and_empty(device, kind):
    for shape in [(2, 3, 5, 40), (40,), (0, 40), (3, 0)]:
        x = torch.randn(shape, device=dev(device), requires_grad=True)
        w = torch.randn(shape[-1], device=dev(device), requires_grad=True)
        r = torch.randn(shape, device=dev(device), requires_grad=True)
        y, h = _run(kind, x, r, w, None, 1e-5)
        y_ref, _ = _run(kind, x, r, w, None, 1e-5, impl=ref)
        assert y.shape == x.shape and h.shape == x.shape
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        (y.sum() + h.sum()).backward()
        assert x.grad.shape == x.shape and r.grad.shape == x.shape and w.grad.shape == w.shape
        if x.numel() == 0 and shape[-1] > 0:
            assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("save", ["input", "output"])
def test_gradcheck_float64(kind, save):
    x, r, w, b = _inputs(kind, 3, 11, torch.float64, "cpu", away_from_zero=True)
    leaves = [t.requires_grad_(True) for t in (x, r, w, b) if t is not None]

    def f(*args):
        xx, rr, ww = args[:3]
        bb = args[3] if kind == "ln" else None
        return _run(kind, xx, rr, ww, bb, 1e-5, save=save)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5)

    def f_noaffine(xx):  # no residual, no weight: the y-only path
        return _run(kind, xx, None, None, None, 1e-5, save=save)[0]

    assert torch.autograd.gradcheck(f_noaffine, (x,), eps=1e-6, atol=1e-5)


def _opcheck_samples(device):
    out = []
    cases = [(torch.float32, True), (torch.bfloat16, False)] + ([(torch.float64, True)] if device == "cpu" else [])
    for dtype, grad in cases:
        x, r, w, b = _inputs("ln", 5, 67, dtype, device, away_from_zero=True)
        out.append(tuple(t.requires_grad_(grad) for t in (x, r, w, b)))
    return out


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    for n, (x, r, w, b) in enumerate(_opcheck_samples(device)):
        for save in (False, True):
            torch.library.opcheck(lib(device).add_rms_norm, (x, r, w, 1e-5, save))
            torch.library.opcheck(lib(device).add_layer_norm, (x, r, w, b, 1e-5, save))
        with torch.no_grad():
            y, h, mean, rstd = ops.add_layer_norm(x, r, w, b, 1e-5)
            _, _, rrstd = ops.add_rms_norm(x, r, w, 1e-5)
        dy, dh = torch.randn_like(y), torch.randn_like(y)
        torch.library.opcheck(lib(device).add_layer_norm_backward,
                              (dy, dh, h, w.detach(), b.detach(), mean, rstd, False))
        torch.library.opcheck(lib(device).add_rms_norm_backward, (dy, dh, y, w.detach(), rrstd, True))
        if n == 0:  # the optional arguments absent
            torch.library.opcheck(lib(device).add_rms_norm, (x, None, None, 1e-6))
            torch.library.opcheck(lib(device).add_layer_norm, (x, None, w, None, 1e-6))
            torch.library.opcheck(lib(device).add_layer_norm_backward,
                                  (dy, None, y, None, None, None, rstd, True))
            torch.library.opcheck(lib(device).add_rms_norm_backward, (dy, None, h, None, rrstd, False))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_backward_ops_match_reference(device, kind):
    for dtype in (torch.float32, torch.bfloat16):
        x, r, w, b = _inputs(kind, 33, 515, dtype, device, away_from_zero=True)
        dy, dh = torch.randn_like(x), torch.randn_like(x)
        if kind == "ln":
            y, h, mean, rstd = ops.add_layer_norm(x, r, w, b, 1e-5)
        else:
            y, h, rstd = ops.add_rms_norm(x, r, w, 1e-5)
            mean = None
        for saved, out in ((h, False), (y, True)):
            if kind == "ln":
                got = ops._lib.add_layer_norm_backward(dy, dh, saved, w, b, mean, rstd, out)
                want = ref.add_layer_norm_backward(dy, dh, saved, w, b, mean, rstd, out)
            else:
                got = ops._lib.add_rms_norm_backward(dy, dh, saved, w, rstd, out)
                want = ref.add_rms_norm_backward(dy, dh, saved, w, rstd, out)
            for g, c in zip(got, want):
                assert g.dtype == c.dtype and g.shape == c.shape
                assert _err(g, c) <= TOL[dtype] * 2, _err(g, c)


def _misaligned(t):
    """A contiguous copy of t whose data starts 1 element past an allocation (off the 16-byte boundary)."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return out.copy_(t)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_misaligned_and_long_rows(device, kind):
    """Contiguous views that start off a 16-byte boundary (the scalar CUDA path) and long rows. CUDA paths: forward
    in registers (N <= 8192: 1024, 4097) or streamed (8193, 20000, 40000: beyond the old 32768 limit); backward in
    registers (N <= 4096) or row sums + column tiles (the rest); vector (20000 in bf16 and the aligned 1024) and
    scalar (odd N, and every misaligned case)."""
    for N in ([1024, 20000] if device == "cpu" else [1024, 4097, 8193, 20000, 40000]):
        x, r, w, b = _inputs(kind, 3, N, torch.bfloat16, device)
        _check_against_reference(kind, x, r, w, b, 1e-5, "input", torch.bfloat16)
        xs, dys = (_misaligned(t) for t in (x, torch.randn_like(x)))
        assert xs.data_ptr() % 16 != 0 and xs.is_contiguous()
        up = lambda t: None if t is None else t.double()  # noqa: E731
        y, h = _run(kind, xs, r, w, b, 1e-5)
        y_ref, h_ref = _run(kind, up(x), up(r), up(w), up(b), 1e-5, impl=ref)
        assert _err(y, y_ref) <= TOL[torch.bfloat16]
        hs = _misaligned(h)
        if kind == "ln":
            _, _, mean, rstd = ops.add_layer_norm(hs, None, w, b, 1e-5)
            got = ops._lib.add_layer_norm_backward(dys, None, hs, w, b, mean, rstd, False)
            want = ref.add_layer_norm_backward(up(dys), None, up(hs), up(w), up(b), mean.double(), rstd.double(),
                                               False)
        else:
            _, _, rstd = ops.add_rms_norm(hs, None, w, 1e-5)
            got = ops._lib.add_rms_norm_backward(dys, None, hs, w, rstd, False)
            want = ref.add_rms_norm_backward(up(dys), None, up(hs), up(w), rstd.double(), False)
        for g_, c_ in zip(got, want):
            assert _err(g_, c_) <= 2 * TOL[torch.bfloat16]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("M,N", [(8, 0), (0, 0), (0, 8)])
def test_empty_rows_and_columns(device, kind, M, N):
    """0 in every dim, forward and backward (a last dim of 0 once divided by zero in an activation's CUDA launch
    plan; the norms' plans must take it too)."""
    for dtype in (torch.float32, torch.bfloat16):
        x, r, w, b = _inputs(kind, M, N, dtype, device)
        _check_against_reference(kind, x, r, w, b, 1e-5, "input", dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_long_rows_other_dtypes(device, kind, dtype):
    """The streamed forward and the row-sums + column-tile backward of CUDA (rows > 8192 / 4096) in fp32 and fp16,
    vector (12288, aligned) and scalar (8195) paths (bf16 is in test_misaligned_and_long_rows)."""
    for N in (12288, 8195):
        x, r, w, b = _inputs(kind, 2, N, dtype, device)
        _check_against_reference(kind, x, r, w, b, 1e-5, "input", dtype)


@pytest.mark.parametrize("device", devices())
def test_poisoned_allocations(device):
    """Outputs come from the allocator: fill same-sized blocks with nan and free them first, so an element the
    kernels do not write shows up as nan."""
    for kind in ("rms", "ln"):
        for N in (5, 129, 2051):
            x, r, w, b = _inputs(kind, 17, N, torch.bfloat16, device)
            for _ in range(2):
                junk = [torch.full((17 * N,), float("nan"), dtype=torch.bfloat16, device=dev(device)) for _ in range(8)]
                junk += [torch.full((17,), float("nan"), device=dev(device)) for _ in range(8)]
                junk += [torch.full((N,), float("nan"), dtype=torch.bfloat16, device=dev(device)) for _ in range(4)]
                del junk
                xx = x.clone().requires_grad_(True)
                ww = w.clone().requires_grad_(True)
                bb = b.clone().requires_grad_(True) if b is not None else None
                y, h = _run(kind, xx, r, ww, bb, 1e-5)
                (y.float().sum() + h.float().sum()).backward()
                for t in (y, h, xx.grad, ww.grad) + ((bb.grad,) if bb is not None else ()):
                    assert torch.isfinite(t).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["rms", "ln"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_nonfinite_comes_through(device, kind, dtype):
    """NaN-ness, not NaN bits: bf16/fp16 NaNs have backend-specific bits (docs/norm.md)."""
    x, r, w, b = _inputs(kind, 4, 300, dtype, device)
    x[1, 7] = float("inf")
    x[2, 9] = float("nan")
    x.requires_grad_(True)
    y, h = _run(kind, x, r, w, b, 1e-5)
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()
    assert not torch.isfinite(y[1]).all() and torch.isnan(y[2]).all()
    (y.sum()).backward()
    assert torch.isnan(x.grad[2]).all() and not torch.isfinite(x.grad[1]).all()


@pytest.mark.parametrize("device", devices())
def test_deterministic_weight_grads(device):
    x, r, w, b = _inputs("ln", 301, 257, torch.float32, device)
    dy = torch.randn_like(x)
    y, h, mean, rstd = ops.add_layer_norm(x, r, w, b, 1e-5)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 1):  # on CUDA: three identical runs
            torch.set_num_threads(n)
            outs.append(ops._lib.add_layer_norm_backward(dy, None, h, w, b, mean, rstd, False))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        for a, c in zip(o, outs[0]):
            assert torch.equal(a, c)


@pytest.mark.parametrize("device", devices())
def test_bad_input(device):
    x = torch.randn(4, 8, device=dev(device))
    w = torch.randn(8, device=dev(device))
    L = lib(device)
    with pytest.raises(RuntimeError, match="residual: expected sizes"):
        L.add_rms_norm(x, torch.randn(4, 9, device=dev(device)), w, 1e-5)
    with pytest.raises(RuntimeError, match="weight: expected a 1-D tensor of size 8"):
        L.add_rms_norm(x, None, torch.randn(9, device=dev(device)), 1e-5)
    with pytest.raises(RuntimeError, match="bias: expected dtype"):
        L.add_layer_norm(x, None, w, torch.randn(8, device=dev(device), dtype=torch.float16), 1e-5)
    with pytest.raises(RuntimeError, match="x: expected dtype float32"):
        L.add_layer_norm(x.to(torch.int32), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="x: expected a contiguous"):
        L.add_layer_norm(torch.randn(8, 4, device=dev(device)).t(), None, None, None, 1e-5)
    with pytest.raises(RuntimeError, match="eps: expected a finite number"):
        L.add_layer_norm(x, None, None, None, -1.0)
    with pytest.raises(RuntimeError, match="x: expected a tensor with at least 1 dim"):
        L.add_layer_norm(torch.tensor(1.0, device=dev(device)), None, None, None, 1e-5)
    y, h, mean, rstd = L.add_layer_norm(x, None, w, None, 1e-5)
    with pytest.raises(RuntimeError, match="mean: expected the per-row mean"):
        L.add_layer_norm_backward(y, None, x, w, None, None, rstd, False)
    with pytest.raises(RuntimeError, match="rstd: expected sizes"):
        L.add_rms_norm_backward(y, None, x, w, rstd[:2], False)
    with pytest.raises(RuntimeError, match="dy: expected dtype"):
        L.add_rms_norm_backward(y.double(), None, x, w, rstd, False)
    with pytest.raises(ValueError, match="save"):
        ops.add_rms_norm(x, None, w, 1e-5, save="both")
    with pytest.raises(RuntimeError, match=r"expected input with shape \[\*, 3, 8\]"):
        FusedLayerNorm((3, 8), device=dev(device))(x)
    with pytest.raises(ValueError, match="save"):
        FusedRMSNorm(8, save="yes")
    # the wrappers make non-contiguous input contiguous rather than failing
    xt = torch.randn(8, 4, device=dev(device)).t()
    torch.testing.assert_close(ops.layer_norm(xt), torch.nn.functional.layer_norm(xt, (8,)))
    if device != "cpu":
        with pytest.raises(RuntimeError, match="float64 is supported on CPU only"):
            L.add_rms_norm(x.double(), None, None, 1e-5)


# ---- modules ---------------------------------------------------------------------------------------------------

def _pairs():
    return [
        (lambda **k: nn.LayerNorm(48, **k), lambda **k: FusedLayerNorm(48, **k)),
        (lambda **k: nn.LayerNorm((3, 16), eps=1e-3, bias=False, **k),
         lambda **k: FusedLayerNorm((3, 16), eps=1e-3, bias=False, **k)),
        (lambda **k: nn.LayerNorm(48, elementwise_affine=False, **k),
         lambda **k: FusedLayerNorm(48, elementwise_affine=False, **k)),
        (lambda **k: nn.RMSNorm(48, **k), lambda **k: FusedRMSNorm(48, **k)),
        (lambda **k: nn.RMSNorm([3, 16], eps=1e-4, **k), lambda **k: FusedRMSNorm([3, 16], eps=1e-4, **k)),
        (lambda **k: nn.RMSNorm(48, elementwise_affine=False, **k),
         lambda **k: FusedRMSNorm(48, elementwise_affine=False, **k)),
    ]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("i", range(6))
def test_module_drop_in(device, i):
    make_torch, make_fused = _pairs()[i]
    t = make_torch(device=dev(device))
    f = make_fused(device=dev(device))
    assert list(t.state_dict().keys()) == list(f.state_dict().keys())
    with torch.no_grad():
        for p in t.parameters():
            p.normal_()
    f.load_state_dict(t.state_dict())          # torch -> fused
    t2 = make_torch(device=dev(device))
    t2.load_state_dict(f.state_dict())          # fused -> torch
    for a, c in zip(t.parameters(), t2.parameters()):
        assert torch.equal(a, c)
    shape = (2, 5, 48) if "48" in repr(t) else (2, 5, 3, 16)
    x = torch.randn(shape, device=dev(device), requires_grad=True)
    r = torch.randn(shape, device=dev(device), requires_grad=True)
    y_t = t(x + r)
    y_f, h_f = f(x, r)
    y_plain = f(x + r)
    torch.testing.assert_close(y_f, y_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y_plain, y_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_f, x + r)
    g = torch.randn_like(y_t)
    grads_t = torch.autograd.grad((y_t * g).sum(), [x] + list(t.parameters()))
    grads_f = torch.autograd.grad((y_f * g).sum(), [x] + list(f.parameters()))
    for a, c in zip(grads_f, grads_t):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_module_dtypes_and_eps_none():
    f = FusedRMSNorm(64, dtype=torch.bfloat16)
    t = nn.RMSNorm(64, dtype=torch.bfloat16)
    assert f.weight.dtype == torch.bfloat16 and f.eps is None
    x = torch.randn(3, 64, dtype=torch.bfloat16) * 1e-4   # small enough that eps matters
    torch.testing.assert_close(f(x), t(x), atol=2e-2, rtol=2e-2)
    assert "save=input" in repr(f)


def test_replace_norms_keeps_parameters():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Sequential(nn.RMSNorm(8), nn.ReLU()))
    params_before = [id(p) for p in model.parameters()]
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    out = replace_norms(model, save="output")
    assert out is model
    assert isinstance(model[1], FusedLayerNorm) and isinstance(model[2][0], FusedRMSNorm)
    assert model[1].save == "output"
    assert [id(p) for p in model.parameters()] == params_before
    assert sd_before.keys() == model.state_dict().keys()
    assert isinstance(replace_norms(nn.LayerNorm(4)), FusedLayerNorm)

    class MyNorm(nn.LayerNorm):  # a subclass may change forward: left alone
        pass
    m = nn.Sequential(MyNorm(4))
    assert type(replace_norms(m)[0]) is MyNorm


def test_compile_aot_eager():
    f = FusedLayerNorm(32)
    x = torch.randn(4, 32, requires_grad=True)
    r = torch.randn(4, 32)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y, h = compiled(x, r)
    y2, h2 = f(x, r)
    torch.testing.assert_close(y, y2)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("save", ["input", "output"])
def test_gpt2_drop_in(save):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial norm parameters (and nonzero weights, as save="output" needs)
        for m in base.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    fused = replace_norms(copy.deepcopy(base), save=save)
    n_fused = sum(isinstance(m, FusedLayerNorm) for m in fused.modules())
    assert n_fused == 2 * 2 + 1 and not any(type(m) is nn.LayerNorm for m in fused.modules())
    ids = torch.randint(0, 97, (2, 16))
    out_b = base(ids, labels=ids)
    out_f = fused(ids, labels=ids)
    torch.testing.assert_close(out_f.logits, out_b.logits, atol=1e-4, rtol=1e-4)
    out_b.loss.backward()
    out_f.loss.backward()
    for (n, pb), (_, pf) in zip(base.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(pf.grad, pb.grad, atol=1e-4, rtol=1e-3, msg=n)
    assert base.state_dict().keys() == fused.state_dict().keys()


@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_only_residual_stream_used(kind):
    """Gradient flowing only through h (y unused): dx = dresidual = dh, zero weight gradient."""
    x, r, w, b = _inputs(kind, 4, 33, torch.float32, "cpu")
    leaves = [t.requires_grad_(True) for t in (x, r, w, b) if t is not None]
    _, h = _run(kind, x, r, w, b, 1e-5)
    gh = torch.randn_like(h)
    grads = torch.autograd.grad((h * gh).sum(), leaves)
    torch.testing.assert_close(grads[0], gh)
    torch.testing.assert_close(grads[1], gh)
    for g in grads[2:]:
        assert torch.equal(g, torch.zeros_like(g))


def test_autograd_is_cpp():
    """One autograd, the C++ kernel at the Autograd key (csrc/autograd/norm.cpp): the wrappers and torch.ops.pyperf.*
    record the same node, and nothing is recorded without gradients."""
    for op in ("add_rms_norm", "add_layer_norm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("pyperf::" + op, "Autograd"), op
    x = torch.randn(3, 8, requires_grad=True)
    assert "pyperf::autograd::AddLayerNormBackward" in ops.add_layer_norm(x)[0].grad_fn.name()
    y = torch.ops.pyperf.add_rms_norm(x, None, None, 1e-5)[0]
    assert "pyperf::autograd::AddRmsNormBackward" in y.grad_fn.name()
    with torch.no_grad():
        assert ops.add_layer_norm(x)[0].grad_fn is None
    assert ops.add_rms_norm(x.detach())[0].grad_fn is None


@pytest.mark.parametrize("save", ["input", "output"])
def test_compiled_autograd_traces_the_backward(save):
    """The C++ autograd Functions are is_traceable: compiled autograd traces their backward with fullgraph=True
    and gives the eager gradients bit for bit (residual or not, frozen weight or not)."""
    import torch._dynamo.compiled_autograd as ca
    x, r, w, b = _inputs("ln", 4, 16, torch.float32, "cpu", away_from_zero=True)
    x.requires_grad_(True)
    r.requires_grad_(True)
    for w_rg, res in ((True, r), (False, None)):
        w.requires_grad_(w_rg)
        b.requires_grad_(w_rg)
        leaves = [t for t in (x, res, w, b) if t is not None and t.requires_grad]

        def loss():
            y, h, _, _ = ops.add_layer_norm(x, res, w, b, 1e-5, save)
            y2, _, _ = ops.add_rms_norm(y, None, w, 1e-5, save)
            return (y2.square().sum() + (h.sum() if res is not None else 0))

        want = torch.autograd.grad(loss(), leaves)
        torch._dynamo.reset()
        with ca._enable(torch.compile(backend="aot_eager", fullgraph=True)):
            got = torch.autograd.grad(loss(), leaves)
        for g, c in zip(got, want):
            assert torch.equal(g, c)
