"""Fused activations: bias+GeLU, bias+dropout+residual, SwiGLU; forward, backward and both, pyperf against torch
eager and torch.compile of the same math.

bytes is the roofline of each case: every input read once, every output written once (fwd+bwd counts the pair as
one program: x, bias, grad read; y, grad_x, grad_bias written).
"""
import torch
import torch.nn.functional as F

from pyperf import ops
from pyperf.bench.case import Case

P_DROP = 0.1


def _shapes(device, quick):
    if quick:
        return [(512, 1024)]
    if str(device).startswith("cuda"):
        return [(16384, 4096), (4096, 1024)]
    return [(4096, 1024), (1024, 4096)]   # the 16384x4096 figure takes minutes per impl on a small CPU


def _compiled(fn):
    """torch.compile(fn), or None where torch.compile cannot be used here; a compile error at the first call is
    recorded by the harness as that impl's failure, the other impls still run."""
    try:
        return torch.compile(fn, dynamic=False)
    except Exception:  # pragma: no cover - depends on the installation
        return None


# ---- the three ops: (inputs, forward per impl, grads wanted, bytes) ------------------------------------------

def _eager_bias_gelu(t):
    return F.gelu(t["x"] + t["b"], approximate="tanh")


def _pyperf_bias_gelu(t):
    return ops.bias_gelu(t["x"], t["b"], "tanh")


def _eager_bdr(t):
    return t["r"] + F.dropout(t["x"] + t["b"], P_DROP, training=True)


def _pyperf_bdr(t):
    return ops.bias_dropout_residual(t["x"], t["b"], t["r"], P_DROP, 1234, t["step"])


def _eager_swiglu(t):
    a, b = t["x"].chunk(2, dim=-1)
    return F.silu(a) * b


def _pyperf_swiglu(t):
    return ops.swiglu(t["x"])


OPS = {
    # name: (eager fn, pyperf fn, needs residual, grads of, output cols factor, bytes(N, H, es) per mode)
    "bias+gelu": dict(eager=_eager_bias_gelu, pyperf=_pyperf_bias_gelu, residual=False, grads=("x", "b"),
                      out_cols=1.0,
                      bytes=dict(fwd=lambda N, H: 2 * N + H, bwd=lambda N, H: 3 * N + 2 * H,
                                 both=lambda N, H: 4 * N + 2 * H)),
    "bias+dropout+residual": dict(eager=_eager_bdr, pyperf=_pyperf_bdr, residual=True, grads=("x", "b", "r"),
                                  out_cols=1.0,
                                  bytes=dict(fwd=lambda N, H: 3 * N + H, bwd=lambda N, H: 2 * N + H,
                                             both=lambda N, H: 5 * N + 2 * H)),
    # x [R, H] split into a, b [R, H/2]; N counts x's elements
    "swiglu": dict(eager=_eager_swiglu, pyperf=_pyperf_swiglu, residual=False, grads=("x",), out_cols=0.5,
                   bytes=dict(fwd=lambda N, H: N + N // 2, bwd=lambda N, H: N // 2 + 2 * N,
                              both=lambda N, H: 3 * N + N // 2)),
}


def _setup(op, rows, hidden, device, dtype):
    def make():
        gen_dev = device if str(device).startswith("cuda") else "cpu"
        t = {"x": torch.randn(rows, hidden, device=gen_dev, dtype=dtype).requires_grad_(),
             "step": 0}
        if op != "swiglu":
            t["b"] = torch.randn(hidden, device=gen_dev, dtype=dtype).requires_grad_()
        if OPS[op]["residual"]:
            t["r"] = torch.randn(rows, hidden, device=gen_dev, dtype=dtype).requires_grad_()
        out_cols = int(hidden * OPS[op]["out_cols"])
        t["g"] = torch.randn(rows, out_cols, device=gen_dev, dtype=dtype)
        return t
    return make


def _impl(fwd, mode, grads, key):
    """One call of `mode` with forward `fwd`. bwd-only reuses a forward graph built once per input set (kept in
    the inputs under `key`) and retains it, so only the backward is timed."""
    if mode == "fwd":
        def run(t):
            with torch.no_grad():
                return fwd(t)
        return run
    if mode == "bwd":
        def run(t):
            y = t.get(key)
            if y is None:
                y = t[key] = fwd(t)
            return torch.autograd.grad(y, [t[k] for k in grads], t["g"], retain_graph=True)
        return run

    def run(t):
        t["step"] += 1   # a fresh dropout offset per call, as a training step would draw
        return torch.autograd.grad(fwd(t), [t[k] for k in grads], t["g"])
    return run


def cases(device, dtype, quick):
    dtype = dtype or torch.bfloat16
    es = torch.empty((), dtype=dtype).element_size()
    dname = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    out = []
    for rows, hidden in _shapes(device, quick):
        N = rows * hidden
        for op, spec in OPS.items():
            compiled = _compiled(spec["eager"])
            for mode in ("fwd", "bwd", "both"):
                impls = {"pyperf": _impl(spec["pyperf"], mode, spec["grads"], "_y_pyperf"),
                         "torch eager": _impl(spec["eager"], mode, spec["grads"], "_y_eager")}
                if compiled is not None:
                    impls["torch.compile"] = _impl(compiled, mode, spec["grads"], "_y_compile")
                label = {"fwd": "fwd", "bwd": "bwd", "both": "fwd+bwd"}[mode]
                out.append(Case(
                    group="layers",
                    name="%s %s %dx%d %s" % (op, label, rows, hidden, dname),
                    setup=_setup(op, rows, hidden, device, dtype),
                    impls=impls,
                    bytes=int(spec["bytes"][mode](N, hidden) * es),
                    baseline="torch eager",
                    extra={"rows": rows, "hidden": hidden, "mode": mode, "p": P_DROP if "dropout" in op else None},
                ))
    return out
