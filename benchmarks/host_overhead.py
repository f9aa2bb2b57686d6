"""Host time of one forward+backward call of the fused layer ops against the torch eager code they replace, at
shapes small enough that the host side (Python, dispatch, autograd) dominates: the figure behind "small shapes must
not be slower than torch eager". One CPU thread, timed in that thread's CPU time (time.thread_time: time the thread
is descheduled on a shared machine does not count; with one thread the CPU autograd engine runs backward on the
calling thread); impls are interleaved round by round so a noisy machine hits all of them alike; per impl the
median and the best of the per-round means are printed, in microseconds.

    python3 benchmarks/host_overhead.py [--rounds 15] [--calls 200] [--shapes 8x64,64x1024] [--raw]

--raw also times torch.ops.pyperf.* called directly (no Python wrapper).
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import pyperf  # noqa: F401
from pyperf import ops

L = torch.ops.pyperf


def _impls(M, N, raw):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s, grad=True: torch.randn(*s, generator=g).requires_grad_(grad)  # noqa: E731
    x, r, w, b = mk(M, N), mk(M, N), mk(N), mk(N)
    a2 = mk(M, 2 * N)
    gy = torch.randn(M, N, generator=g)
    out = {}

    def case(name, fn):
        def run():
            y = fn()
            torch.autograd.backward(y, gy)
        out[name] = run

    case("layer_norm  pyperf", lambda: ops.add_layer_norm(x, r, w, b, 1e-5)[0])
    case("layer_norm  eager ", lambda: F.layer_norm(x + r, (N,), w, b, 1e-5))
    case("rms_norm    pyperf", lambda: ops.add_rms_norm(x, None, w, 1e-5)[0])
    case("rms_norm    eager ", lambda: F.rms_norm(x, (N,), w, 1e-5))
    case("bias_gelu   pyperf", lambda: ops.bias_gelu(x, b, "tanh"))
    case("bias_gelu   eager ", lambda: F.gelu(x + b, approximate="tanh"))
    case("bias_drop_r pyperf", lambda: ops.bias_dropout_residual(x, b, r, 0.1, 1234, 5))
    case("bias_drop_r eager ", lambda: r + F.dropout(x + b, 0.1, True))
    case("swiglu      pyperf", lambda: ops.swiglu(a2))
    case("swiglu      eager ", lambda: (lambda a, c: F.silu(a) * c)(*a2.chunk(2, -1)))
    if raw:
        case("layer_norm  raw op", lambda: L.add_layer_norm(x, r, w, b, 1e-5, False)[0])
        case("rms_norm    raw op", lambda: L.add_rms_norm(x, None, w, 1e-5, False)[0])
        case("bias_gelu   raw op", lambda: L.bias_gelu(x, b, "tanh"))
        case("bias_drop_r raw op", lambda: L.bias_dropout_residual(x, b, r, 0.1, 1234, 5))
        case("swiglu      raw op", lambda: L.gated_act(a2, None, "silu"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--shapes", default="8x64,64x1024")
    p.add_argument("--raw", action="store_true")
    p.add_argument("--wall", action="store_true", help="wall-clock time instead of the thread's CPU time")
    a = p.parse_args()
    torch.set_num_threads(1)
    clock = time.perf_counter if a.wall else time.thread_time
    print("torch %s, 1 thread, %s time, fwd+bwd per call, us: median / best of %d rounds x %d calls"
          % (torch.__version__, "wall" if a.wall else "thread CPU", a.rounds, a.calls))
    for shape in a.shapes.split(","):
        M, N = (int(v) for v in shape.split("x"))
        impls = _impls(M, N, a.raw)
        for fn in impls.values():   # warm up
            for _ in range(20):
                fn()
        per = {k: [] for k in impls}
        for _ in range(a.rounds):
            for k, fn in impls.items():
                t0 = clock()
                for _ in range(a.calls):
                    fn()
                per[k].append((clock() - t0) / a.calls * 1e6)
        print("-- %dx%d fp32" % (M, N))
        for k, v in per.items():
            print("  %s  %7.1f  %7.1f" % (k, statistics.median(v), min(v)))


if __name__ == "__main__":
    main()
