"""residual-add + LayerNorm / RMSNorm: pyperf vs torch eager (F.layer_norm / F.rms_norm after `x + residual`) vs
torch.compile of the same math; forward, backward, and forward+backward.

bytes = the roofline: every input read once and every output written once (the per-row statistics included;
dx is written once, it is the gradient of both x and residual). `measure` reports how much activation memory
each impl keeps for backward (saved tensors, unique storages) and, on CUDA, the peak memory of one fwd+bwd.
"""
import torch
import torch.nn.functional as F

from pyperf import ops
from pyperf.bench.case import Case

EPS = 1e-5
_COMPILED = {}


def _torch_fwd(kind, residual):
    def fn(x, r, w, b):
        h = x + r if residual else x
        if kind == "ln":
            y = F.layer_norm(h, (h.shape[-1],), w, b, EPS)
        else:
            y = F.rms_norm(h, (h.shape[-1],), w, EPS)
        return (y, h) if residual else (y,)
    return fn


def _compiled_fwd(kind, residual, mode):
    key = (kind, residual, mode)  # one compiled function per grad mode: no recompiles when switching
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_torch_fwd(kind, residual), dynamic=False)
    return _COMPILED[key]


def _pyperf_fwd(kind, residual, save):
    def fn(x, r, w, b):
        if kind == "ln":
            y, h, _, _ = ops.add_layer_norm(x, r if residual else None, w, b, EPS, save)
        else:
            y, h, _ = ops.add_rms_norm(x, r if residual else None, w, EPS, save)
        return (y, h) if residual else (y,)
    return fn


def _leaves(inp, kind, residual):
    leaves = [inp["x"]] + ([inp["r"]] if residual else []) + [inp["w"]]
    return leaves + ([inp["b"]] if kind == "ln" else [])


def _grads(inp, outs):
    return [inp["dy"], inp["dh"]][:len(outs)]


def _impl(fwd, mode, kind, residual, key):
    if mode == "fwd":
        def run(inp):
            with torch.no_grad():
                return fwd(inp["x"], inp["r"], inp["w"], inp["b"])
    elif mode == "fwd+bwd":
        def run(inp):
            outs = fwd(inp["x"], inp["r"], inp["w"], inp["b"])
            return torch.autograd.grad(outs, _leaves(inp, kind, residual), _grads(inp, outs))
    else:  # bwd: one forward graph per impl and input set, replayed with retain_graph
        def run(inp):
            graphs = inp.setdefault("graphs", {})
            if key not in graphs:
                graphs[key] = fwd(inp["x"], inp["r"], inp["w"], inp["b"])
            outs = graphs[key]
            return torch.autograd.grad(outs, _leaves(inp, kind, residual), _grads(inp, outs), retain_graph=True)
    return run


def _bytes(kind, residual, mode, M, N, e):
    act = M * N * e
    par = N * e * (2 if kind == "ln" else 1)
    stats = M * 4 * (2 if kind == "ln" else 1)
    fwd = act * (2 if residual else 1) + par + act * (2 if residual else 1) + stats
    # dy (+ dh), the saved input, the stats, the params in; dx, dweight (+ dbias) out
    bwd = act * (2 if residual else 1) + act + stats + par + act + par
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _measure_factory(fwds, kind, residual, device):
    def measure(name, inp):
        fwd = fwds[name]
        seen, total = set(), [0]

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in seen and t.numel() > t.shape[-1]:  # activations, not the parameters
                seen.add(s.data_ptr())
                total[0] += s.nbytes()
            return t

        out = {}
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = fwd(inp["x"], inp["r"], inp["w"], inp["b"])
        torch.autograd.grad(outs, _leaves(inp, kind, residual), _grads(inp, outs))
        if device == "cuda":
            torch.cuda.synchronize()
            out["peak_MiB"] = round((torch.cuda.max_memory_allocated() - before) / 2 ** 20, 1)
        out["saved_MiB"] = round(total[0] / 2 ** 20, 1)
        return out
    return measure


def cases(device="cuda", dtype=torch.bfloat16, quick=False):
    shapes = [(2048, 1024), (256, 4096)] if quick else [(16384, 4096), (4096, 1024)]
    e = torch.empty((), dtype=dtype).element_size()
    out = []
    for M, N in shapes:
        for kind in ("ln", "rms"):
            for residual in (True, False):
                def setup(M=M, N=N, kind=kind):
                    g = torch.Generator(device=device).manual_seed(M + N)
                    mk = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
                    return {"x": mk(M, N).requires_grad_(True), "r": mk(M, N).requires_grad_(True),
                            "w": (mk(N) * 0.1 + 1).requires_grad_(True),
                            "b": (mk(N) * 0.1).requires_grad_(True) if kind == "ln" else None,
                            "dy": mk(M, N), "dh": mk(M, N)}
                label = ("LayerNorm" if kind == "ln" else "RMSNorm") + ("+residual" if residual else "")
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    fwds = {"pyperf": _pyperf_fwd(kind, residual, "input"),
                            "pyperf save=output": _pyperf_fwd(kind, residual, "output"),
                            "torch": _torch_fwd(kind, residual),
                            "torch.compile": _compiled_fwd(kind, residual, mode)}
                    names = [n for n in fwds if mode == "fwd+bwd" or n != "pyperf save=output"]
                    out.append(Case(
                        group="layers",
                        name="%s %s %dx%d %s" % (label, mode, M, N, str(dtype).replace("torch.", "")),
                        setup=setup,
                        impls={n: _impl(fwds[n], mode, kind, residual, n) for n in names},
                        bytes=_bytes(kind, residual, mode, M, N, e),
                        baseline="torch",
                        extra={"M": M, "N": N, "kind": kind, "residual": residual, "mode": mode},
                        measure=_measure_factory(fwds, kind, residual, device) if mode == "fwd+bwd" else None,
                    ))
    return out
